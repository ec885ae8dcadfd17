"""``meddino eval seg``'s data: the config's layout read into cases, and the torch dataset of frames.

:func:`load_seg_data` turns ``data.*`` into a :class:`~meddino.data.seg_layouts.SegData` through the layout
readers of :mod:`meddino.data.seg_layouts` (which hold the layouts' description); :class:`FrameDataset`
serves every 2-D image and every slice of every volume, resized to the network input
(:func:`meddino.data.transforms.to_tensor`, bicubic; masks nearest neighbour) and augmented for training
(:func:`augment`). Folds are in :mod:`.folds`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from meddino.data.seg_layouts import (
    LoadedCase,
    SegCase,
    SegData,
    cholecseg8k_layout,
    manifest_layout,
    msd_layout,
    read_case,
    scan,
)
from meddino.data.seg_masks import read_png_mask
from meddino.data.transforms import to_tensor
from meddino.data.volumes import volume_shape
from meddino.errors import ConfigError, DataError
from meddino.tasks.seg.config import SegDataConfig


def load_seg_data(cfg: SegDataConfig, check: bool = True) -> SegData:
    """Build the case list for ``cfg.layout``, decode every mask once (``check``) and validate it."""
    ignore = cfg.ignore_index
    if cfg.layout == "manifest":
        layout = manifest_layout(cfg.manifest, cfg.classes, cfg.colors, cfg.split_column, cfg.fold_column)
    elif cfg.layout == "cholecseg8k":
        layout = cholecseg8k_layout(cfg.root, cfg.exclude_classes, cfg.excluded_to, ignore)
    else:
        layout = msd_layout(cfg.root, cfg.classes)
    cases, classes = layout.cases, layout.classes
    if ignore < len(classes):
        raise ConfigError(f"data.ignore_index {ignore} collides with a class index (there are {len(classes)} classes)")
    if cfg.max_items is not None:
        cases = cases[: cfg.max_items]
    if not cases:
        where = cfg.manifest if cfg.layout == "manifest" else cfg.root
        raise DataError(f"no image/mask pairs found in {where} (layout {cfg.layout})")
    data = SegData(cases=cases, classes=classes, ignore_index=ignore, name=layout.name,
                   decode=layout.decode or (lambda p: read_png_mask(p)), window=cfg.window)
    if check:
        scan(data)
    return data


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """[H, W] labels -> [h, w] long, nearest neighbour (labels are never interpolated)."""
    m = torch.from_numpy(np.array(mask, dtype=np.int64))
    if tuple(m.shape) == tuple(size):
        return m
    return torch.nn.functional.interpolate(m[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, ignore_index: int,
            degrees: float = 30.0, p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed 000's augmentation: horizontal flip, vertical flip and a rotation, each with probability ``p``.

    The rotation angle is uniform in [-degrees, degrees]; the image is filled with 0 (after
    normalisation, the mean colour) and the mask with ``ignore_index`` where the rotation uncovers pixels.
    """
    draws = torch.rand(4, generator=gen).tolist()
    if draws[0] < p:
        x, y = x.flip(-1), y.flip(-1)
    if draws[1] < p:
        x, y = x.flip(-2), y.flip(-2)
    if draws[2] < p:
        angle = (2 * draws[3] - 1) * degrees
        x = TF.rotate(x, angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)
        y = TF.rotate(y[None].to(torch.uint8), angle, interpolation=InterpolationMode.NEAREST,
                      fill=float(ignore_index))[0].long()
    return x, y


def num_frames(cases: Sequence[SegCase]) -> int:
    """How many frames :class:`FrameDataset` serves for ``cases`` (a volume's slices read from its header)."""
    return sum(volume_shape(c.image)[0] if c.kind == "volume" else 1 for c in cases)


class FrameDataset(torch.utils.data.Dataset):
    """Training / validation frames: every 2-D image, every slice of every volume (read once, cached)."""

    def __init__(self, data: SegData, cases: Sequence[SegCase], size: tuple[int, int],
                 mean: Sequence[float], std: Sequence[float], train: bool = False, seed: int = 0,
                 rotation_degrees: float = 30.0):
        self.data, self.cases = data, list(cases)
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.train, self.seed, self.epoch = train, seed, 0
        self.rotation_degrees = rotation_degrees
        self._cache: dict[int, LoadedCase] = {}
        self.index: list[tuple[int, int]] = []
        for ci, case in enumerate(self.cases):
            depth = volume_shape(case.image)[0] if case.kind == "volume" else 1
            self.index.extend((ci, s) for s in range(depth))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def _case(self, ci: int) -> LoadedCase:
        case = self.cases[ci]
        if case.kind != "volume":
            return read_case(self.data, case)
        if ci not in self._cache:
            self._cache[ci] = read_case(self.data, case)
        return self._cache[ci]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ci, s = self.index[i]
        loaded = self._case(ci)
        # the slice as a batch of one: the channels-last memory order seg training has always been fed
        x = to_tensor(loaded.image[s : s + 1], self.size, self.mean, self.std)[0]
        y = resize_mask(loaded.mask[s], self.size)
        if self.train:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
            x, y = augment(x, y, gen, self.data.ignore_index, self.rotation_degrees)
        return x, y
