"""One GPU check of everything issue 13 asks to measure on CUDA, as one JSON object on stdout, in < 8 min.

Sections, each under its own time budget (a unit that would start past it is listed as skipped, and an
alarm at the whole suite's budget interrupts a unit that overruns, so the JSON is always printed):

- ``pretrain``: images/s per GPU and MFU of the engine's full step (``Trainer.train_step``, synthetic crops
  on the device, bf16 autocast) for DINOv2 (seed 000's 336/98 x 8 crops) and DINOv3 (336/144 x 8) on
  ViT-S/B/L, eager, then compiled (``train.compile=true``) while time is left; FLOPs per step counted with
  ``torch.utils.flop_counter.FlopCounterMode`` over one eager step; MFU = FLOPs/s over the GPU's dense
  bf16 peak from :data:`PEAK_BF16_TFLOPS` (unknown GPU: null). Peak memory of the timed steps.
- ``max_batch``: the largest per-GPU batch that trains one step, doubling from the timed batch until
  ``torch.cuda.OutOfMemoryError`` (caught, cache emptied), the limit or its time (3 % of the budget each).
- ``data_loader``: images/s of the pretraining DataLoader (the engine's ``CropDataset`` /
  ``StepBatchSampler`` / ``make_loader``) over synthetic 854 x 480 JPEG frames: decoded and cropped by the
  CPU workers (``crops.device=loader``), and decoded and cropped on the GPU (``crops.device=cuda``: the
  workers read bytes, ``DeviceCrops`` decodes the batch with nvJPEG and renders the views; timed to the
  rendered batch, synchronised). ``--smoke`` runs the device path on CPU tensors (``crops.device=cpu``).
- ``seg_latency``: batch-1 latency of every segmentation head as in ``seg_inference.py`` at seed 000's
  efficiency-table settings (ViT-S/14 reg4 at 336 px, 9 classes, EoMT with 13 queries, MONAI U-Net and
  ResNet-18 U-Net baselines), bf16 autocast.

Without CUDA it exits with one line and code 2, unless ``--smoke``: tiny models on the CPU, a few
iterations, the CUDA-only parts reported as skipped (tests/test_gpu_suite.py runs it so the script cannot
rot). Usage: ``bash benchmarks/gpu_suite.sh [> results/gpu_suite_cuda.json]`` or
``python benchmarks/gpu_suite.py --smoke``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

#: dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendor's data sheets; matched in order
#: against torch.cuda.get_device_name (a more specific name first)
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H800", 989.4),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.05), ("L40", 181.05), ("A10G", 70.0), ("L4", 121.0),
)

#: (method, size) -> recipe and the seed-000 crops (DINOv2 336/98 x 8, DINOv3 336/144 x 8)
RECIPES = {
    ("dinov2", "S"): "dinov2_vits14", ("dinov2", "B"): "dinov2_vitb14", ("dinov2", "L"): "dinov2_vitl14",
    ("dinov3", "S"): "dinov3_vits16", ("dinov3", "B"): "dinov3_vitb16", ("dinov3", "L"): "dinov3_vitl16",
}
CROPS = {"dinov2": (336, 98, 8), "dinov3": (336, 144, 8)}
BATCH = {"S": 64, "B": 32, "L": 16}


class OutOfTime(Exception):
    """The whole suite's alarm: the unit running is abandoned, the JSON still printed."""


def peak_bf16_tflops(name: str) -> float | None:
    """The GPU's dense bf16 peak by device name (None: not in the table, MFU is then null)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


class Budget:
    """Seconds left for a section; a unit asks ``fits(estimate)`` before it starts."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def fits(self, estimate: float) -> bool:
        return self.left() >= estimate


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- pretrain
def _trainer(recipe: str, overrides: list[str], device: torch.device, tmp: Path) -> Any:
    from meddino.profile.run import ProfileConfig, _pretrain_trainer

    sub = Path(tempfile.mkdtemp(dir=tmp))
    return _pretrain_trainer(ProfileConfig(recipe=recipe, recipe_overrides=overrides, device=device.type), device, sub)


