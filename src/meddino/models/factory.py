"""Building backbones from architecture names and timm names.

Spec strings (``random:<arch>``, ``timm:<name>``, checkpoint paths) are :mod:`meddino.models.resolve`,
above both this module and the checkpoint loader that builds through it.

``pos_embed_resample`` (where backbones are built: :func:`build_backbone`, :func:`resolve_backbone`,
``load_backbone``) picks how v1/v2 position embeddings are resampled to a crop's grid: ``dinov1``,
``dinov2``, ``dinov2_reg`` or ``timm`` (see :mod:`meddino.models.pos_embed`); None takes the version's
official mode. It is recorded in the backbone's arch dict and export JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from meddino.errors import ConfigError
from meddino.models.archs import resolve_arch, version_of_timm_name
from meddino.models.backbone import Backbone, CNNBackbone
from meddino.models.checkpoints.read import read_checkpoint, unwrap_state_dict
from meddino.models.checkpoints.strict import load_into_strict
from meddino.models.droppath import apply_dino_drop_path
from meddino.models.pos_embed import check_mode, default_mode

_VIT_DEFAULTS = dict(num_classes=0, global_pool="token", dynamic_img_size=True)


def build_backbone(
    arch: str,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    pos_embed_resample: str | None = None,
    **overrides: Any,
) -> Backbone:
    """Build a randomly initialised DINO backbone from an alias or timm ViT name.

    ``overrides`` go to ``timm.create_model`` (e.g. ``embed_dim=64, depth=2``); ``img_size`` sets the
    grid the position embeddings are stored at (inputs of other sizes are resampled on the fly from it, in
    ``pos_embed_resample`` mode, default the version's official one: v1 ``dinov1``, v2 ``dinov2``).
    """
    spec = resolve_arch(arch)
    kwargs = dict(spec.kwargs)
    kwargs.update(overrides)
    if img_size is not None:
        kwargs["img_size"] = int(img_size)
    kwargs.setdefault("img_size", 224)
    if pos_embed_resample is not None:
        kwargs["pos_embed_resample"] = pos_embed_resample
    return build_from_timm(spec.timm_name, spec.version, kwargs, drop_path_rate)


# options recorded in the arch kwargs that are meddino's, not timm's
_NOT_TIMM = ("norm_eps", "pos_embed_resample")


def build_from_timm(timm_name: str, version: str, kwargs: dict[str, Any], drop_path_rate: float = 0.0) -> Backbone:
    """``timm.create_model`` with meddino's defaults, wrapped in :class:`Backbone`.

    ``kwargs["pos_embed_resample"]`` (None or absent: the version's official mode) is resolved here and
    recorded in the arch kwargs; giving one for a RoPE model (DINOv3) is refused.
    """
    kwargs = {k: v for k, v in kwargs.items() if k not in _VIT_DEFAULTS}
    timm_kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_TIMM}
    try:
        vit = timm.create_model(
            timm_name, pretrained=False, drop_path_rate=drop_path_rate, **_VIT_DEFAULTS, **timm_kwargs
        )
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"cannot build {timm_name} with {kwargs}: {exc}") from None
    if "norm_eps" in kwargs:  # LayerNorm eps is not a timm option: set it on every LayerNorm
        for module in vit.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = float(kwargs["norm_eps"])
    apply_dino_drop_path(vit, version, drop_path_rate)
    mode = kwargs.pop("pos_embed_resample", None)
    if isinstance(vit, VisionTransformer) and vit.pos_embed is not None:
        kwargs["pos_embed_resample"] = check_mode(mode) if mode is not None else default_mode(version) or "timm"
    elif mode is not None:
        raise ConfigError(f"pos_embed_resample={mode}: {timm_name} has no learned position embeddings (RoPE)")
    arch = {"timm_name": timm_name, "version": version, "kwargs": _jsonable(kwargs)}
    return Backbone(vit, version, arch)


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, (int, float, str, bool, list)) or value is None:
            out[key] = value
        else:
            raise ConfigError(f"backbone option {key}={value!r} cannot be recorded in the export JSON")
    return out


def build_timm_backbone(
    name: str, weights: str | None = None, img_size: int | None = None, pos_embed_resample: str | None = None
) -> torch.nn.Module:
    """``timm:<name>``: any timm model as a backbone; ViTs get the full :class:`Backbone` interface.

    The weights file is loaded at the model's own grid (``img_size``, timm's default when None); a ViT
    resamples its position embeddings per forward in ``pos_embed_resample`` mode (the version's default).
    """
    base = name.split(".")[0]
    if base not in timm.list_models():
        raise ConfigError(f"unknown timm model '{name}'")
    version = version_of_timm_name(base)
    if version is not None:
        kwargs: dict[str, Any] = {}
        if img_size:
            kwargs["img_size"] = int(img_size)
        if pos_embed_resample is not None:
            kwargs["pos_embed_resample"] = pos_embed_resample
        model: torch.nn.Module = build_from_timm(base, version, kwargs)
        target = model.vit
        if weights and pos_embed_resample is None and model.pos_embed_resample is not None:
            grid = tuple(target.patch_embed.grid_size)  # released weights: a hub *_reg model keeps its mode
            model.pos_embed_resample = default_mode(version, model.num_registers, grid, released=True)
    else:
        target = timm.create_model(base, pretrained=False, num_classes=0)
        model = CNNBackbone(target, {"timm_name": base, "version": "cnn", "kwargs": {}})
    if weights:
        state = unwrap_state_dict(read_checkpoint(Path(weights)), Path(weights))
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head.", "classifier.", "head_"))}
        load_into_strict(target, state, Path(weights))
    return model

