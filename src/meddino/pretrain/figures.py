"""The images pretraining gives its trackers at the end: the teacher's PCA map and the kNN monitor's curve.

Drawn only when a tracker that takes images is open (``log.backends`` with tensorboard, mlflow or wandb);
both are plain (H, W, 3) uint8 arrays, so each tracker stores them its own way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from meddino.data import io
from meddino.data.transforms import to_tensor
from meddino.errors import DataError
from meddino.models.pca import patch_feature_grids, pca_rgb

_MIN_TILE = 112  # pixels per image in the PCA panel at least (whole multiples of the crop size)


def sample_images(source: Any, n: int = 4) -> list[np.ndarray]:
    """Up to ``n`` readable samples spread evenly over a pretraining source, as uint8 RGB (H, W, 3)."""
    out: list[np.ndarray] = []
    total = len(source)
    for index in dict.fromkeys(np.linspace(0, total - 1, num=min(n, total)).round().astype(int).tolist()):
        try:
            sample = source.load(index)
            out.append(io.read_image(sample) if isinstance(sample, str) else np.asarray(sample))
        except (DataError, OSError, ValueError):
            continue
    return out


@torch.no_grad()
def pca_panel(backbone: nn.Module, source: Any, size: int, mean: Sequence[float], std: Sequence[float],
              n: int = 4) -> np.ndarray | None:
    """A few pretraining images (top row) above the first three PCA components of the backbone's patch
    features (fitted jointly over them, as ``meddino viz pca`` does); None without a readable image."""
    images = sample_images(source, n)
    if not images:
        return None
    device = next(backbone.parameters()).device
    batch = torch.stack([to_tensor(im, size, mean, std) for im in images]).to(device)
    was_training = backbone.training
    backbone.eval()
    try:
        maps = pca_rgb(patch_feature_grids(backbone, batch.float()))
    finally:
        backbone.train(was_training)
    tile = size * max(1, -(-_MIN_TILE // size))  # a 32 px crop is drawn at 128 px
    shown = [(to_tensor(im, tile, (0.0,) * 3, (1.0,) * 3).permute(1, 2, 0).numpy() * 255).round() for im in images]
    pca = [_upsample(m * 255, tile) for m in maps]
    return np.concatenate([np.concatenate(shown, axis=1), np.concatenate(pca, axis=1)], axis=0).astype(np.uint8)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """A patch grid (h, w, 3) to (size, size, 3), each patch a block of pixels."""
    h, w = grid.shape[:2]
    rows = np.minimum(np.arange(size) * h // size, h - 1)
    cols = np.minimum(np.arange(size) * w // size, w - 1)
    return grid[rows][:, cols]


def knn_curve(rows: list[dict[str, Any]]) -> np.ndarray | None:
    """The monitor's kNN top-1 accuracy against the iteration, drawn; None when the monitor never ran."""
    points = sorted((int(r["step"]), float(r["knn_top1"])) for r in rows
                    if isinstance(r.get("knn_top1"), (int, float)) and "step" in r)
    if not points:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # why: a figure without pyplot's global state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3.0), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax.set_xlabel("iteration")
    ax.set_ylabel("kNN top-1 (monitor)")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