def pretrain_unit(recipe: str, overrides: list[str], batch: int, steps: int, warmup: int, device: torch.device,
                  tmp: Path, peak: float | None, flops: float | None) -> tuple[dict[str, Any], Any]:
    """Time ``steps`` full steps after ``warmup`` (compilation happens there); FLOPs of one eager step
    unless given. Returns the row and the trainer (the max-batch search reuses it)."""
    from torch.utils.flop_counter import FlopCounterMode

    from meddino.profile.run import _first_trained_iteration, _train_steps

    t0 = time.perf_counter()
    tr = _trainer(recipe, overrides, device, tmp)
    it0 = _first_trained_iteration(tr)
    warm_s = _train_steps(tr, batch, warmup, it0, device) if warmup else 0.0
    if flops is None:
        with FlopCounterMode(display=False) as counter:
            _train_steps(tr, batch, 1, it0 + warmup, device)
        flops = float(counter.get_total_flops())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_step = []
    for i in range(steps):
        per_step.append(_train_steps(tr, batch, 1, it0 + warmup + 1 + i, device))
    s = statistics.median(per_step)
    row = {"recipe": recipe, "overrides": overrides, "batch_per_gpu": batch, "compiled": bool(tr.compiled),
           "s_per_step": s, "s_per_step_all": per_step, "warmup_s": warm_s, "images_per_s_per_gpu": batch / s,
           "tflops_per_step": flops / 1e12, "achieved_tflops": flops / s / 1e12,
           "mfu": (flops / s / 1e12 / peak) if peak else None,
           "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "unit_s": time.perf_counter() - t0}
    return row, tr


def max_batch(tr: Any, start: int, limit: int, device: torch.device, budget: Budget, step_s: float) -> dict[str, Any]:
    """Doubling from ``start`` (known to fit) while one more step is expected to fit in the budget."""
    from meddino.profile.run import _fits

    ok, failed, capped = start, None, None
    while True:
        nxt = ok * 2
        if nxt > limit:
            capped = f"limit {limit}"
            break
        if not budget.fits(4 * step_s * nxt / start + 5):
            capped = "time"
            break
        if _fits(tr, nxt, device):
            ok = nxt
        else:
            failed = nxt
            break
    return {"largest_fitting": ok, "first_failing": failed, "stopped_by": capped or "out of memory",
            "search": f"doubling from {start}"}


def run_pretrain(args: argparse.Namespace, device: torch.device, tmp: Path, peak: float | None,
                 budget: Budget, search_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Eager units first (each followed by its max-batch search of at most ``search_s``), then compiled
    ones while the budget lasts."""
    out: dict[str, Any] = {}
    mem: dict[str, Any] = {}
    eager_cost: dict[str, float] = {}
    flops_of: dict[str, float] = {}
    units = [(m, size, False) for size in args.sizes for m in args.methods]
    units += [(m, size, True) for size in args.sizes for m in args.methods]
    for method, size, compiled in units:
        key = f"{method}_vit{size.lower()}_{'compiled' if compiled else 'eager'}"
        base = f"{method}_vit{size.lower()}"
        if args.smoke:
            recipe, overrides, batch = f"{method}_tiny", [], 4
        else:
            g, loc, n = CROPS[method]
            recipe = RECIPES[(method, size)]
            overrides, batch = [f"crops.global_size={g}", f"crops.local_size={loc}", f"crops.n_local={n}"], BATCH[size]
        if compiled:
            if args.smoke:
                out[key] = {"skipped": "compiled runs: not in --smoke (inductor compile time on a CPU)"}
                continue
            overrides = [*overrides, "train.compile=true"]
        estimate = eager_cost.get(base, 20.0) * (3.0 if compiled else 1.0) + (45.0 if compiled else 0.0)
        if not budget.fits(estimate):
            out[key] = {"skipped": f"pretrain time budget (expected ~{estimate:.0f} s, {max(budget.left(), 0):.0f} s left)"}
            continue
        tr = None
        try:
            row, tr = pretrain_unit(recipe, overrides, batch, args.steps, args.warmup, device, tmp, peak,
                                    flops_of.get(base))
            out[key] = row
            if not compiled:
                eager_cost[base], flops_of[base] = row["unit_s"], row["tflops_per_step"] * 1e12
                if device.type == "cuda":
                    search = Budget(max(min(search_s, budget.left() - 30.0), 0.0))
                    mem[base] = max_batch(tr, batch, args.max_batch_limit, device, search, row["s_per_step"])
                else:
                    mem[base] = {"skipped": "needs CUDA (no device memory to search on a CPU)"}
        except torch.cuda.OutOfMemoryError as exc:
            out[key] = {"error": f"out of memory at batch {batch}: {str(exc).splitlines()[0]}"}
        except OutOfTime:
            out[key] = {"interrupted": "the suite's time budget ran out during this unit"}
            raise
        except Exception as exc:  # one unit's failure is reported, the suite goes on (--smoke: raised)
            if args.smoke:
                raise
            out[key] = {"error": _one_line(exc)}
        finally:
            del tr
            _free(device)
    return out, mem


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


# ---------------------------------------------------------------------------------------------- data
def _frames(folder: Path, n: int, smoke: bool) -> None:
    from data_pipeline import make_frames

    folder.mkdir(parents=True, exist_ok=True)
    if smoke:
        make_frames(folder, n, width=64, height=48)
    else:
        make_frames(folder, n)


def loader_rate(recipe: str, overrides: list[str], frames: Path, workers: int, batch: int, seconds: float,
                max_batches: int, tmp: Path) -> dict[str, Any]:
    """Images/s of the engine's loader pieces over ``frames`` (first batch excluded: worker start-up)."""
    from meddino.config import load_config
    from meddino.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # what the ViT backbones normalise with
    from meddino.data.device_crops import DeviceCrops
    from meddino.pretrain.config import PretrainConfig
    from meddino.pretrain.data import (
        CropDataset,
        StepBatchSampler,
        build_augmentation,
        build_source,
        device_batch,
        make_loader,
    )

    out = Path(tempfile.mkdtemp(dir=tmp))
    cfg = load_config(PretrainConfig, recipe, [*overrides, f"data.path={frames}", f"out={out}",
                                                f"data.num_workers={workers}", f"data.batch_size={batch}"], "pretrain")
    source = build_source(cfg, out=out)
    sampler = StepBatchSampler(len(source), batch, 0, 1, 0, 0, 10**6)
    augment = build_augmentation(cfg, IMAGENET_MEAN, IMAGENET_STD)
    on_device = cfg.crops.device != "loader"
    crops = DeviceCrops(augment, cfg.crops.device) if on_device else None
    loader = make_loader(CropDataset(source, augment, 0, encoded=on_device), sampler, workers,
                         pin_memory=torch.cuda.is_available())

    def batches():  # the training step's view of a batch: rendered on its device, finished
        for b in loader:
            if crops is not None:
                b = device_batch(b, crops)
                if cfg.crops.device == "cuda":
                    torch.cuda.synchronize()
            yield b

    it = batches()
    next(it)
    n, t0 = 0, time.perf_counter()
    for i, b in enumerate(it):
        n += int(b["global"].shape[1])
        if time.perf_counter() - t0 > seconds or i + 1 >= max_batches:
            break
    took = time.perf_counter() - t0
    del it, loader
    return {"images_per_s": n / took, "images": n, "seconds": took, "workers": workers, "batch": batch,
            "crops": f"2 x {cfg.crops.global_size} + {cfg.crops.n_local} x {cfg.crops.local_size}",
            "crops_device": cfg.crops.device}


def run_data(args: argparse.Namespace, tmp: Path, budget: Budget) -> dict[str, Any]:
    frames = tmp / "frames"
    n_frames = 8 if args.smoke else 128
    _frames(frames, n_frames, args.smoke)
    recipe = "dinov2_tiny" if args.smoke else "seed000_dinov2"
    workers = 0 if args.smoke else min(16, os.cpu_count() or 1)
    batch = 4 if args.smoke else 64
    seconds = 1.0 if args.smoke else 20.0
    res: dict[str, Any] = {"frames": n_frames, "frame_size": "64 x 48" if args.smoke else "854 x 480 JPEG q90"}
    device_path = "crops.device=cpu" if args.smoke else "crops.device=cuda"  # smoke: the same code on CPU tensors
    for label, extra in (("cpu_decode", []), ("gpu_decode", [device_path])):
        if label == "gpu_decode" and not args.smoke and not torch.cuda.is_available():
            res[label] = {"skipped": "needs CUDA"}
            continue
        if not budget.fits(seconds + 15):
            res[label] = {"skipped": "data-loader time budget"}
            continue
        try:
            res[label] = loader_rate(recipe, extra, frames, workers, batch, seconds, 3 if args.smoke else 10**6, tmp)
        except OutOfTime:
            raise
        except Exception as exc:
            if args.smoke:
                raise
            res[label] = {"error": _one_line(exc)}
    return res


# ---------------------------------------------------------------------------------------------- seg
def run_seg(args: argparse.Namespace, device: torch.device, budget: Budget) -> dict[str, Any]:
    import numpy as np
    from seg_inference import build, time_model

    if args.smoke:
        backbone, size, warmup, iters, runs = "random:dinov2_tiny", 32, 1, 2, [("linear", None), ("unet", None), ("eomt", None)]
    else:
        backbone, size, warmup, iters = "random:dinov2_vits14_reg4", 336, 10, 50
        runs = [("linear", None), ("unet", None), ("eomt", None), ("monai_unet", "-"), ("unet", "timm:resnet18")]
    res: dict[str, Any] = {"backbone": backbone, "input_size": size, "batch": 1, "classes": 9, "eomt_queries": 13,
                           "precision": "bf16 autocast" if device.type == "cuda" else "fp32", "heads": {}}
    for head, bb in runs:
        name = head if bb is None else f"{head} ({bb})"
        if not budget.fits(10):
            res["heads"][name] = {"skipped": "seg time budget"}
            continue
        torch.manual_seed(0)
        try:
            model = build(head, bb or backbone, 9, 13)
            times = time_model(model, size, device, warmup, iters)
            med = float(np.median(times))
            res["heads"][name] = {"latency_ms_median": med, "latency_ms_p95": float(np.percentile(times, 95)),
                                  "fps": 1000.0 / med, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
            del model
        except OutOfTime:
            raise
        except Exception as exc:
            if args.smoke:
                raise
            res["heads"][name] = {"error": _one_line(exc)}
        _free(device)
    return res


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models, a few iterations, CUDA parts skipped")
    ap.add_argument("--budget-s", type=float, default=440.0, help="the whole suite (default 440 s: < 8 min with start-up)")
    ap.add_argument("--methods", nargs="*", default=["dinov2", "dinov3"], choices=["dinov2", "dinov3"])
    ap.add_argument("--sizes", nargs="*", default=["S", "B", "L"], choices=["S", "B", "L"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per unit (default 5; --smoke 1)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per unit (default 2; --smoke 0)")
    ap.add_argument("--max-batch-limit", type=int, default=1024)
    ap.add_argument("--sections", default="pretrain,data_loader,seg_latency")
    args = ap.parse_args(argv)
    os.environ.setdefault("MEDDINO_QUIET", "1")
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_suite: CUDA is not available on this machine (python benchmarks/gpu_suite.py --smoke checks "
              "the script on a CPU)", file=sys.stderr)
        return 2
    if args.smoke:
        args.sizes, args.steps, args.warmup = ["S"], args.steps or 1, args.warmup if args.warmup is not None else 0
    args.steps = args.steps or 5
    args.warmup = 2 if args.warmup is None else args.warmup
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from meddino.profile.timing import machine_info

    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bf16_tflops(name) if device.type == "cuda" else None
    sections = [s for s in args.sections.split(",") if s]
    # shares of the budget: pretrain (eager with its max-batch searches, then compiled) 75 %, data 12 %,
    # seg 13 %; each max-batch search at most 3 % (6 of them)
    share = {"pretrain": 0.75, "max_batch_each": 0.03, "data_loader": 0.12, "seg_latency": 0.13}
    doc: dict[str, Any] = {"suite": "gpu_suite", "smoke": args.smoke, "machine": machine_info(device),
                           "device_name": name, "peak_bf16_tflops": peak,
                           "mfu_note": "MFU = FlopCounterMode FLOPs of one eager step / step time / dense bf16 peak"
                           if peak else ("MFU null: this GPU is not in PEAK_BF16_TFLOPS" if device.type == "cuda"
                                         else "MFU null: no GPU (--smoke)"),
                           "budget_s": args.budget_s, "sections": {}}

    def alarm(signum: int, frame: Any) -> None:
        raise OutOfTime()

    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, alarm)
        signal.alarm(int(args.budget_s) + 15)
    with tempfile.TemporaryDirectory(prefix="meddino-gpu-suite-") as tmp_name:
        tmp = Path(tmp_name)
        plan: list[tuple[str, Callable[[], Any]]] = []
        if "pretrain" in sections:
            def pretrain() -> None:
                rows, mem = run_pretrain(args, device, tmp, peak, Budget(args.budget_s * share["pretrain"]),
                                         args.budget_s * share["max_batch_each"])
                doc["sections"]["pretrain"], doc["sections"]["max_batch"] = rows, mem
            plan.append(("pretrain", pretrain))
        if "data_loader" in sections:
            plan.append(("data_loader", lambda: doc["sections"].__setitem__(
                "data_loader", run_data(args, tmp, Budget(args.budget_s * share["data_loader"])))))
        if "seg_latency" in sections:
            plan.append(("seg_latency", lambda: doc["sections"].__setitem__(
                "seg_latency", run_seg(args, device, Budget(args.budget_s * share["seg_latency"])))))
        for label, fn in plan:
            t = time.perf_counter()
            try:
                fn()
            except OutOfTime:
                doc["sections"].setdefault(label, {})["interrupted"] = "the suite's time budget ran out"
                break
            finally:
                doc.setdefault("section_s", {})[label] = time.perf_counter() - t
    if hasattr(signal, "SIGALRM"):
        signal.alarm(0)
    doc["elapsed_s"] = time.perf_counter() - start
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
