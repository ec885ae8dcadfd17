"""Timing primitives: repeated timed calls with warm-up, latency statistics, machine description.

Why per-call timing with synchronisation: CUDA kernels run asynchronously, so a wall-clock read right after
a forward call measures only the launch. :func:`time_calls` synchronises the device before starting and
before stopping the clock of every call, so each sample is the full latency of one forward pass (what a
user of online inference waits for), and the first ``warmup`` calls (cuDNN autotuning, allocator growth,
lazy initialisation) are run but not recorded.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; latency of each timed call in ms."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(max(warmup, 0)):
        fn()
    synchronize(device)
    out = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def latency_stats(ms: list[float] | np.ndarray, batch_size: int = 1) -> dict[str, float]:
    """Median, p95 (linear interpolation), mean and min latency in ms; FPS = frames per second at the
    median latency (``batch_size * 1000 / median``)."""
    a = np.asarray(ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latencies")
    median = float(np.median(a))
    return {
        "latency_ms_median": median,
        "latency_ms_p95": float(np.percentile(a, 95)),
        "latency_ms_mean": float(a.mean()),
        "latency_ms_min": float(a.min()),
        "fps": float(batch_size * 1000.0 / median) if median > 0 else float("inf"),
        "repeats": int(a.size),
    }


def count_params(module: torch.nn.Module) -> int:
    """Distinct parameters (shared tensors counted once)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers were measured: platform, CPU count, torch version, device name and memory."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["device_memory_gb"] = round(props.total_memory / 2**30, 2)
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["device_name"] = f"CPU ({info['processor']}, {info['cpu_count']} cores, {info['torch_threads']} threads)"
    return info
