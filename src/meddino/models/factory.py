"""Building backbones from names and spec strings.

A backbone spec is one string, accepted by every command that takes a backbone:

- a checkpoint path (file or folder, any format :func:`meddino.models.load_backbone` reads);
- ``random:<arch>``: random initialisation (the seeds' "no pretraining" baseline);
- ``timm:<name>`` or ``timm:<name>@<weights file>``: any timm model, CNNs included, randomly initialised
  or with weights from a local file (nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch

from meddino.errors import CheckpointError, ConfigError
from meddino.models.archs import resolve_arch, version_of_timm_name
from meddino.models.backbone import Backbone, CNNBackbone
from meddino.models.droppath import apply_dino_drop_path

_VIT_DEFAULTS = dict(num_classes=0, global_pool="token", dynamic_img_size=True)


def build_backbone(arch: str, img_size: int | None = None, drop_path_rate: float = 0.0, **overrides: Any) -> Backbone:
    """Build a randomly initialised DINO backbone from an alias or timm ViT name.

    ``overrides`` go to ``timm.create_model`` (e.g. ``embed_dim=64, depth=2``); ``img_size`` sets the
    grid the position embeddings are stored at (inputs of other sizes are resampled on the fly).
    """
    spec = resolve_arch(arch)
    kwargs = dict(spec.kwargs)
    kwargs.update(overrides)
    if img_size is not None:
        kwargs["img_size"] = int(img_size)
    kwargs.setdefault("img_size", 224)
    return build_from_timm(spec.timm_name, spec.version, kwargs, drop_path_rate)


def build_from_timm(timm_name: str, version: str, kwargs: dict[str, Any], drop_path_rate: float = 0.0) -> Backbone:
    """``timm.create_model`` with meddino's defaults, wrapped in :class:`Backbone`."""
    kwargs = {k: v for k, v in kwargs.items() if k not in _VIT_DEFAULTS}
    timm_kwargs = {k: v for k, v in kwargs.items() if k != "norm_eps"}
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


def build_timm_backbone(name: str, weights: str | None = None, img_size: int | None = None) -> torch.nn.Module:
    """``timm:<name>``: any timm model as a backbone; ViTs get the full :class:`Backbone` interface."""
    base = name.split(".")[0]
    if base not in timm.list_models():
        raise ConfigError(f"unknown timm model '{name}'")
    version = version_of_timm_name(base)
    if version is not None:
        kwargs: dict[str, Any] = {}
        if img_size:
            kwargs["img_size"] = int(img_size)
        model: torch.nn.Module = build_from_timm(base, version, kwargs)
        target = model.vit
    else:
        target = timm.create_model(base, pretrained=False, num_classes=0)
        model = CNNBackbone(target, {"timm_name": base, "version": "cnn", "kwargs": {}})
    if weights:
        from meddino.models.checkpoints import load_into_strict, read_checkpoint, unwrap_state_dict

        state = unwrap_state_dict(read_checkpoint(Path(weights)), Path(weights))
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head.", "classifier.", "head_"))}
        load_into_strict(target, state, Path(weights))
    return model


def resolve_backbone(spec: str, img_size: int | None = None, drop_path_rate: float = 0.0) -> torch.nn.Module:
    """A backbone spec string (see module docstring) -> module."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError("backbone: give a checkpoint path, random:<arch> or timm:<name>")
    if spec.startswith("random:"):
        return build_backbone(spec.removeprefix("random:"), img_size=img_size, drop_path_rate=drop_path_rate)
    if spec.startswith("timm:"):
        name, _, weights = spec.removeprefix("timm:").partition("@")
        return build_timm_backbone(name, weights or None, img_size)
    from meddino.models.checkpoints import load_backbone

    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"backbone checkpoint not found: {path} (or use random:<arch> / timm:<name>)")
    return load_backbone(path, img_size=img_size, drop_path_rate=drop_path_rate, verbose=True)
