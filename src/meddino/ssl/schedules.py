"""Per-iteration schedules (lr, weight decay, teacher momentum and temperature) and lr scaling rules.

Schedules are precomputed arrays wrapped in :class:`Schedule`: ``s(it)`` / ``s[it]`` gives the value at
iteration ``it`` and the final value past the end (as DINOv2's ``CosineScheduler``), ``s.values`` the
numpy array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from meddino.errors import ConfigError

__all__ = ["Schedule", "cosine_schedule", "linear_then_constant", "linear_warmup_then_constant", "scaled_lr"]


@dataclass(frozen=True)
class Schedule:
    """A precomputed schedule: ``values[it]`` for ``it < len``, ``final`` afterwards."""

    values: np.ndarray
    final: float

    def __call__(self, it: int) -> float:
        if it < 0:
            raise IndexError(f"schedule iteration must be >= 0, got {it}")
        return float(self.values[it]) if it < len(self.values) else float(self.final)

    def __getitem__(self, it: int) -> float:
        return self(it)

    def __len__(self) -> int:
        return len(self.values)

    def __array__(self, dtype=None, copy=None):  # noqa: ANN001 - numpy protocol
        return np.asarray(self.values, dtype=dtype)


def cosine_schedule(
    base: float,
    final: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup: float = 0.0,
    freeze_iters: int = 0,
) -> Schedule:
    """``freeze_iters`` zeros, then ``linspace(start_warmup, base, warmup_iters)`` (both ends included, as
    the originals' ``np.linspace``), then ``final + 0.5 (base - final)(1 + cos(pi i / n))`` for
    i = 0..n-1 with n = total - warmup - freeze. Length ``total_iters``; ``final`` past the end.
    """
    total_iters, warmup_iters, freeze_iters = int(total_iters), int(warmup_iters), int(freeze_iters)
    if min(total_iters, warmup_iters, freeze_iters) < 0:
        raise ConfigError("schedule: total, warm-up and freeze iterations must be >= 0")
    if warmup_iters + freeze_iters > total_iters:
        raise ConfigError(
            f"schedule: warm-up ({warmup_iters}) + freeze ({freeze_iters}) iterations exceed the total ({total_iters})"
        )
    n = total_iters - warmup_iters - freeze_iters
    i = np.arange(n)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * i / max(n, 1)))
    values = np.concatenate([np.zeros(freeze_iters), np.linspace(start_warmup, base, warmup_iters), cosine])
    return Schedule(values.astype(np.float64), float(final))


def linear_warmup_then_constant(
    start: float,
    end: float,
    warmup_epochs: int,
    total_epochs: int,
    iters_per_epoch: int,
    per_epoch: bool = False,
) -> Schedule:
    """Teacher temperature: linear ``start -> end`` over the warm-up, then constant ``end``.

    ``per_epoch=True`` (DINOv1): ``linspace(start, end, warmup_epochs)`` indexed by epoch, so the value
    is constant within an epoch. ``per_epoch=False`` (DINOv2/v3): ``linspace(start, end, warmup_epochs *
    iters_per_epoch)`` per iteration. Returned per iteration in both cases, length total_epochs * iters.
    """
    if iters_per_epoch <= 0 or total_epochs < 0 or warmup_epochs < 0:
        raise ConfigError("teacher temperature schedule: epochs must be >= 0 and iterations per epoch > 0")
    warmup_epochs = min(int(warmup_epochs), int(total_epochs))
    total = int(total_epochs) * int(iters_per_epoch)
    if per_epoch:
        per_ep = np.concatenate([np.linspace(start, end, warmup_epochs), np.full(total_epochs - warmup_epochs, end)])
        values = np.repeat(per_ep, iters_per_epoch)
    else:
        w = warmup_epochs * iters_per_epoch
        values = np.concatenate([np.linspace(start, end, w), np.full(total - w, end)])
    return Schedule(values.astype(np.float64), float(end))


def linear_then_constant(start: float, end: float, n: int) -> Schedule:
    """``linspace(start, end, n)`` (both ends included), then ``end``: the per-iteration teacher temperature
    warm-up of DINOv2/v3 over ``n`` iterations (any number, not a whole number of epochs)."""
    return Schedule(np.linspace(start, end, n).astype(np.float64), float(end))

def scaled_lr(base_lr: float, batch_size: int, rule: str) -> float:
    """Learning rate for a GLOBAL batch size: ``linear256`` (v1: base * B / 256), ``sqrt1024`` (v2/v3:
    base * sqrt(B / 1024)) or ``none`` (base as given)."""
    if batch_size <= 0:
        raise ConfigError(f"optim.batch_size must be > 0, got {batch_size}")
    if rule == "linear256":
        return base_lr * batch_size / 256.0
    if rule == "sqrt1024":
        return base_lr * math.sqrt(batch_size / 1024.0)
    if rule == "none":
        return float(base_lr)
    raise ConfigError(f"optim.lr_scaling: unknown rule {rule!r} (use linear256, sqrt1024 or none)")
