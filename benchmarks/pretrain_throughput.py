"""Pretraining throughput of meddino's SSL engine, per method, on ViT-S at the recipes' crop sizes.

For each of DINOv1 / v2 / v3 (recipes dinov1_vits16, dinov2_vits14, dinov3_vits16) it times full training
steps of the real engine (``Trainer.train_step``: teacher forward, student forward on 2 global + n local
crops, all losses, backward, clipping, AdamW, EMA, centre update) and, on the same crops, a bare backbone
forward + backward (the same student backbone, same drop path, cls-sum loss, no heads, no teacher, no
optimiser). It prints one JSON object with images/s, s/iteration (median of the timed steps; all of them listed), model FLOPs per image (counted with
``torch.utils.flop_counter.FlopCounterMode`` over one full step, forward + backward + teacher), the
achieved fraction of the machine's measured matmul peak, and the ratio full step / bare backbone
(the issue's target: <= 1.15). Data loading is excluded: the crops are synthetic tensors.

    python benchmarks/pretrain_throughput.py                 # CPU: batch 4, 3 timed steps
    python benchmarks/pretrain_throughput.py --device cuda --batch 64 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from meddino.profile.timing import machine_info

METHODS = {"dinov1": "dinov1_vits16", "dinov2": "dinov2_vits14", "dinov3": "dinov3_vits16"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """Measured dense matmul throughput (FLOP/s) for an n x n x n product: the machine's practical peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def synthetic_batch(cfg, batch: int, device: torch.device) -> dict:
    c = cfg.crops
    g = torch.randn(2, batch, 3, c.global_size, c.global_size, device=device)
    loc = torch.randn(c.n_local, batch, 3, c.local_size, c.local_size, device=device)
    return {"global": g, "local": loc, "slot": torch.arange(batch)}


def bench_method(name: str, recipe: str, args: argparse.Namespace, device: torch.device) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from meddino.config import load_config
    from meddino.pretrain.config import PretrainConfig
    from meddino.pretrain.distributed import DistEnv
    from meddino.pretrain.engine import Trainer

    out = tempfile.mkdtemp(prefix="meddino-bench-")
    overrides = [f"out={out}", f"data.batch_size={args.batch}", f"train.iterations={10_000}",
                 f"train.device={device.type}"]
    if args.n_local is not None:
        overrides.append(f"crops.n_local={args.n_local}")
    cfg = load_config(PretrainConfig, recipe, overrides, "pretrain")
    trainer = Trainer(cfg, DistEnv(0, 1, 0, device))
    trainer.setup_model(n_samples=10**6)
    trainer.student.train()
    batch = synthetic_batch(cfg, args.batch, device)
    n_img = args.batch

    # full SSL step (start past freeze-last-layer so that every parameter is updated)
    it0 = trainer.sched.freeze_last_layer_iters
    for i in range(args.warmup):
        trainer.train_step(it0 + i, batch)
    full_times = []
    for i in range(args.steps):
        _sync(device)
        t = time.perf_counter()
        trainer.train_step(it0 + args.warmup + i, batch)
        _sync(device)
        full_times.append(time.perf_counter() - t)
    full_s = statistics.median(full_times)
    with FlopCounterMode(display=False) as fc:
        trainer.train_step(it0 + args.warmup + args.steps, batch)
    full_flops = fc.get_total_flops()

    # bare backbone forward + backward on the same crops
    bb = trainer.student.backbone
    g = batch["global"].flatten(0, 1)
    loc = batch["local"].flatten(0, 1)
    ac = torch.autocast(device.type, dtype=torch.bfloat16) if trainer.autocast else torch.autocast("cpu", enabled=False)

    def bare() -> None:
        with ac:
            loss = bb.forward_features(g)["cls"].float().sum()
            if loc.shape[0]:
                loss = loss + bb.forward_features(loc)["cls"].float().sum()
        loss.backward()
        for p in bb.parameters():
            p.grad = None

    for _ in range(args.warmup):
        bare()
    bare_times = []
    for _ in range(args.steps):
        _sync(device)
        t = time.perf_counter()
        bare()
        _sync(device)
        bare_times.append(time.perf_counter() - t)
    bare_s = statistics.median(bare_times)
    with FlopCounterMode(display=False) as fc:
        bare()
    bare_flops = fc.get_total_flops()
    return {
        "recipe": recipe,
        "arch": cfg.model.arch,
        "global_crops": f"2 x {cfg.crops.global_size}",
        "local_crops": f"{cfg.crops.n_local} x {cfg.crops.local_size}",
        "batch_per_step": n_img,
        "s_per_iteration": full_s,
        "s_per_iteration_all": full_times,
        "images_per_s": n_img / full_s,
        "model_gflops_per_image": full_flops / n_img / 1e9,
        "bare_backbone_gflops_per_image": bare_flops / n_img / 1e9,
        "achieved_tflops": full_flops / full_s / 1e12,
        "bare_backbone_s_per_iteration": bare_s,
        "bare_backbone_s_per_iteration_all": bare_times,
        "ratio_full_step_to_bare_backbone": full_s / bare_s,
        "flop_ratio_full_step_to_bare_backbone": full_flops / bare_flops,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=None, help="images per step (default: cpu 4, cuda 64)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: cpu 3, cuda 20)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--n-local", type=int, default=None, help="local crops (default: the recipe's 8)")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    args = p.parse_args()
    os.environ.setdefault("MEDDINO_QUIET", "1")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (64 if cuda else 4)
    args.steps = args.steps or (20 if cuda else 3)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    peak_dtype = torch.bfloat16 if cuda else torch.float32
    peak = matmul_peak(device, peak_dtype, 8192 if cuda else 2048, 10)
    info = {
        **machine_info(device),
        "precision": "bf16 autocast" if cuda else "fp32",
        "data_loading": "excluded (synthetic crops already on the device)",
        "matmul_peak_tflops": peak / 1e12,
        "matmul_peak_dtype": str(peak_dtype).removeprefix("torch."),
        "batch": args.batch,
        "timed_steps": args.steps,
    }
    results = {}
    for name in args.methods:
        results[name] = bench_method(name, METHODS[name], args, device)
    # the best of a measurement before and after the runs (a shared machine's load varies)
    peak = max(peak, matmul_peak(device, peak_dtype, 8192 if cuda else 2048, 10))
    info["matmul_peak_tflops"] = peak / 1e12
    for r in results.values():
        r["fraction_of_matmul_peak"] = r["achieved_tflops"] * 1e12 / peak
    print(json.dumps({"machine": info, "methods": results, "target_ratio": 1.15}, indent=2))


if __name__ == "__main__":
    main()
