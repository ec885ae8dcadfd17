"""Optimiser plumbing shared by the recipes: parameter groups with layer-wise lr decay, gradient
clipping (v1 per parameter, v2/v3 global norm) and the freeze-last-layer rule."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["layer_id", "param_groups", "clip_gradients", "cancel_last_layer_gradients"]

# Parameters that live "below" the first block: layer id 0 (the originals' get_vit_lr_decay_rate).
_EMBED_TOKENS = frozenset(
    {"cls_token", "pos_embed", "reg_token", "register_tokens", "storage_tokens", "mask_token", "patch_embed"}
)
# Token-like parameters that DO get weight decay although they are not matrices.
_DECAYED_TOKENS = frozenset({"cls_token", "pos_embed", "reg_token", "register_tokens", "storage_tokens", "mask_token"})


def _block_index(parts: list[str]) -> int | None:
    """Block number from a name like ``backbone.blocks.3.attn...`` or chunked ``blocks.<chunk>.<i>...``."""
    if "blocks" not in parts:
        return None
    i = parts.index("blocks")
    if i + 1 >= len(parts) or not parts[i + 1].isdigit():
        return None
    if i + 2 < len(parts) and parts[i + 2].isdigit():  # DINOv2 block chunks keep the global index second
        return int(parts[i + 2])
    return int(parts[i + 1])


def layer_id(name: str, num_layers: int) -> int:
    """0 for patch/position embeddings and cls/register/mask tokens, block index + 1 inside blocks,
    ``num_layers + 1`` for everything else (final norm, heads)."""
    parts = name.split(".")
    if any(p in _EMBED_TOKENS for p in parts):
        return 0
    block = _block_index(parts)
    if block is not None:
        return block + 1
    return num_layers + 1


def _infer_num_layers(names: Iterable[str]) -> int:
    ids = [b for b in (_block_index(n.split(".")) for n in names) if b is not None]
    return max(ids) + 1 if ids else 0


def param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    layer_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    num_layers: int | None = None,
) -> list[dict]:
    """AdamW parameter groups with DINOv2/v3's multipliers, merged by identical multipliers.

    lr multiplier: ``layer_decay ** (L + 1 - layer_id)`` (:func:`layer_id`), times
    ``patch_embed_lr_mult`` for ``patch_embed`` parameters. Weight decay multiplier 0 for biases, 1-D
    parameters (norm weights, as v1) and names containing ``norm`` or ``gamma`` (LayerScale, as v2/v3);
    cls/pos/register/mask tokens keep weight decay, as in the originals. ``is_last_layer`` marks head
    prototype layers (names containing ``last_layer``) for the freeze-last-layer schedule. Frozen
    parameters (``requires_grad=False``) are left out. ``num_layers`` defaults to the number of blocks
    found in the names. Each group has ``params``, ``names``, ``name``, ``lr_multiplier``,
    ``wd_multiplier``, ``is_last_layer``, ``is_patch_embed`` (patch-embedding parameters are always a group of
their own, so a schedule can treat them apart, as the FINO head warm-up does) and ready-to-use ``lr`` / ``weight_decay``; a schedule sets
    ``lr = lr_t * lr_multiplier`` and ``weight_decay = wd_t * wd_multiplier`` each step.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_layers = _infer_num_layers(n for n, _ in named) if num_layers is None else int(num_layers)
    groups: dict[tuple[float, float, bool], dict] = {}
    for name, p in named:
        parts = name.split(".")
        lr_mult = layer_decay ** (n_layers + 1 - layer_id(name, n_layers))
        if "patch_embed" in parts:
            lr_mult *= patch_embed_lr_mult
        if any(t in _DECAYED_TOKENS for t in parts):
            wd_mult = 1.0
        elif name.endswith("bias") or p.ndim <= 1 or "norm" in name or "gamma" in name:
            wd_mult = 0.0
        else:
            wd_mult = 1.0
        is_last = "last_layer" in name
        is_patch_embed = "patch_embed" in parts
        key = (float(lr_mult), wd_mult, is_last, is_patch_embed)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "name": f"lr_mult={lr_mult:.6g} wd_mult={wd_mult:g}" + (" last_layer" if is_last else ""),
                "lr_multiplier": float(lr_mult),
                "wd_multiplier": wd_mult,
                "is_last_layer": is_last,
                "is_patch_embed": is_patch_embed,
                "lr": base_lr * lr_mult,
                "weight_decay": weight_decay * wd_mult,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def _params(module_or_params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(module_or_params, nn.Module):
        return [p for p in module_or_params.parameters() if p.grad is not None]
    return [p for p in module_or_params if p.grad is not None]


@torch.no_grad()
def clip_gradients(
    module: nn.Module | Iterable[torch.Tensor], max_norm: float, per_parameter: bool
) -> torch.Tensor:
    """Clip gradients in place; returns the total gradient L2 norm before clipping (for logging).

    ``per_parameter=True`` (DINOv1): every parameter's gradient is scaled by
    ``max_norm / (||g|| + 1e-6)`` when that is below 1, independently of the others.
    ``per_parameter=False`` (DINOv2/v3): ``torch.nn.utils.clip_grad_norm_`` on the global norm (call it
    per sub-model, backbone and each head, as the originals do). ``max_norm <= 0`` disables clipping.
    """
    params = _params(module)
    if not params:
        return torch.tensor(0.0)
    grads = [p.grad for p in params]
    norms = [n.to(torch.promote_types(n.dtype, torch.float32)) for n in torch._foreach_norm(grads, 2.0)]
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].dtype) for n in norms]))
    if max_norm <= 0:
        return total
    if per_parameter:
        for g, n in zip(grads, norms):
            coef = max_norm / (n + 1e-6)
            g.mul_(torch.clamp(coef, max=1.0).to(g.dtype))
        return total
    if all(type(g) is torch.Tensor and g.dtype == torch.float32 for g in grads):
        # clip_grad_norm_'s second half on the norm already taken (the same total: fp32 norms of norms),
        # instead of its second pass over every gradient
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def cancel_last_layer_gradients(head: nn.Module, iteration: int, freeze_iters: int) -> None:
    """DINOv1's freeze-last-layer: drop the prototype layer's gradients while ``iteration < freeze_iters``.

    Gradients are set to None (not zero) so AdamW skips the parameter entirely: no weight decay, no
    moment update, exactly as in v1. (v2/v3 instead give the ``is_last_layer`` groups lr 0 during the
    freeze, which also stops AdamW's decoupled weight decay, but their Adam moments keep accumulating.)
    """
    if iteration >= freeze_iters:
        return
    for name, p in head.named_parameters():
        if "last_layer" in name:
            p.grad = None
