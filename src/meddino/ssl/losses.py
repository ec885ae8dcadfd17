"""DINO, iBOT, KoLeo and Gram-anchoring losses as pure functions (tensors in, scalar tensor out).

Each reproduces the corresponding term of the official DINOv1/v2/v3 training code numerically; where
meddino deliberately differs, the docstring says so. Everything is computed in at least float32 (the
originals upcast or disable autocast for these terms); float64 inputs stay float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meddino.errors import ConfigError

__all__ = ["dino_loss", "ibot_loss", "ibot_patch_weights", "koleo_loss", "gram_loss"]


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def dino_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    student_temp: float = 0.1,
    local_weight: float = 1.0,
) -> torch.Tensor:
    """Multi-crop DINO cross-entropy averaged over all (teacher crop i, student crop v != i) pairs.

    ``student_logits`` [S, B, K]: S student crops, the first T of them the global crops in the same order
    as the teacher's; ``teacher_probs`` [T, B, K] (centred and sharpened targets). For each pair the loss
    is ``mean_b(-sum_k q[i,b,k] log_softmax(s[v,b] / tau_s)_k)``; pairs with v == i are skipped. With 2
    global + 8 local crops that is the 18-pair mean of DINOv1 and DINOv2, and DINOv3's einsum with the
    diagonal removed.

    ``local_weight`` (DINOv3's ``reweight_dino_local_loss``) multiplies the local-crop pairs (v >= T) while
    the denominator stays the unweighted number of pairs:
    ``(sum_global_pairs + local_weight * sum_local_pairs) / (T*(T-1) + T*(S-T))``, which is DINOv3's
    ``global_scale * mean_global + local_scale * local_weight * mean_local`` with scales = terms / all terms.
    """
    if student_logits.dim() != 3 or teacher_probs.dim() != 3:
        raise ValueError("dino_loss expects student_logits [S, B, K] and teacher_probs [T, B, K]")
    n_student, batch, _ = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    if teacher_probs.shape[1:] != student_logits.shape[1:] or n_teacher > n_student:
        raise ValueError(
            f"dino_loss: teacher {tuple(teacher_probs.shape)} does not match student {tuple(student_logits.shape)}"
        )
    log_p = F.log_softmax(_at_least_fp32(student_logits) / student_temp, dim=-1)
    q = teacher_probs.to(log_p.dtype)
    # ce[i, v] = -sum_{b,k} q[i,b,k] log_p[v,b,k] / B: one matmul over all (teacher, student) crop pairs.
    ce = -torch.einsum("ibk,vbk->iv", q, log_p) / batch
    weights = torch.ones(n_teacher, n_student, dtype=ce.dtype, device=ce.device)
    weights[:, n_teacher:] = local_weight
    weights.fill_diagonal_(0.0)
    n_pairs = n_teacher * n_student - n_teacher
    if n_pairs == 0:
        raise ValueError("dino_loss needs at least two crops (no pair with v != i)")
    return (ce * weights).sum() / n_pairs


def ibot_patch_weights(masks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-masked-patch weights ``1 / (masked patches of its image)``, in ``masks.flatten().nonzero()`` order.

    ``masks`` [B, N] bool. Returns [M] with M = masks.sum(); an image without masked patches contributes
    no entry. This is DINOv2/v3's ``masks_weight`` (computed in their collate function).
    """
    if masks.dim() != 2:
        raise ValueError(f"ibot_patch_weights expects masks [B, N], got {tuple(masks.shape)}")
    masks = masks.bool()
    per_image = masks.sum(dim=1, keepdim=True).clamp(min=1).to(dtype)
    return (1.0 / per_image).expand_as(masks)[masks]


def ibot_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_probs: torch.Tensor,
    patch_weights: torch.Tensor,
    n_crops: int,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """iBOT masked-patch loss: ``sum_i w_i * (-sum_k t_ik log_softmax(s_i / tau_s)_k) / n_crops``.

    ``student_patch_logits`` and ``teacher_patch_probs`` are [M, K] for the M masked patches of this
    rank; ``patch_weights`` [M] from :func:`ibot_patch_weights`; ``n_crops`` the number of global crops in
    the local batch (2 * B_local in the originals), so each masked image contributes the mean over its
    masked patches and the result is the mean over crops (unmasked crops count as zero, as in the originals).
    """
    if n_crops <= 0:
        raise ValueError(f"ibot_loss: n_crops must be > 0, got {n_crops}")
    if student_patch_logits.shape != teacher_patch_probs.shape or student_patch_logits.dim() != 2:
        raise ValueError(
            f"ibot_loss: student {tuple(student_patch_logits.shape)} and teacher "
            f"{tuple(teacher_patch_probs.shape)} must both be [M, K]"
        )
    log_p = F.log_softmax(_at_least_fp32(student_patch_logits) / student_temp, dim=-1)
    per_patch = -(teacher_patch_probs.to(log_p.dtype) * log_p).sum(dim=-1)
    return (per_patch * patch_weights.to(log_p.dtype)).sum() / n_crops


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser on one crop's [B, D] CLS features (DINOv2/v3, per GPU).

    Features are L2-normalised in float32 (or float64), each sample's nearest neighbour is found by dot
    product with the diagonal excluded, and the loss is ``-mean log(d(x_i, x_nn) + eps)``. The distance is
    torch's ``PairwiseDistance(p=2, eps=eps)``, which adds eps to the DIFFERENCE before the norm:
    ``d = ||x_i - x_nn + eps||_2`` (so identical points give ``sqrt(D) * eps``, not 0); reproduced with
    ``F.pairwise_distance``. The originals fill the diagonal with -1 rather than -inf; the two differ only
    for exactly antipodal pairs, where the originals could pick the sample itself.
    """
    if features.dim() != 2:
        raise ValueError(f"koleo_loss expects [B, D] features, got {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise ConfigError(
            "koleo_loss needs at least 2 samples per process: raise the per-GPU batch size or set the KoLeo weight to 0"
        )
    x = F.normalize(_at_least_fp32(features), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(float("-inf"))
        nn_index = dots.argmax(dim=1)
    dist = F.pairwise_distance(x, x[nn_index], p=2.0, eps=eps)
    return -torch.log(dist + eps).mean()


def gram_loss(
    student_patches: torch.Tensor,
    teacher_patches: torch.Tensor,
    img_level: bool = True,
    remove_neg: bool = False,
    remove_only_teacher_neg: bool = False,
    normalize: bool = True,
    tokens_used: str = "all",
    masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """DINOv3 Gram anchoring: MSE between the patch-similarity (Gram) matrices of student and Gram teacher.

    Patch features [B, N, D] are L2-normalised (``normalize``, the official ``gram.normalized``), then
    ``G = X X^T`` per image ([B, N, N], ``img_level=True``, the 7B recipe) or over all B*N patches of the
    local batch (one [BN, BN] matrix, ``img_level=False``, the config default). ``tokens_used`` ("all",
    "masked", "unmasked"; the official ``gram.tokens_used``) keeps only the patches where the iBOT ``masks``
    [B, N] are true / false before the Gram matrix, which is then one [M, M] matrix over the selected
    patches of the batch (so it needs ``img_level=False``, as the original asserts); with no patch selected
    the loss is 0. ``remove_neg`` zeroes negative entries in both matrices.
    ``remove_only_teacher_neg`` zeroes the teacher's negative entries only: the original also tries to
    zero student entries where both are negative, but does so after the teacher has been clipped, so that
    step never fires; meddino reproduces the effective behaviour. Loss = mean of squared differences
    over all entries (``torch.nn.MSELoss``). The teacher side is detached.
    """
    if remove_neg and remove_only_teacher_neg:
        raise ConfigError("gram: remove_neg and remove_only_teacher_neg are mutually exclusive")
    if student_patches.shape != teacher_patches.shape or student_patches.dim() != 3:
        raise ValueError(
            f"gram_loss: student {tuple(student_patches.shape)} and teacher {tuple(teacher_patches.shape)} "
            "must both be [B, N, D]"
        )
    if tokens_used not in ("all", "masked", "unmasked"):
        raise ConfigError(f"gram: tokens_used must be all, masked or unmasked, got {tokens_used!r}")
    s = _at_least_fp32(student_patches)
    t = teacher_patches.detach().to(s.dtype)
    if tokens_used != "all":
        if img_level:
            raise ConfigError(f"gram: tokens_used={tokens_used} needs img_level=false (one matrix over the batch)")
        if masks is None or tuple(masks.shape) != tuple(s.shape[:2]):
            raise ValueError(f"gram_loss: tokens_used={tokens_used} needs masks [B, N] matching the patches")
        keep = masks.bool() if tokens_used == "masked" else ~masks.bool()
        s, t = s[keep], t[keep]  # [M, D]
        if s.shape[0] == 0:
            return s.sum() * 0.0
    if normalize:
        s = F.normalize(s, dim=-1)
        t = F.normalize(t, dim=-1)
    if not img_level and s.dim() == 3:
        s = s.flatten(0, 1)
        t = t.flatten(0, 1)
    g_s = s @ s.transpose(-1, -2)
    g_t = t @ t.transpose(-1, -2)
    if remove_neg:
        g_s = g_s.clamp(min=0.0)
        g_t = g_t.clamp(min=0.0)
    elif remove_only_teacher_neg:
        g_t = g_t.clamp(min=0.0)
    return F.mse_loss(g_s, g_t)
