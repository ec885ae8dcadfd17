"""A meddino verb on a quiet and on a shared CPU machine, with torch's default threads and with meddino's
thread choice (``meddino.devices.configure_cpu_threads``).

The verb is ``meddino pretrain --config dinov2_tiny`` at the full demo's settings (64 px global / 32 px local
crops, batch 16) on generated images, for ``--iterations`` steps: the demo's main cost. Each run is a fresh
``python -m meddino`` process; its wall time and CPU seconds (user + sys, from ``os.wait4``) are recorded.

- ``before``: ``MEDDINO_NUM_THREADS=off``, i.e. what meddino did before: torch's default intra-op threads
  (one per core) and libgomp's default busy-wait (300,000 spins before a waiting thread sleeps);
- ``after``: meddino's choice: threads = cores free now, ``OMP_WAIT_POLICY=PASSIVE``, short spin count;
- ``passive_all_cores`` (``--modes``): the passive wait policy but one thread per core
  (``MEDDINO_NUM_THREADS=<cores>``), to tell the wait policy's share from the thread count's;
- ``shared``: with ``--hogs`` busy processes (a Python busy loop that ends after 30 minutes)
  started ``--hog-warmup`` seconds before the first run.

The modes' runs alternate. The machine may carry other people's load too: every run
records the load average and the count of runnable tasks when it started, and the thread count meddino
chose (its ``MEDDINO_DEBUG`` line). Prints one JSON object.

    python benchmarks/shared_machine.py [--iterations 60] [--repeats 1] [--hogs 2] [--modes before,after]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

_THREAD_VARS = ("MEDDINO_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def make_images(folder: Path, n: int = 64, size: int = 96, seed: int = 0) -> None:
    """Smooth structured greyscale-ish images (blobs + gradients), PNG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = 100 + 40 * np.sin(rng.uniform(-1, 1) * xx / 9 + rng.uniform(-1, 1) * yy / 7)
        for _ in range(4):
            cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(5, 25)]
            img = img + rng.uniform(-80, 80) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        rgb = np.clip(np.stack([img, img * 0.9, img * 0.8], -1) + rng.normal(0, 4, (size, size, 3)), 0, 255)
        Image.fromarray(rgb.astype(np.uint8)).save(folder / f"img_{i:03d}.png")


def runnable_now() -> int:
    with open("/proc/loadavg") as f:
        return int(f.read().split()[3].split("/")[0]) - 1  # less the reader


def run_once(mode: str, data: Path, out: Path, iterations: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _THREAD_VARS}
    env.update(HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", MEDDINO_QUIET="1", MEDDINO_DEBUG="1")
    if mode == "before":
        env["MEDDINO_NUM_THREADS"] = "off"
    elif mode == "passive_all_cores":
        env["MEDDINO_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
    cmd = [sys.executable, "-m", "meddino", "pretrain", "--config", "dinov2_tiny", f"data.path={data}",
           f"out={out}", f"train.iterations={iterations}", "data.batch_size=16", "crops.global_size=64",
           "crops.local_size=32", f"train.checkpoint_every={iterations}", "data.num_workers=0"]
    start = {"load_average": [round(x, 2) for x in os.getloadavg()], "runnable_others": runnable_now()}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed ({proc.returncode}):\n{err[-2000:]}")
    chosen = next((line for line in err.splitlines() if "CPU threads" in line), None)
    return {"mode": mode, "wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "user_s": round(usage.ru_utime, 2), "sys_s": round(usage.ru_stime, 2),
            "involuntary_switches": usage.ru_nivcsw, "voluntary_switches": usage.ru_nvcsw,
            "threads": int(chosen.split()[1]) if chosen else "torch default", "meddino_says": chosen,
            "at_start": start}


def summarise(runs: list[dict], modes: list[str]) -> dict:
    out: dict = {}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        out[mode] = {"wall_s_median": round(statistics.median(r["wall_s"] for r in mine), 2),
                     "cpu_s_median": round(statistics.median(r["cpu_s"] for r in mine), 2)}
    if "before" in out and "after" in out:
        for key in ("wall", "cpu"):
            ratio = out["before"][f"{key}_s_median"] / out["after"][f"{key}_s_median"]
            out[f"{key}_before_over_after"] = round(ratio, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--modes", default="before,after", help="comma list of before, after, passive_all_cores")
    ap.add_argument("--hogs", type=int, default=2)
    ap.add_argument("--hog-warmup", type=float, default=5.0)
    ap.add_argument("--skip-quiet", action="store_true")
    args = ap.parse_args()
    modes = args.modes.split(",")

    import torch

    from meddino.profile.timing import machine_info

    report: dict = {"benchmark": "shared_machine",
                    "command": f"meddino pretrain --config dinov2_tiny train.iterations={args.iterations} "
                               "data.batch_size=16 crops.global_size=64 crops.local_size=32 (64 generated images)",
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                    "runnable_others_at_start": runnable_now(),
                    "available_cores": len(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory(prefix="meddino-shared-") as tmp:
        tmp = Path(tmp)
        make_images(tmp / "data")
        run_once("after", tmp / "data", tmp / "warm", max(args.iterations // 4, 2))  # warm caches, not counted
        cases = [] if args.skip_quiet else [("quiet", 0)]
        cases.append((f"{args.hogs}_busy_processes", args.hogs))
        for name, hogs in cases:
            hog = "import time\nend = time.time() + 1800\nwhile time.time() < end: pass"  # bounded busy loop
            procs = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(hogs)]
            try:
                if hogs:
                    time.sleep(args.hog_warmup)
                runs = []
                for i in range(args.repeats):
                    for mode in modes if i % 2 == 0 else modes[::-1]:
                        runs.append(run_once(mode, tmp / "data", tmp / f"{name}_{mode}_{i}", args.iterations))
                        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
            finally:
                for p in procs:
                    p.terminate()
                for p in procs:
                    p.wait()
            report[name] = {"busy_processes_added": hogs, "runs": runs, "summary": summarise(runs, modes)}
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["machine"] = {**machine_info(torch.device("cpu")), "torch_threads": "per run, see runs[].threads"}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
