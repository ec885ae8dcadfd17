"""Backbones (DINOv1/v2/v3 through timm, CNN baselines) and checkpoint load / convert / export."""

from meddino.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "ALIASES": ".archs",
        "ArchSpec": ".archs",
        "resolve_arch": ".archs",
        "Backbone": ".backbone",
        "CNNBackbone": ".backbone",
        "LoadReport": ".checkpoints",
        "export_backbone": ".checkpoints",
        "load_backbone": ".checkpoints",
        "resample_pos_embed": ".pos_embed",
        "build_backbone": ".factory",
        "resolve_backbone": ".resolve",
    },
)
