"""Shared plumbing of the classification verbs: manifest, backbone and embeddings from a config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from meddino.data.manifest import Manifest, read_manifest
from meddino.devices import pick_device
from meddino.errors import ConfigError
from meddino.models import resolve_backbone
from meddino.runlog import RunDir
from meddino.tasks.classify.config import ClassifyConfig
from meddino.tasks.classify.embed import EmbeddingCache, embed_manifest, load_cache, save_cache


def load_manifest(cfg: ClassifyConfig, check_files: bool = True) -> Manifest:
    if not cfg.data.manifest:
        raise ConfigError("data.manifest: give the manifest CSV (data.manifest=FILE)")
    d = cfg.data
    return read_manifest(d.manifest, label_columns=d.label_columns, image_column=d.image_column,
                         patient_column=d.patient_column, dataset_name=cfg.dataset_name,
                         positive_class=d.positive_class, check_files=check_files)


def load_backbone(cfg: ClassifyConfig, drop_path_rate: float = 0.0) -> nn.Module:
    if not cfg.backbone:
        raise ConfigError("backbone: give a checkpoint path, random:<arch> or timm:<name> (backbone=...)")
    return resolve_backbone(cfg.backbone, img_size=cfg.data.img_size, drop_path_rate=drop_path_rate)


def model_name(cfg: ClassifyConfig, meta: dict[str, Any] | None = None) -> str:
    if cfg.model_name:
        return cfg.model_name
    if cfg.backbone:
        return cfg.backbone
    if meta and meta.get("model"):
        return str(meta["model"])
    return "unknown"


def compute_cache(cfg: ClassifyConfig, out: Path, manifest: Manifest | None = None) -> EmbeddingCache:
    """Run the frozen backbone over the manifest and save the cache to ``out``."""
    m = manifest if manifest is not None else load_manifest(cfg)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)  # a random:<arch> baseline is the same network on every run
    backbone = load_backbone(cfg)
    feats = embed_manifest(backbone, m, cfg.data.img_size, batch_size=cfg.embed.batch_size,
                           blocks=cfg.embed.blocks, device=device, num_workers=cfg.embed.num_workers,
                           volume_axis=cfg.data.volume_axis, volume_min_foreground=cfg.data.volume_min_foreground)
    meta = {"backbone": cfg.backbone, "model": model_name(cfg), "img_size": cfg.data.img_size,
            "blocks": cfg.embed.blocks, "embed_dim": int(getattr(backbone, "embed_dim", 0)),
            "version": getattr(backbone, "version", None), "mean": list(backbone.mean), "std": list(backbone.std)}
    save_cache(out, feats, m, meta)
    return EmbeddingCache(features=feats, manifest=m, meta={**meta, "task": m.task, "classes": m.names})


def get_cache(cfg: ClassifyConfig, out: Path, manifest: Manifest | None = None) -> EmbeddingCache:
    """``embeddings=DIR`` if given, else embed ``data.manifest`` with ``backbone`` now (saved to OUT/embeddings)."""
    if cfg.embeddings:
        cache = load_cache(cfg.embeddings)
        if cfg.dataset_name:
            cache.manifest.dataset = cfg.dataset_name
        return cache
    if not cfg.backbone or not cfg.data.manifest:
        raise ConfigError("give embeddings=DIR (from `meddino embed`) or both backbone=... and data.manifest=...")
    return compute_cache(cfg, out / "embeddings", manifest)


def run_embed(cfg: ClassifyConfig, manifest: Manifest | None = None) -> int:
    """``meddino embed``: write the cache to ``out``."""
    run = RunDir(cfg.out, cfg)
    cache = compute_cache(cfg, run.path, manifest)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in cache.features.items())
    print(f"wrote embeddings of {len(cache.manifest)} samples to {run.path} ({shapes})")
    return 0
