"""Checkpoints: reading files, converting key layouts, loading into a backbone, writing meddino exports.

One module per step, importing only downward: :mod:`.read` (files, wrappers, format detection) <-
:mod:`.convert` (official layouts -> timm) and :mod:`meddino.models.hf` (Hugging Face -> timm);
:mod:`.strict` (the strict load) <- :mod:`meddino.models.factory` <- :mod:`.load` (:func:`load_backbone`);
:mod:`.export` (:func:`export_backbone`).

The names of the former single module stay importable from here, looked up on first use (PEP 562): an
eager import of :mod:`.load` would import the factory, which itself imports :mod:`.read` and :mod:`.strict`
through this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EXPORT_FORMAT": "meddino.models.checkpoints.read",
    "STRIP_PREFIXES": "meddino.models.checkpoints.read",
    "WRAPPER_KEYS": "meddino.models.checkpoints.read",
    "detect_layout": "meddino.models.checkpoints.read",
    "read_checkpoint": "meddino.models.checkpoints.read",
    "unwrap_state_dict": "meddino.models.checkpoints.read",
    "IGNORED_PATTERNS": "meddino.models.checkpoints.convert",
    "NUM_HEADS_BY_DIM": "meddino.models.checkpoints.convert",
    "infer_arch": "meddino.models.checkpoints.convert",
    "official_v2_to_timm": "meddino.models.checkpoints.convert",
    "official_v3_to_timm": "meddino.models.checkpoints.convert",
    "load_into_strict": "meddino.models.checkpoints.strict",
    "LoadReport": "meddino.models.checkpoints.load",
    "load_backbone": "meddino.models.checkpoints.load",
    "export_backbone": "meddino.models.checkpoints.export",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'meddino.models.checkpoints' has no attribute {name!r}")
