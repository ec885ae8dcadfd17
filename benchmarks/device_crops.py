"""The GPU data path (``crops.device=cuda``) on its device: agreement with the CPU and throughput.

Prepared for a machine with a GPU (not run on one in this project yet); ``--device cpu`` runs the same
script on the CPU as a smoke test. On 854 x 480 JPEG frames, 2 x 224 + 8 x 96 crops (DINOv2 recipe):

1. agreement: the same encoded samples (same views) rendered by ``DeviceCrops`` on ``--device`` and on the
   CPU: mean and max absolute difference in grey levels (expected: within a few levels at worst, from the
   float resize and the decoder; nvJPEG's IDCT may differ from libjpeg's by a level);
2. throughput: batches of ``--batch`` images, the worker's part (header, views, bytes) timed on the CPU, the
   device part split into decode and render, synchronised (``torch.cuda.synchronize``), best of
   ``--repeats``; images/s of the device part and what one worker core delivers.

    python benchmarks/device_crops.py [--device cuda] [--n 128] [--batch 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_pipeline import make_frames  # noqa: E402
from meddino.data.device_crops import DeviceCrops, encode  # noqa: E402
from meddino.data.multicrop import MultiCropAugmentation, sample_generator  # noqa: E402
from meddino.profile.timing import machine_info  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=128, help="generated frames")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --device cpu for the smoke test)")
    torch.set_num_threads(1)
    aug = MultiCropAugmentation("v2")
    with tempfile.TemporaryDirectory(prefix="meddino-devcrops-") as tmp:
        paths = make_frames(Path(tmp), args.n)
        t0 = time.process_time()
        enc = [encode(aug, p, sample_generator(0, 0, i)) for i, p in enumerate(paths)]
        worker_img_per_s = len(enc) / (time.process_time() - t0)

    # 1. agreement with the CPU on the same samples
    ref, _, _ = DeviceCrops(aug, "cpu")(enc[: args.batch])
    out, _, _ = DeviceCrops(aug, device)(enc[: args.batch])
    std = aug.std.view(1, 1, 3, 1, 1)  # back to grey levels: x * std * 255
    agreement = {}
    for key in ("global", "local"):
        d = ((out[key].cpu() - ref[key]) * std * 255).abs()
        agreement[key] = {"mean_levels": round(float(d.mean()), 4), "max_levels": round(float(d.max()), 2)}

    # 2. throughput of the device part
    crops = DeviceCrops(aug, device)
    batches = [enc[i : i + args.batch] for i in range(0, len(enc) - args.batch + 1, args.batch)]
    crops(batches[0])  # warm-up (nvJPEG handles, kernels)
    _sync(device)
    best = {"decode_s": float("inf"), "total_s": float("inf")}
    for _ in range(args.repeats):
        dec = tot = 0.0
        for b in batches:
            _sync(device)
            t = time.perf_counter()
            crops.decode(b)
            _sync(device)
            dec += time.perf_counter() - t
            t = time.perf_counter()
            crops(b)
            _sync(device)
            tot += time.perf_counter() - t
        best["decode_s"], best["total_s"] = min(best["decode_s"], dec), min(best["total_s"], tot)
    n_img = len(batches) * args.batch
    report = {
        "benchmark": "device_crops",
        "device": str(device),
        "frames": {"n": args.n, "size": [854, 480], "format": "JPEG q90"},
        "crops": "2x224 + 8x96, DINOv2 recipe (blur quirk)",
        "batch": args.batch,
        "agreement_with_cpu": agreement,
        "device_img_per_s": round(n_img / best["total_s"], 1),
        "decode_img_per_s": round(n_img / best["decode_s"], 1),
        "decode_share": round(best["decode_s"] / best["total_s"], 3),
        "worker_img_per_s_per_core": round(worker_img_per_s, 1),
        "machine": machine_info(device),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
