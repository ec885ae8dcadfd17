"""Device choice and mixed precision, the same for every verb: CUDA with bf16 autocast where available,
CPU fp32 otherwise, one code path."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from meddino.errors import ConfigError


def pick_device(spec: str = "auto") -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; an impossible choice is a ConfigError."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device: cannot parse {spec!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {spec} asked for but CUDA is not available (use auto or cpu)")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (tasks whose runs must repeat exactly)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool = True) -> Any:
    """bf16 autocast on CUDA; nothing (fp32) on CPU."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)
