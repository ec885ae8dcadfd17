"""Linear-probe grid cost: a 16-head grid trained in one pass vs one head vs 16 heads trained one after another,
all on the same cached features. Prints JSON (with machine info) to stdout.

    python benchmarks/linear_grid.py [--n 20000] [--dim 384] [--classes 14] [--epochs 5] [--device cpu|cuda]

The grid is 4 input sets (CLS, CLS+mean patch, last-4 CLS, last-4 CLS+mean patch, with the dimensions of a
ViT of width ``dim``) x 2 lrs x 2 weight decays = 16 heads, multi-label BCE (as NIH ChestX-ray14).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from meddino.tasks.classify.linear_heads import fit_heads
from meddino.profile.timing import machine_info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="cached samples")
    ap.add_argument("--dim", type=int, default=384, help="backbone width D (ViT-S: 384)")
    ap.add_argument("--classes", type=int, default=14, help="labels (multi-label)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    args = ap.parse_args()

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    d = args.dim
    dims = {"cls": d, "cls_patch": 2 * d, "cls_last4": 4 * d, "cls_patch_last4": 5 * d}
    inputs = [torch.randn(args.n, k, generator=gen).to(device) for k in dims.values()]
    targets = (torch.rand(args.n, args.classes, generator=gen) < 0.1).float().to(device)
    lrs, wds = [0.01, 0.1], [0.0, 1e-4]
    combos = [(lr, wd) for lr in lrs for wd in wds]
    common = dict(task="multilabel", out_dim=args.classes, epochs=args.epochs, batch_size=args.batch_size)

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        return best

    grid_s = timed(lambda: fit_heads(inputs, targets, lrs=[c[0] for c in combos], weight_decays=[c[1] for c in combos],
                                     **common))
    one_s = timed(lambda: fit_heads(inputs[-1:], targets, lrs=[0.01], weight_decays=[0.0], **common))

    def sequential() -> None:
        for x in inputs:
            for lr, wd in combos:
                fit_heads([x], targets, lrs=[lr], weight_decays=[wd], **common)

    seq_s = timed(sequential)
    print(json.dumps({
        "benchmark": "linear_grid",
        "heads_in_grid": len(inputs) * len(combos),
        "n": args.n, "dim": d, "input_dims": dims, "classes": args.classes, "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seconds": {"grid_16_heads_one_pass": round(grid_s, 4), "one_head": round(one_s, 4),
                    "16_heads_sequential": round(seq_s, 4)},
        "grid_over_one_head": round(grid_s / one_s, 2),
        "sequential_over_grid": round(seq_s / grid_s, 2),
        "machine": machine_info(device),
    }, indent=2))


if __name__ == "__main__":
    main()
