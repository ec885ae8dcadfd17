"""Turning decoded images into model inputs, the same way for every downstream task."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(rgb: np.ndarray, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised float [3, S, S] (bicubic, antialiased resize)."""
    arr = np.ascontiguousarray(rgb)
    if not arr.flags.writeable:  # e.g. a read-only view from a decoder: torch wants to own writable memory
        arr = arr.copy()
    x = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
    if x.shape[-2:] != (img_size, img_size):
        x = F.interpolate(x[None], size=(img_size, img_size), mode="bicubic", align_corners=False,
                          antialias=True)[0].clamp_(0.0, 1.0)
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x - m) / s
