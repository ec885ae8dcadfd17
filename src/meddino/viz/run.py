"""Running the visualisations over files: loading images, one panel figure per kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from meddino.config import Schema
from meddino.data.io import is_dicom_file, is_image_file, read_image
from meddino.data.transforms import to_tensor
from meddino.errors import ConfigError, DataError
from meddino.models import resolve_backbone
from meddino.runlog import RunDir, atomic_path, write_json
from meddino.tracking import LogConfig
from meddino.viz.labels import wrap_label
from meddino.viz.pca import cls_attention_maps, patch_feature_grids, pca_rgb


class VizConfig(Schema):
    images: list[str] = []
    backbones: list[str] = []
    labels: list[str] = []
    out: str = "runs/viz"
    img_size: int = 224
    threshold: float | None = None
    invert: bool = False
    max_images: int = 8
    attention: bool = True
    log: LogConfig = LogConfig()


def list_images(paths: list[str], limit: int) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and (is_image_file(p) or is_dicom_file(p)))
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"image not found: {path}")
    if not found:
        raise DataError(f"no images in {', '.join(paths)}")
    return found[:limit]


def load_batch(paths: list[Path], size: int, mean, std) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Images -> (normalised [B,3,size,size] tensor, the resized uint8 RGB images for display)."""
    tensors, shown = [], []
    for path in paths:
        unit = to_tensor(read_image(path), size, (0.0,) * 3, (1.0,) * 3)  # resized, in [0, 1]
        shown.append((unit.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        tensors.append((unit - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    return torch.stack(tensors), shown


def run_pca(cfg: VizConfig) -> Path:
    import matplotlib  # why: the Agg backend is chosen when a figure is drawn, not as a side effect of import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not cfg.backbones:
        raise ConfigError("viz pca: give at least one backbone (backbones=[CKPT, random:<arch>, ...])")
    if cfg.labels and len(cfg.labels) != len(cfg.backbones):
        raise ConfigError("viz pca: give one label per backbone (labels=[NAME, ...]), or none")
    labels = cfg.labels or [Path(b).stem if not b.startswith(("random:", "timm:")) else b for b in cfg.backbones]
    paths = list_images(cfg.images, cfg.max_images)
    run = RunDir(cfg.out, cfg)
    rows: list[tuple[str, list[np.ndarray], list[np.ndarray] | None]] = []
    shown: list[np.ndarray] = []
    for spec, label in zip(cfg.backbones, labels):
        backbone = resolve_backbone(spec, img_size=cfg.img_size).eval()
        batch, shown = load_batch(paths, cfg.img_size, backbone.mean, backbone.std)
        maps = pca_rgb(patch_feature_grids(backbone, batch), cfg.threshold, cfg.invert)
        attn = None
        if cfg.attention and getattr(backbone, "version", "cnn") != "cnn":
            a = cls_attention_maps(backbone, batch).mean(dim=1).numpy()
            attn = [m / max(m.max(), 1e-12) for m in a]
        rows.append((label, maps, attn))
    n_cols = len(paths)
    n_rows = 1 + len(rows)
    panels = {}
    for kind in ("pca", "attention"):
        if kind == "attention" and all(r[2] is None for r in rows):
            continue
        fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.2 * n_cols, 2.2 * n_rows), squeeze=False)
        for c in range(n_cols):
            axes[0][c].imshow(shown[c])
            axes[0][c].set_title(wrap_label(paths[c].name, 18), fontsize=7)
        for r, (label, maps, attn) in enumerate(rows, start=1):
            for c in range(n_cols):
                img = maps[c] if kind == "pca" else (attn[c] if attn else np.zeros((1, 1)))
                axes[r][c].imshow(img, interpolation="nearest", cmap=None if kind == "pca" else "inferno")
            axes[r][0].set_ylabel(wrap_label(label, 24), fontsize=8)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle("PCA of patch features (RGB = PC1-3)" if kind == "pca" else "CLS attention, last block")
        fig.tight_layout()
        with atomic_path(run / f"{kind}.png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        panels[kind] = f"{kind}.png"
        if run.tracks_images:
            from PIL import Image

            with Image.open(run / f"{kind}.png") as png:
                run.image(f"viz/{kind}", np.asarray(png.convert("RGB")), 0)
    write_json(run / "viz.json", {"task": "viz", "images": [str(p) for p in paths], "backbones": labels,
                                  "panels": panels, "threshold": cfg.threshold})
    run.close()
    return run.path
