"""Distributed helpers for the SSL objectives: all-reduce when a process group is up, identity otherwise.

The official DINO code all-reduces inside its losses (centre update, Sinkhorn-Knopp sums, the number of
masked patches). These helpers let the same pure functions run unchanged on one CPU process and under
``torchrun`` with any backend. They never mutate their input: the all-reduce runs on a copy, so a caller's
tensor (often a view into a larger buffer) is left as it was.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "rank", "all_reduce_sum", "all_reduce_max"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks as a new tensor; ``t`` itself when not distributed.

    Not differentiable (like ``dist.all_reduce``): use it on statistics computed under ``no_grad``.
    """
    if not is_distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``t`` over all ranks as a new tensor; ``t`` itself when not distributed."""
    if not is_distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out
