"""Random geometric augmentation of labelled training images (``meddino eval finetune``).

Seed 002 (MediDino) fine-tunes with torchvision's ``RandomRotation(10)``, ``RandomHorizontalFlip()``,
``RandomResizedCrop(224, scale=(0.9, 1.1))``, ``RandomAffine(0, shear=10)`` and ``RandomAffine(0,
translate=(0.1, 0.1))``, in that order, each on every image (the flip with probability 0.5), after the
resize to 224 and on training images only. :class:`GeometricAugment` is that set with its ranges as options;
an option at 0 (or None) leaves its op out. Parameters are drawn as torchvision draws them (uniform angles,
shifts rounded to whole pixels, the Inception crop of :func:`crop_box`) but from a ``torch.Generator`` the
caller seeds per (seed, epoch, image), so a run is reproducible with any number of loader workers.

The kernels are torchvision's functional ops on a float [C, H, W] tensor, nearest neighbour for rotation,
shear and translation (torchvision's default there) and antialiased bilinear for the crop's resize (the
default of ``RandomResizedCrop``). Uncovered pixels get ``fill`` (one value per channel): the caller passes
the normalised value of black, what torchvision's fill 0 gives before normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

NEAREST = InterpolationMode.NEAREST
CROP_TRIES = 10  # draws before the crop falls back to the central crop (torchvision's count)


# ---------------------------------------------------------------------------------------------- kernels
def rotate(x: torch.Tensor, angle: float, fill: Sequence[float]) -> torch.Tensor:
    """Rotate counter-clockwise by ``angle`` degrees about the image centre, same size, nearest neighbour."""
    return TF.rotate(x, angle, interpolation=NEAREST, expand=False, fill=list(fill))


def shear_x(x: torch.Tensor, angle: float, fill: Sequence[float]) -> torch.Tensor:
    """Horizontal shear by ``angle`` degrees about the centre: the pixel ``dy`` rows below the centre moves
    ``-dy * tan(angle)`` columns (positive angles move the rows above the centre right), rows keep their place."""
    return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[float(angle), 0.0], interpolation=NEAREST,
                     fill=list(fill))


def translate(x: torch.Tensor, dx: int, dy: int, fill: Sequence[float]) -> torch.Tensor:
    """Shift by whole pixels: ``out[..., r + dy, c + dx] = x[..., r, c]``; uncovered pixels are ``fill``."""
    return TF.affine(x, angle=0.0, translate=[int(dx), int(dy)], scale=1.0, shear=[0.0, 0.0], interpolation=NEAREST,
                     fill=list(fill))


def resized_crop(x: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """Crop ``box`` = (top, left, height, width) and resize it to ``size`` (antialiased bilinear)."""
    top, left, h, w = box
    return TF.resized_crop(x, top, left, h, w, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)


# ---------------------------------------------------------------------------------------------- draws
def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return float(torch.empty(1).uniform_(lo, hi, generator=gen).item())


def crop_box(gen: torch.Generator, height: int, width: int, scale: Sequence[float],
             ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """The Inception crop (torchvision's ``RandomResizedCrop``): up to 10 draws of an area fraction in
    ``scale`` and a log-uniform aspect ratio in ``ratio``; the first box that fits is placed uniformly; when
    none fits, the central crop of the image clamped to ``ratio`` (the whole image when its ratio is inside).
    A fraction above 1 never fits, so seed 002's scale (0.9, 1.1) crops 90-100 % of the image, or keeps it
    whole: there is no zoom-out. Returns (top, left, height, width)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_TRIES):
        target = area * _uniform(gen, scale[0], scale[1])
        aspect = math.exp(_uniform(gen, log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class GeometricAugment:
    """Seed 002's training augmentation (module docstring); each field at 0 / None leaves its op out.

    ``rotation``: angle uniform in +/- degrees; ``hflip``: flip probability; ``crop_scale`` / ``crop_ratio``:
    the resized crop's area-fraction and aspect-ratio ranges; ``shear``: x-shear angle uniform in +/- degrees;
    ``translate``: shift uniform in +/- this fraction of the width (columns) and of the height (rows)."""

    rotation: float = 0.0
    hflip: float = 0.0
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    shear: float = 0.0
    translate: float = 0.0

    @property
    def active(self) -> bool:
        return bool(self.rotation or self.hflip or self.crop_scale or self.shear or self.translate)

    def sample(self, gen: torch.Generator, height: int, width: int) -> dict[str, Any]:
        """The parameters for one image, drawn in the order the ops run (only those of active ops)."""
        p: dict[str, Any] = {}
        if self.rotation:
            p["angle"] = _uniform(gen, -self.rotation, self.rotation)
        if self.hflip:
            p["flip"] = bool(torch.rand(1, generator=gen).item() < self.hflip)
        if self.crop_scale:
            p["box"] = crop_box(gen, height, width, self.crop_scale, self.crop_ratio)
        if self.shear:
            p["shear"] = _uniform(gen, -self.shear, self.shear)
        if self.translate:
            p["shift"] = (int(round(_uniform(gen, -self.translate * width, self.translate * width))),
                          int(round(_uniform(gen, -self.translate * height, self.translate * height))))
        return p

    @staticmethod
    def apply(x: torch.Tensor, params: dict[str, Any], fill: Sequence[float]) -> torch.Tensor:
        """Rotate, flip, crop (back to the input size), shear, translate: the seed's order."""
        if "angle" in params:
            x = rotate(x, params["angle"], fill)
        if params.get("flip"):
            x = x.flip(-1)
        if "box" in params:
            x = resized_crop(x, params["box"], (x.shape[-2], x.shape[-1]))
        if "shear" in params:
            x = shear_x(x, params["shear"], fill)
        if "shift" in params:
            x = translate(x, *params["shift"], fill)
        return x

    def __call__(self, x: torch.Tensor, gen: torch.Generator, fill: Sequence[float]) -> torch.Tensor:
        return self.apply(x, self.sample(gen, int(x.shape[-2]), int(x.shape[-1])), fill)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The generator seed of one image in one epoch: distinct per (seed, epoch, index), fixed across runs."""
    return ((int(seed) * 1_000_003 + int(epoch)) * 10_000_019 + int(index)) % (2**63)


__all__ = ["GeometricAugment", "crop_box", "resized_crop", "rotate", "sample_seed", "shear_x", "translate"]
