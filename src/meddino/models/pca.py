"""PCA of patch features as RGB: the colouring behind ``meddino viz pca`` and the map pretraining logs at
its end (here, below both, so that pretraining need not import the viz layer above it).

The PCA is fitted jointly on the patch features of all images of a set, so colours are comparable across
images; the first three components, min-max scaled over the set, become RGB. Optional background removal
(seed 001, the DINOv2 paper's recipe): threshold the first component (scaled to [0, 1]) to find the
foreground, then refit the PCA on the foreground patches only and paint the background black.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def fit_pca(x: np.ndarray, n_components: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], components [n, D]) of rows ``x`` [M, D] by SVD; signs fixed so each component's
    largest-magnitude loading is positive (deterministic colours)."""
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:n_components]
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])
    signs[signs == 0] = 1
    return mean, comps * signs[:, None]


def _scale01(values: np.ndarray, ref: np.ndarray) -> np.ndarray:
    lo, hi = ref.min(axis=0), ref.max(axis=0)
    return np.clip((values - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0, 1.0)


def pca_rgb(
    features: Sequence[np.ndarray],
    threshold: float | None = None,
    invert_foreground: bool = False,
) -> list[np.ndarray]:
    """Patch features, one [h, w, D] array per image -> one [h, w, 3] RGB array in [0, 1] per image.

    With ``threshold``, patches whose first component (scaled to [0, 1] over the set) is above it are the
    foreground (below it with ``invert_foreground``); the PCA is refitted on them and the rest is black.
    """
    if not features:
        return []
    shapes = [f.shape[:2] for f in features]
    flat = np.concatenate([f.reshape(-1, f.shape[-1]) for f in features]).astype(np.float64)
    mean, comps = fit_pca(flat, 3)
    proj = (flat - mean) @ comps.T
    foreground = np.ones(len(flat), dtype=bool)
    if threshold is not None:
        first = _scale01(proj[:, :1], proj[:, :1])[:, 0]
        foreground = first < threshold if invert_foreground else first > threshold
        if foreground.sum() >= 3:
            mean, comps = fit_pca(flat[foreground], 3)
            proj = (flat - mean) @ comps.T
    rgb = np.zeros((len(flat), 3))
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    rgb[foreground] = _scale01(proj[foreground], proj[foreground])
    out, start = [], 0
    for h, w in shapes:
        out.append(rgb[start : start + h * w].reshape(h, w, 3))
        start += h * w
    return out


@torch.no_grad()
def patch_feature_grids(backbone: torch.nn.Module, images: torch.Tensor) -> list[np.ndarray]:
    """Final-normed patch tokens of normalised ``images`` [B,3,H,W] as [h, w, D] arrays."""
    out = backbone.forward_features(images)
    h, w = out["grid"]
    return [p.reshape(h, w, -1).float().cpu().numpy() for p in out["patch"]]
