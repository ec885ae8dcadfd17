"""Turning decoded images into model inputs, the same way for every downstream task."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# the ImageNet statistics every DINO release normalises with (a checkpoint's JSON may name others)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(rgb: np.ndarray, img_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]
              ) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised float [3, h, w]; a batch (B, H, W, 3) -> [B, 3, h, w].

    ``img_size``: the side S of a square input, or (h, w). Resized with antialiased bicubic interpolation
    (clamped to [0, 1] before normalising) only when the size differs. A resized single image comes back
    contiguous; a batch keeps the image's channels-last memory order.
    """
    size = (int(img_size), int(img_size)) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    # a fresh C-ordered copy: writable (a decoder may hand out read-only views) and with canonical strides
    # even on length-1 axes (``image[None]`` has stride 0 there), which decide the memory order of the result
    x = torch.from_numpy(np.array(rgb, order="C", copy=True))
    single = x.ndim == 3
    x = (x.permute(2, 0, 1) if single else x.permute(0, 3, 1, 2)).float().div_(255.0)
    if tuple(x.shape[-2:]) != size:
        resized = F.interpolate(x[None] if single else x, size=size, mode="bicubic", align_corners=False,
                                antialias=True)
        x = (resized[0] if single else resized).clamp_(0.0, 1.0)
    shape = (3, 1, 1) if single else (1, 3, 1, 1)  # same rank as x: the result keeps x's memory order
    m = torch.tensor(mean, dtype=x.dtype).view(shape)
    s = torch.tensor(std, dtype=x.dtype).view(shape)
    return (x - m) / s
