"""A pretraining checkpoint under FSDP2 written in the full format (every tensor gathered onto rank 0, one
``torch.save``) and in the sharded one (each rank writes its own shards through torch.distributed.checkpoint).

Each measurement is a fresh ``torchrun --standalone --nproc-per-node 2`` (gloo, CPU) of this file with
``--worker FORMAT``: it builds the recipe's student, EMA teacher and AdamW state (``Trainer.setup_model``,
no data), then times ``Trainer.save`` (the checkpoint and its teacher export) and records rank 0's growth
of peak RSS during it (``ru_maxrss`` after minus the resident size before: what the save added on top)
and the bytes each rank wrote. Formats alternate (sharded, full, sharded, full, ...) so the machine's load
hits both alike. Prints one JSON object.

    python benchmarks/sharded_checkpoint.py [--recipe dinov2_vits14] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(fmt: str, recipe: str, out: str) -> None:
    import torch

    from meddino.config import load_config
    from meddino.pretrain.config import PretrainConfig
    from meddino.pretrain.distributed import barrier, cleanup, init_distributed
    from meddino.pretrain.engine import Trainer

    cfg = load_config(PretrainConfig, recipe, [f"out={out}", "data.path=unused", "train.fsdp=true",
                                               f"train.checkpoint_format={fmt}", "train.device=cpu"], "pretrain")
    env = init_distributed("cpu")
    try:
        trainer = Trainer(cfg, env)
        trainer.setup_model(10_000)
        # AdamW state as after a step (what a checkpoint holds): torch's zero-lr initialising step
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        get_optimizer_state_dict(trainer.student, trainer.optimizer)
        barrier()
        before, t0 = _rss_mb(), time.perf_counter()
        trainer.save(1)
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        n_params = sum(p.numel() for p in trainer.student.parameters())
        if env.is_main:
            ckpts = Path(out) / "checkpoints"
            files = {p.relative_to(ckpts).as_posix(): p.stat().st_size for p in ckpts.rglob("*") if p.is_file()}
            print(json.dumps({"format": fmt, "save_s": round(seconds, 3), "rank0_rss_before_mb": round(before, 1),
                              "rank0_peak_growth_mb": round(max(peak - before, 0.0), 1),
                              "student_params": int(n_params), "files": files,
                              "torch": torch.__version__}))
    finally:
        cleanup()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="dinov2_vits14")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.recipe, args.out)
        return
    runs = []
    env = dict(os.environ, OMP_NUM_THREADS="1", MEDDINO_QUIET="1")
    for _ in range(args.repeats):
        for fmt in ("sharded", "full"):
            with tempfile.TemporaryDirectory() as tmp:
                with open("/proc/loadavg") as fh:
                    load = float(fh.read().split()[0])
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                       __file__, "--worker", fmt, "--recipe", args.recipe, "--out", str(Path(tmp) / "run")]
                res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
                if res.returncode != 0:
                    sys.exit(res.stderr[-3000:])
                row = json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])
                row["load_average_at_start"] = load
                runs.append(row)
    summary = {}
    for fmt in ("sharded", "full"):
        rows = [r for r in runs if r["format"] == fmt]
        summary[fmt] = {"save_s_median": statistics.median(r["save_s"] for r in rows),
                        "rank0_peak_growth_mb_median": statistics.median(r["rank0_peak_growth_mb"] for r in rows)}
    summary["full_over_sharded_save_time"] = round(summary["full"]["save_s_median"]
                                                   / summary["sharded"]["save_s_median"], 2)
    print(json.dumps({"benchmark": "sharded_checkpoint", "recipe": args.recipe, "processes": 2, "backend": "gloo",
                      "cpu_count": os.cpu_count(), "summary": summary, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
