"""EMA teacher update: theta_t <- m theta_t + (1 - m) theta_s, in place, with fused foreach kernels."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ema_update_"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip(name: str) -> str:
    """Drop DDP (``module.``) and torch.compile (``_orig_mod.``) wrapper prefixes from a parameter name."""
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p) :], True
        name = name.replace("._orig_mod.", ".")
    return name


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In-place EMA of every teacher parameter towards the student parameter of the same name.

    Like the originals, all parameters are updated (also ones with requires_grad=False, e.g. a frozen
    weight-norm g, which then stays 1) and buffers are not. Names are matched after stripping DDP and
    torch.compile wrapper prefixes, so a DDP-wrapped student can update a plain teacher; a parameter
    missing on either side is a bug and raises KeyError. Uses ``torch._foreach_mul_`` /
    ``torch._foreach_add_`` (one fused launch per device/dtype group instead of one per tensor).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    t_params = {_strip(n): p for n, p in teacher.named_parameters()}
    s_params = {_strip(n): p for n, p in student.named_parameters()}
    if t_params.keys() != s_params.keys():
        only_t = sorted(t_params.keys() - s_params.keys())[:3]
        only_s = sorted(s_params.keys() - t_params.keys())[:3]
        raise KeyError(f"EMA teacher/student parameters differ: teacher-only {only_t}, student-only {only_s}")
    names = list(t_params)
    t_list = [t_params[n] for n in names]
    s_list = [s_params[n].to(t_params[n].dtype) if s_params[n].dtype != t_params[n].dtype else s_params[n] for n in names]
    for t, s, n in zip(t_list, s_list, names):
        if t.shape != s.shape:
            raise ValueError(f"EMA shape mismatch for {n}: teacher {tuple(t.shape)} vs student {tuple(s.shape)}")
    if not t_list:
        return
    torch._foreach_mul_(t_list, momentum)
    torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)
