"""Backbones (DINOv1/v2/v3 through timm, CNN baselines) and checkpoint load / convert / export."""

from meddino.models.archs import ALIASES, ArchSpec, resolve_arch
from meddino.models.backbone import Backbone, CNNBackbone
from meddino.models.checkpoints import LoadReport, export_backbone, load_backbone
from meddino.models.factory import build_backbone, resolve_backbone

__all__ = [
    "ALIASES",
    "ArchSpec",
    "Backbone",
    "CNNBackbone",
    "LoadReport",
    "build_backbone",
    "export_backbone",
    "load_backbone",
    "resolve_arch",
    "resolve_backbone",
]
