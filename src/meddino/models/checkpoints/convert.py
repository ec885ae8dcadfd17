"""Key maps from the official DINOv1/v2/v3 layouts to timm's, and the architecture read from the tensors.

Pure functions of state dicts (no files, no models), so the loader and the tests use them alike; the
Hugging Face key map is :mod:`meddino.models.hf`. The target is the layout timm's own checkpoint filters
produce: DINOv2 register models fold the CLS position into ``cls_token``, DINOv3 splits the qkv bias into
``q_bias`` and ``v_bias`` and drops the always-zero key bias.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from meddino.errors import CheckpointError

# keys that belong to training, not to the backbone: dropped and listed in the load report
IGNORED_PATTERNS = (
    r"(^|\.)rope_embed\.periods$",
    r"\.bias_mask$",
    r"^local_cls_norm\.",
    r"^head\.",
    r"^fc_norm\.",
    r"^projectors\.",
)
NUM_HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24, 4096: 32}


def pop_ignored(state: dict[str, torch.Tensor]) -> list[str]:
    """Remove the training-only keys (:data:`IGNORED_PATTERNS`) from ``state``; returns their names."""
    ignored = [k for k in state if any(re.search(p, k) for p in IGNORED_PATTERNS)]
    for k in ignored:
        state.pop(k)
    return ignored


def official_v2_to_timm(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Official DINOv1/v2 keys -> timm ViT keys (+ ``mask_token``). Returns (state, uses_swiglu)."""
    out: dict[str, torch.Tensor] = {}
    swiglu = False
    state = dict(state)
    if "register_tokens" in state:
        # timm's register models keep no position for CLS: fold it into the token, as timm's filter does
        pos = state.pop("pos_embed")
        out["reg_token"] = state.pop("register_tokens")
        out["cls_token"] = state.pop("cls_token") + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    for key, value in state.items():
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # block chunks
        if ".mlp.w12." in key:
            swiglu = True
            key = key.replace(".mlp.w12.", ".mlp.fc1.")
        key = key.replace(".mlp.w3.", ".mlp.fc2.")
        if key == "mask_token" and value.ndim == 2:
            value = value.reshape(1, -1)
        out[key] = value
    return out, swiglu


def official_v3_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINOv3 keys -> timm Eva keys (+ ``mask_token``); the key part of qkv bias is zero by design."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("attn.qkv.bias"):
            q, _k, v = value.chunk(3, dim=-1)
            out[key.replace("qkv.bias", "q_bias")] = q
            out[key.replace("qkv.bias", "v_bias")] = v
            continue
        key = key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        key = key.replace("storage_tokens", "reg_token")
        key = key.replace(".mlp.w1.", ".mlp.fc1_g.").replace(".mlp.w2.", ".mlp.fc1_x.").replace(".mlp.w3.", ".mlp.fc2.")
        if key == "mask_token":
            value = value.reshape(1, -1)
        out[key] = value
    return out


def infer_arch(state: dict[str, torch.Tensor], family: str, swiglu: bool = False) -> tuple[str, str, dict[str, Any]]:
    """(timm_name, version, timm kwargs) read from timm-layout tensors."""
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError("checkpoint has no patch embedding (patch_embed.proj.weight)")
    proj = state["patch_embed.proj.weight"]
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointError("checkpoint has no transformer blocks")
    depth = max(blocks) + 1
    kwargs: dict[str, Any] = dict(
        embed_dim=dim, depth=depth, num_heads=NUM_HEADS_BY_DIM.get(dim, max(1, dim // 64)), patch_size=patch
    )
    regs = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    if family == "eva":
        if "blocks.0.mlp.fc1_g.weight" in state:
            hidden = int(state["blocks.0.mlp.fc1_g.weight"].shape[0])
            name = "vit_small_plus_patch16_dinov3"
        else:
            hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
            name = "vit_small_patch16_dinov3"
        kwargs["mlp_ratio"] = hidden / dim
        kwargs["num_reg_tokens"] = regs
        if "blocks.0.attn.q_bias" in state:
            name += "_qkvb"
        return name, "v3", kwargs
    layerscale = "blocks.0.ls1.gamma" in state
    version = "v2" if (layerscale or regs or "mask_token" in state) else "v1"
    if "pos_embed" in state:
        n_pos = int(state["pos_embed"].shape[1]) - (0 if regs else 1)
        side = int(round(math.sqrt(n_pos)))
        if side * side != n_pos:
            raise CheckpointError(f"position embedding of {n_pos} patches is not a square grid")
        kwargs["img_size"] = side * patch
    kwargs["qkv_bias"] = "blocks.0.attn.qkv.bias" in state
    if version == "v1":
        return "vit_small_patch16_224", "v1", kwargs
    if swiglu:
        hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
        kwargs["mlp_ratio"] = hidden / dim
        name = "vit_giant_patch14_reg4_dinov2" if regs else "vit_giant_patch14_dinov2"
    else:
        kwargs["mlp_ratio"] = int(state["blocks.0.mlp.fc1.weight"].shape[0]) / dim
        name = "vit_small_patch14_reg4_dinov2" if regs else "vit_small_patch14_dinov2"
    if regs:
        kwargs["reg_tokens"] = regs
    if not layerscale:
        kwargs["init_values"] = None
    return name, version, kwargs
