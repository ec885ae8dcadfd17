"""Architecture names: short aliases for the DINO family, mapped onto timm model names.

Every DINO backbone is a timm model: ``VisionTransformer`` for DINOv1/v2 (learned absolute position
embeddings, optional registers and LayerScale, SwiGLU for g) and ``Eva`` for DINOv3 (RoPE, 4 storage tokens,
LayerNorm eps 1e-5). The official DINOv3 S/B/L checkpoints have a (masked-to-zero) qkv bias, so the aliases
map to timm's ``_qkvb`` variants, which reproduce the official features exactly.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from meddino.errors import ConfigError

_TINY = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4, img_size=32)


@dataclass(frozen=True)
class ArchSpec:
    """A timm model name, the DINO version it follows, and keyword overrides for ``timm.create_model``."""

    timm_name: str
    version: str  # "v1" | "v2" | "v3"
    kwargs: dict[str, Any] = field(default_factory=dict)


ALIASES: dict[str, ArchSpec] = {
    # DINOv1 (facebookresearch/dino): ViT-S/B with patch 16 or 8
    "dinov1_vits16": ArchSpec("vit_small_patch16_224", "v1"),
    "dinov1_vits8": ArchSpec("vit_small_patch8_224", "v1"),
    "dinov1_vitb16": ArchSpec("vit_base_patch16_224", "v1"),
    "dinov1_vitb8": ArchSpec("vit_base_patch8_224", "v1"),
    # DINOv2 (facebookresearch/dinov2), with and without 4 registers
    "dinov2_vits14": ArchSpec("vit_small_patch14_dinov2", "v2"),
    "dinov2_vitb14": ArchSpec("vit_base_patch14_dinov2", "v2"),
    "dinov2_vitl14": ArchSpec("vit_large_patch14_dinov2", "v2"),
    "dinov2_vitg14": ArchSpec("vit_giant_patch14_dinov2", "v2"),
    "dinov2_vits14_reg4": ArchSpec("vit_small_patch14_reg4_dinov2", "v2"),
    "dinov2_vitb14_reg4": ArchSpec("vit_base_patch14_reg4_dinov2", "v2"),
    "dinov2_vitl14_reg4": ArchSpec("vit_large_patch14_reg4_dinov2", "v2"),
    "dinov2_vitg14_reg4": ArchSpec("vit_giant_patch14_reg4_dinov2", "v2"),
    # DINOv3 (facebookresearch/dinov3): RoPE + storage tokens; S/B/L with the masked qkv bias
    "dinov3_vits16": ArchSpec("vit_small_patch16_dinov3_qkvb", "v3"),
    "dinov3_vits16plus": ArchSpec("vit_small_plus_patch16_dinov3_qkvb", "v3"),
    "dinov3_vitb16": ArchSpec("vit_base_patch16_dinov3_qkvb", "v3"),
    "dinov3_vitl16": ArchSpec("vit_large_patch16_dinov3_qkvb", "v3"),
    "dinov3_vith16plus": ArchSpec("vit_huge_plus_patch16_dinov3_qkvb", "v3"),
    "dinov3_vit7b16": ArchSpec("vit_7b_patch16_dinov3", "v3"),
    # tiny models for tests, the demo and CPU trials (patch 8, embed 64, depth 4, 32 px)
    "dinov1_tiny": ArchSpec("vit_small_patch16_224", "v1", _TINY),
    "dinov2_tiny": ArchSpec("vit_small_patch14_dinov2", "v2", _TINY),
    "dinov2_tiny_reg": ArchSpec("vit_small_patch14_reg4_dinov2", "v2", _TINY),
    "dinov3_tiny": ArchSpec("vit_small_patch16_dinov3_qkvb", "v3", _TINY),
}


def version_of_timm_name(name: str) -> str | None:
    """The DINO version a timm ViT name follows, or None for models outside the family."""
    base = name.split(".")[0]
    if "dinov3" in base:
        return "v3"
    if "dinov2" in base:
        return "v2"
    if base.startswith("vit_") and "patch" in base:
        return "v1"
    return None


def resolve_arch(arch: str) -> ArchSpec:
    """An alias or a timm ViT name -> :class:`ArchSpec`; unknown names fail with one line."""
    if arch in ALIASES:
        return ALIASES[arch]
    import timm  # why: archs is reached by `meddino --help` (pretrain.config); timm only for non-alias names

    base = arch.split(".")[0]
    version = version_of_timm_name(base)
    if version is None or base not in timm.list_models():
        known = list(ALIASES) + timm.list_models("vit_*")
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown backbone architecture '{arch}'{hint}; use a DINO alias or a timm ViT name")
    return ArchSpec(base, version)
