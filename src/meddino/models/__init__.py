"""Backbones (DINOv1/v2/v3 through timm, CNN baselines) and checkpoint load / convert / export.

Attributes are imported on first use (PEP 562), so the CLI can register its verbs without importing
torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ALIASES": "meddino.models.archs",
    "ArchSpec": "meddino.models.archs",
    "resolve_arch": "meddino.models.archs",
    "Backbone": "meddino.models.backbone",
    "CNNBackbone": "meddino.models.backbone",
    "LoadReport": "meddino.models.checkpoints.load",
    "export_backbone": "meddino.models.checkpoints.export",
    "load_backbone": "meddino.models.checkpoints.load",
    "resample_pos_embed": "meddino.models.pos_embed",
    "build_backbone": "meddino.models.factory",
    "resolve_backbone": "meddino.models.resolve",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'meddino.models' has no attribute {name!r}")
