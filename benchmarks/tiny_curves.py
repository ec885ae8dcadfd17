"""Loss and training-health curves of the tiny pretraining recipes on the demo's bundled images.

Runs ``meddino pretrain --config <recipe>`` (the real CLI, one subprocess per run) on the unlabeled MNI152 +
pydicom images that ``meddino demo`` builds, and prints one JSON object with, per run, the logged curves
(DINO / iBOT / KoLeo loss, teacher and student entropy against ln K, KL, prototype usage, effective rank)
and the collapse warnings the engine raised. Extra ``--set key=value`` overrides apply to every run, and
``--variant NAME key=value ...`` adds a named run (e.g. to record one of the settings of docs/pretrain.md's
collapse study next to the shipped recipes). CPU only, a few minutes:

    python benchmarks/tiny_curves.py --iterations 300 > benchmarks/results/tiny_curves_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from meddino.profile.timing import machine_info

CURVE_KEYS = ("dino", "ibot", "koleo", "teacher_entropy", "student_entropy", "kl_teacher_student",
              "prototype_usage", "effective_rank", "teacher_temp", "momentum", "lr")


def run_one(recipe: str, data: Path, out: Path, iterations: int, batch: int, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "meddino", "pretrain", "--config", recipe, f"data.path={data}", f"out={out}",
           f"train.iterations={iterations}", f"data.batch_size={batch}", "train.log_every=10",
           f"train.checkpoint_every={iterations}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"recipe": recipe, "overrides": overrides, "exit_code": proc.returncode,
                "stderr_tail": proc.stderr.strip().splitlines()[-3:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curves = {k: [r.get(k) for r in rows] for k in CURVE_KEYS if any(k in r for r in rows)}
    ln_k = next((r["ln_k"] for r in rows if "ln_k" in r), None)
    last = rows[-1]
    return {
        "recipe": recipe,
        "overrides": overrides,
        "wall_s": round(wall, 1),
        "ln_k": ln_k,
        "steps": [r["step"] for r in rows],
        "curves": curves,
        "final": {k: last.get(k) for k in CURVE_KEYS if k in last},
        "final_teacher_entropy_over_ln_k": (last["teacher_entropy"] / ln_k) if ln_k and "teacher_entropy" in last else None,
        "min_teacher_entropy_over_ln_k": (min(r["teacher_entropy"] for r in rows if "teacher_entropy" in r) / ln_k) if ln_k else None,
        "collapse_warnings": [[r["step"], r["collapse_warning"]] for r in rows if "collapse_warning" in r],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="*", default=["dinov1_tiny", "dinov2_tiny", "dinov3_tiny"])
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=32, help="demo image size (the tiny recipes' global crop)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variant", action="append", nargs="+", default=[], metavar=("RECIPE", "KEY=VALUE"),
                   help="an extra run: recipe followed by its overrides")
    args = p.parse_args()

    from meddino.data.bundled import build_demo_data

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = build_demo_data(tmp_path / "data", size=args.size, step=1)
        n_images = sum(1 for _ in data.unlabeled.iterdir())
        runs = []
        plan = [(r, list(args.overrides)) for r in args.recipes]
        plan += [(v[0], list(args.overrides) + list(v[1:])) for v in args.variant]
        for i, (recipe, overrides) in enumerate(plan):
            print(f"== {recipe} {' '.join(overrides)}", file=sys.stderr)
            runs.append(run_one(recipe, data.unlabeled, tmp_path / f"run{i}", args.iterations, args.batch, overrides))
    print(json.dumps({
        "benchmark": "tiny_curves",
        "machine": machine_info(torch.device("cpu")),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "data": {"source": "meddino demo images (nilearn MNI152 slices + pydicom test images)",
                 "n_images": n_images, "size": args.size},
        "iterations": args.iterations,
        "batch_size": args.batch,
        "runs": runs,
    }, indent=1))


if __name__ == "__main__":
    main()
