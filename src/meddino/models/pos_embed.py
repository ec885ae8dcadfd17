"""Resampling learned absolute position embeddings to another patch grid, the way each DINO version does.

The official repositories resample the stored grid of position embeddings on every forward pass whose
patch grid differs from it (the 96/98 px local crops, any evaluation size), and the formula differs by
version. The modes (``mode`` below, recorded as ``pos_embed_resample`` in a backbone's arch dict and export):

- ``dinov1`` / ``dinov2``: bicubic with a +0.1 offset on the scale factor, no antialias: the output grid
  (h, w) is produced with ``scale_factor = ((h + 0.1) / H, (w + 0.1) / W)`` for a stored H x W grid, so the
  sampling positions follow that scale, not h / H. This is facebookresearch/dino's
  ``interpolate_pos_encoding`` and DINOv2's defaults (``interpolate_offset=0.1``,
  ``interpolate_antialias=False``), i.e. how both were trained. The two modes are numerically identical;
  they are named apart so a record says which recipe it follows.
- ``dinov2_reg``: bicubic to the exact output size, antialiased, no offset: how DINOv2's torch-hub builds its
  released ``*_reg`` models (``interpolate_antialias=True, interpolate_offset=0``); Hugging Face's
  ``Dinov2WithRegistersModel`` does the same.
- ``timm``: timm's ``resample_abs_pos_embed`` (bicubic, antialiased), what timm's ``dynamic_img_size`` does.
  In timm 1.x it equals ``dinov2_reg``.

A grid equal to the stored one is returned unchanged in every mode (as the originals do).

**Resample once.** Backbones keep the position embeddings at the grid they were stored at (a released DINOv2
checkpoint stays at 37 x 37 = 518 px even when trained with 224/98 px crops) and every forward resamples
from that stored grid to its own grid, exactly as the official code does with its hub models. So a 98 px
local crop sees ``stored -> 7 x 7``, never ``518 -> 224 -> 98``, and the stored parameter is what trains.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from meddino.errors import ConfigError

POS_EMBED_MODES = ("dinov1", "dinov2", "dinov2_reg", "timm")
OFFSET = 0.1  # the official "small number to avoid floating point error" on the scale factor
# the released DINOv2 checkpoints (torch hub, timm, Hugging Face) store 518 px at patch 14
RELEASED_V2_GRID = (37, 37)


def check_mode(mode: str) -> str:
    """``mode`` if it is a known resampling mode, else a one-line :class:`ConfigError`."""
    if mode not in POS_EMBED_MODES:
        raise ConfigError(f"pos_embed_resample: unknown mode {mode!r}; choose one of {', '.join(POS_EMBED_MODES)}")
    return mode


def default_mode(version: str, registers: int = 0, grid: Sequence[int] | None = None, released: bool = False) -> str | None:
    """The official mode of a DINO version; None for DINOv3 (RoPE) and CNNs.

    ``released``: the weights come from a foreign checkpoint (not a meddino export or a fresh build).
    A released-size DINOv2 checkpoint with registers (stored grid 37 x 37) is a hub ``*_reg`` model and
    gets ``dinov2_reg``; everything else in v2, registers included, trained with DINOv2's training code,
    whose default is ``dinov2``.
    """
    if version == "v1":
        return "dinov1"
    if version == "v2":
        if released and registers and grid is not None and tuple(grid) == RELEASED_V2_GRID:
            return "dinov2_reg"
        return "dinov2"
    return None


def resample_pos_embed(
    pos_embed: torch.Tensor, new_hw: Sequence[int], mode: str, old_hw: Sequence[int] | None = None
) -> torch.Tensor:
    """Resample grid position embeddings ``[1, H*W, D]`` (no CLS/register entries) to ``[1, h*w, D]``.

    ``old_hw`` is the stored grid (H, W); square when omitted. Computed in float32, returned in the input's
    dtype; the input itself is returned when the grid already matches.
    """
    check_mode(mode)
    n, dim = int(pos_embed.shape[1]), int(pos_embed.shape[2])
    if old_hw is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"{n} position embeddings are not a square grid; give old_hw")
        old_hw = (side, side)
    old_h, old_w = int(old_hw[0]), int(old_hw[1])
    h, w = int(new_hw[0]), int(new_hw[1])
    if old_h * old_w != n:
        raise ValueError(f"{n} position embeddings do not fill a {old_h} x {old_w} grid")
    if (h, w) == (old_h, old_w):
        return pos_embed
    if mode == "timm":
        from timm.layers import resample_abs_pos_embed  # why: timm (seconds) only for mode 'timm'

        return resample_abs_pos_embed(pos_embed, new_size=[h, w], old_size=[old_h, old_w], num_prefix_tokens=0)
    grid = pos_embed.float().reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    if mode == "dinov2_reg":
        out = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    else:  # dinov1 / dinov2: the offset scale factor decides both the output size and the sampling grid
        scale = (float(h + OFFSET) / old_h, float(w + OFFSET) / old_w)
        out = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False, antialias=False)
    if tuple(out.shape[-2:]) != (h, w):  # cannot happen for positive sizes; guards a silent misfit
        raise RuntimeError(f"position resampling gave grid {tuple(out.shape[-2:])}, wanted {(h, w)}")
    return out.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)


# ------------------------------------------------------------------------------ the forward-pass hook


def _pos_embed_hook(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Replacement for a timm ``VisionTransformer._pos_embed`` that resamples in ``vit.pos_embed_resample``.

    Same token layout as timm: CLS then register tokens in front of the patches; positions cover the prefix
    tokens too unless the model is ``no_embed_class`` (timm's DINOv2 register models, whose CLS position is
    folded into the CLS token and whose registers have none, as in the official code).
    """
    batch = x.shape[0]
    if x.ndim == 4:  # dynamic image size: [B, h, w, D]
        hw = (int(x.shape[1]), int(x.shape[2]))
        x = x.reshape(batch, hw[0] * hw[1], x.shape[-1])
    else:
        hw = tuple(int(s) for s in vit.patch_embed.grid_size)
    prefix = [t.expand(batch, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    if vit.pos_embed is None:
        return torch.cat(prefix + [x], dim=1)
    n_pos_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    stored = vit.pos_embed
    stored_hw = tuple(int(s) for s in vit.patch_embed.grid_size)
    if hw == stored_hw:
        pos = stored
    else:
        grid_pos = resample_pos_embed(stored[:, n_pos_prefix:], hw, vit.pos_embed_resample, stored_hw)
        pos = torch.cat([stored[:, :n_pos_prefix], grid_pos], dim=1) if n_pos_prefix else grid_pos
    if vit.no_embed_class:  # add to the patches, then put the prefix tokens in front
        x = x + pos
        return vit.pos_drop(torch.cat(prefix + [x], dim=1) if prefix else x)
    x = torch.cat(prefix + [x], dim=1) if prefix else x
    return vit.pos_drop(x + pos)


def install_pos_embed_hook(vit: nn.Module, mode: str) -> None:
    """Make ``vit`` (a timm ``VisionTransformer`` with learned positions) resample them in ``mode``.

    The hook replaces the instance's ``_pos_embed``, so every timm entry point (``forward_features``,
    ``forward_intermediates``) and meddino's :class:`~meddino.models.backbone.Backbone` use it; the mode can
    be changed later through ``vit.pos_embed_resample``.
    """
    if getattr(vit, "pos_embed", None) is None:
        raise ConfigError("pos_embed_resample: this model has no learned position embeddings (RoPE?)")
    vit.pos_embed_resample = check_mode(mode)
    vit._pos_embed = functools.partial(_pos_embed_hook, vit)
