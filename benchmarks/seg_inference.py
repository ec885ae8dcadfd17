"""Online inference cost of the segmentation heads (seed 000's efficiency table): params, batch-1 latency, FPS.

    python benchmarks/seg_inference.py                       # ViT-S/14 reg4 (random weights) at 224, CPU
    python benchmarks/seg_inference.py --size 336 --device cuda --baselines

For every head (linear, unet, eomt; with --baselines also MONAI's U-Net and a ResNet-18 U-Net) it times
``model.class_scores(x)`` -- the full inference path: encoder, head, resize of the class scores to the input
size -- on one image, after warm-up, and prints one JSON document: per head the parameter counts (M),
median and 95th-percentile latency (ms) and FPS (1000 / median latency), plus the machine it ran on.
Weights are random: timing does not depend on them. On CUDA the model runs in bf16 autocast, as in
evaluation, and every timing is synchronised.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from meddino.models import resolve_backbone
from meddino.profile.timing import machine_info
from meddino.tasks.seg.heads import SegmentationModel


def build(head: str, backbone: str, num_classes: int, num_queries: int) -> SegmentationModel:
    if head == "monai_unet":
        return SegmentationModel(None, "monai_unet", num_classes)
    bb = resolve_backbone(backbone)
    eomt = {"num_queries": num_queries} if head == "eomt" else None
    return SegmentationModel(bb, head, num_classes, freeze_backbone=True, eomt=eomt)


@torch.inference_mode()
def time_model(model: SegmentationModel, size: int, device: torch.device, warmup: int, iters: int) -> list[float]:
    model.eval().to(device)
    x = torch.randn(1, 3, size, size, device=device)
    amp = device.type == "cuda"
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            model.class_scores(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000.0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="random:dinov2_vits14_reg4")
    ap.add_argument("--size", type=int, default=224, help="input side (224; seed 000 uses 336 for ViT-S/14)")
    ap.add_argument("--heads", default="linear,unet,eomt")
    ap.add_argument("--baselines", action="store_true", help="also MONAI U-Net and timm:resnet18 + U-Net decoder")
    ap.add_argument("--classes", type=int, default=9, help="9 = CholecSeg8k without seed 000's excluded classes")
    ap.add_argument("--queries", type=int, default=13, help="EoMT queries (13 in seed 000's surgical configs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    runs = [(h, args.backbone) for h in args.heads.split(",") if h]
    if args.baselines:
        runs += [("monai_unet", "-"), ("unet", "timm:resnet18")]
    results = []
    for head, backbone in runs:
        torch.manual_seed(0)
        model = build(head, backbone, args.classes, args.queries)
        times = time_model(model, args.size, device, args.warmup, args.iters)
        n_total = sum(p.numel() for p in model.parameters())
        n_head = sum(p.numel() for p in model.head.parameters())
        med = float(np.median(times))
        results.append({
            "head": head,
            "backbone": backbone,
            "params_total_m": round(n_total / 1e6, 3),
            "params_head_m": round(n_head / 1e6, 3),
            "latency_ms_median": round(med, 3),
            "latency_ms_p95": round(float(np.percentile(times, 95)), 3),
            "fps": round(1000.0 / med, 2),
        })
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    doc = {"benchmark": "seg_inference", "input_size": args.size, "batch_size": 1, "warmup": args.warmup,
           "iters": args.iters, "num_classes": args.classes, "machine": machine_info(device), "results": results}
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
