"""Teacher-side centering: DINOv1's EMA centre and DINOv2/v3's Sinkhorn-Knopp.

Both turn raw teacher logits (head outputs) into target distributions for the student's cross-entropy.
They are pure functions: the EMA centre is passed in and a new one is returned, so the caller owns the
state (and checkpoints it; DINOv1 keeps it as ``dino_loss.center``).
"""

from __future__ import annotations

import torch

from meddino.ssl.dist import all_reduce_max, all_reduce_sum

__all__ = ["softmax_center", "update_center", "sinkhorn_knopp"]

# Largest exponent fed to exp() in sinkhorn_knopp: e^60 ~ 1e26 leaves room for sums over ~1e12 entries.
_MAX_EXPONENT = 60.0


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 to float32; float32 and float64 are kept (tests run the maths in float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def softmax_center(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Teacher targets ``softmax((t - c) / tau_t)`` over the last (prototype) dimension.

    DINOv1's centring/sharpening and DINOv2's ``softmax_center_teacher``. ``center`` broadcasts against
    ``teacher_logits`` ([1, K] for [N, K] or [T, B, K] logits). Computed in at least float32.
    """
    if teacher_temp <= 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
    t = _at_least_fp32(teacher_logits.detach())
    return torch.softmax((t - center.to(t.dtype)) / teacher_temp, dim=-1)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """EMA update of the DINO centre: ``c <- m c + (1 - m) mean(teacher rows)``; returns a new tensor.

    The mean runs over every teacher row of every crop ([T*B, K] or [T, B, K]) and over all ranks. The
    originals divide the all-reduced sum by ``rows * world_size`` (equal batches per rank); meddino divides
    by the all-reduced row count, which is the same number for equal batches and still a true mean when
    ranks hold different numbers of rows (the iBOT variant, where the masked-patch count differs per rank).
    """
    logits = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    total = all_reduce_sum(logits.to(center.dtype).sum(dim=0, keepdim=True))
    count = all_reduce_sum(torch.tensor(float(logits.shape[0]), dtype=center.dtype, device=center.device))
    batch_center = total / count
    return center * momentum + batch_center * (1.0 - momentum)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets [N, K] (DINOv2 optional, DINOv3 always), rows summing to 1.

    Reproduces the official procedure: ``Q = exp(t / tau)^T`` (K x N); ``Q /= sum(Q)`` (all-reduced);
    ``n_iterations`` times: each prototype row divided by its all-reduced sum and by K, then each sample
    column divided by its sum and by B, with B the GLOBAL number of samples (all-reduced N, so ranks may
    hold different numbers of rows, as with masked patches); finally ``Q * B`` transposed.

    Deliberate difference: when the largest exponent ``max(t) / tau`` (over all ranks) exceeds 60, all
    exponents are shifted down so that it is 60. A constant shift cancels exactly in the first
    normalisation, so the result is the official one, but ``exp`` no longer overflows fp32 (at
    ``t / 0.04 > 88``, i.e. logits above ~3.5, a real risk with DINOv3's plain-Linear head) where the
    originals would return NaNs. Below 60 nothing is shifted, so small exponents underflow exactly as in
    the originals. Computed in at least float32 whatever the input dtype (bf16 under autocast).
    """
    if teacher_temp <= 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
    if teacher_logits.dim() != 2:
        raise ValueError(f"sinkhorn_knopp expects [N, K] logits, got shape {tuple(teacher_logits.shape)}")
    t = _at_least_fp32(teacher_logits.detach())
    n_local, k = t.shape
    if n_local > 0:
        local_max = t.max()
    else:  # a rank without masked patches still has to join every all-reduce below
        local_max = torch.tensor(float("-inf"), dtype=t.dtype, device=t.device)
    shift = (all_reduce_max(local_max) / teacher_temp - _MAX_EXPONENT).clamp(min=0.0)
    # Kept in the logits' [N, K] layout (the original's Q is its transpose) and divided in place: the
    # original's reductions over the transposed view read [N, 65536] with a stride of 65536 floats, which
    # made this function take ~5x the teacher head's matmul for DINOv3's masked patches on CPU.
    q = t / teacher_temp  # [N, K]; then in place: the same values without two more [N, K] buffers
    q.sub_(shift).exp_()
    b = all_reduce_sum(torch.tensor(float(n_local), dtype=t.dtype, device=t.device))
    q.div_(all_reduce_sum(q.sum()))
    for _ in range(n_iterations):
        q.div_(all_reduce_sum(q.sum(dim=0, keepdim=True)) * k)  # each prototype: its global sum, then K
        q.div_(q.sum(dim=1, keepdim=True) * b)  # each sample: its sum, then the global B
    return q.mul_(b)
