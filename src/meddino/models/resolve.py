"""Backbone spec strings -> modules: the one entry point every command that takes a backbone uses.

A backbone spec is one string:

- a checkpoint path (file or folder, any format :func:`meddino.models.load_backbone` reads);
- ``random:<arch>``: random initialisation (the seeds' "no pretraining" baseline);
- ``timm:<name>`` or ``timm:<name>@<weights file>``: any timm model, CNNs included, randomly initialised
  or with weights from a local file (nothing is downloaded).

Its own module, above both :mod:`meddino.models.factory` and :mod:`meddino.models.checkpoints.load`
(which builds through the factory), so neither imports the other back.
"""

from __future__ import annotations

from pathlib import Path

import torch

from meddino.errors import CheckpointError, ConfigError
from meddino.models.checkpoints.load import load_backbone
from meddino.models.factory import build_backbone, build_timm_backbone


def resolve_backbone(
    spec: str,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    pos_embed_resample: str | None = None,
    resize_pos_embed: bool = False,
) -> torch.nn.Module:
    """A backbone spec string (see module docstring) -> module.

    ``img_size`` is the stored grid of a fresh backbone; a checkpoint keeps its stored grid and resamples
    from it on every forward (resample once; ``resize_pos_embed=True`` resamples it to ``img_size`` at load
    instead, see ``load_backbone``). ``pos_embed_resample`` overrides the version's mode.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError("backbone: give a checkpoint path, random:<arch> or timm:<name>")
    if spec.startswith("random:"):
        return build_backbone(spec.removeprefix("random:"), img_size=img_size, drop_path_rate=drop_path_rate,
                              pos_embed_resample=pos_embed_resample)
    if spec.startswith("timm:"):
        name, _, weights = spec.removeprefix("timm:").partition("@")
        return build_timm_backbone(name, weights or None, img_size, pos_embed_resample)
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"backbone checkpoint not found: {path} (or use random:<arch> / timm:<name>)")
    return load_backbone(path, img_size=img_size, drop_path_rate=drop_path_rate, verbose=True,
                         pos_embed_resample=pos_embed_resample, resize_pos_embed=resize_pos_embed)
