"""Per-frame latency of online phase recognition: ViT backbone + causal MS-TCN step, batch 1.

Measures what ``meddino predict phase`` does per frame (normalise a 224 px frame, backbone forward, one MS-TCN
step with the rolling causal state) on random weights: latency does not depend on the weight values.
Prints one JSON object with the machine description (platform, CPU count, torch version, device name),
median / p95 / mean latency in ms and FPS, parameters in millions, for the backbone alone, the MS-TCN step
alone and both together. CPU by default; ``--device cuda`` when a GPU is lent (bf16 autocast, synchronised).

    python benchmarks/phase_online.py [--arch vit_small_patch14_reg4_dinov2] [--frames 200] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from meddino.models import build_backbone
from meddino.profile.timing import machine_info
from meddino.tasks.phase.mstcn import MSTCN, MSTCNConfig, OnlineMSTCN


def stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    med = float(np.median(a))
    return {"median_ms": round(med, 3), "p95_ms": round(float(np.percentile(a, 95)), 3),
            "mean_ms": round(float(a.mean()), 3), "fps": round(1000.0 / med, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit_small_patch14_reg4_dinov2")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--classes", type=int, default=7)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = build_backbone(args.arch, img_size=args.img_size).to(device).eval()
    mstcn = MSTCN(MSTCNConfig(in_dim=backbone.embed_dim, num_classes=args.classes, num_stages=args.stages,
                              num_layers=args.layers, channels=args.channels)).to(device).eval()
    online = OnlineMSTCN(mstcn)
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)
    frames = torch.randint(0, 256, (args.frames + args.warmup, args.img_size, args.img_size, 3), dtype=torch.uint8)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    total, bb_ms, tcn_ms = [], [], []
    with torch.no_grad():
        for i, frame in enumerate(frames):
            sync()
            t0 = time.perf_counter()
            x = (frame.to(device).permute(2, 0, 1)[None].float() / 255.0 - mean) / std
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                feat = backbone.forward_features(x)["cls"]
            sync()
            t1 = time.perf_counter()
            online.step(feat.float())
            sync()
            t2 = time.perf_counter()
            if i >= args.warmup:
                total.append((t2 - t0) * 1000)
                bb_ms.append((t1 - t0) * 1000)
                tcn_ms.append((t2 - t1) * 1000)
    params = lambda m: round(sum(q.numel() for q in m.parameters()) / 1e6, 3)  # noqa: E731
    print(json.dumps({
        "benchmark": "phase_online",
        "arch": args.arch,
        "img_size": args.img_size,
        "frames": args.frames,
        "mstcn": {"stages": args.stages, "layers": args.layers, "channels": args.channels,
                  "receptive_field_frames": mstcn.receptive_field},
        "params_m": {"backbone": params(backbone), "mstcn": params(mstcn)},
        "latency": {"total": stats(total), "backbone": stats(bb_ms), "mstcn_step": stats(tcn_ms)},
        "machine": machine_info(device),
    }, indent=2))


if __name__ == "__main__":
    main()
