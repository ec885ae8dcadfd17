"""Checkpoints: reading files, converting key layouts, loading into a backbone, writing meddino exports.

One module per step, importing only downward: :mod:`.read` (files, wrappers, format detection) <-
:mod:`.convert` (official layouts -> timm) and :mod:`meddino.models.hf` (Hugging Face -> timm);
:mod:`.strict` (the strict load) <- :mod:`meddino.models.factory` <- :mod:`.load` (:func:`load_backbone`);
:mod:`.export` (:func:`export_backbone`).

The names of the former single module stay importable from here, looked up on first use
(:mod:`meddino.lazy`): an eager import of :mod:`.load` would import the factory, which itself imports
:mod:`.read` and :mod:`.strict` through this package.
"""

from meddino.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "EXPORT_FORMAT": ".read",
        "STRIP_PREFIXES": ".read",
        "WRAPPER_KEYS": ".read",
        "detect_layout": ".read",
        "read_checkpoint": ".read",
        "unwrap_state_dict": ".read",
        "IGNORED_PATTERNS": ".convert",
        "NUM_HEADS_BY_DIM": ".convert",
        "infer_arch": ".convert",
        "official_v2_to_timm": ".convert",
        "official_v3_to_timm": ".convert",
        "load_into_strict": ".strict",
        "LoadReport": ".load",
        "load_backbone": ".load",
        "export_backbone": ".export",
    },
)
