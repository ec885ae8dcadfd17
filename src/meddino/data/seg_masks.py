"""Segmentation masks on disk -> class-index arrays: CholecSeg8k's colour codes, PNG masks, label volumes.

The decoding the segmentation layouts (:mod:`meddino.data.seg_layouts`) share, kept apart from them because it
is pure array work on one file (no case lists, no configs):

- CholecSeg8k (``*_watershed_mask.png``): grey masks (R = G = B) with the codes of :data:`CHOLECSEG8K_GREY`;
  the colour masks' RGB codes (:data:`CHOLECSEG8K_RGB`) are accepted too. Grey 0 (unannotated pixels) and
  255 (the 1-pixel white edge the annotation tool draws between regions) are not classes: they become
  ``ignore_index``. Any other value is an error naming the file and the colour. Excluded classes map to
  background or to ``ignore_index`` (:func:`cholecseg8k_table`).
- PNG masks of class indices (:func:`read_png_mask`): mode ``L``, ``P`` (the palette index is the class) or
  16-bit; an RGB mask is accepted when its three channels are equal, or with a colour -> class table.
- Label volumes (:func:`read_label_volume`): integer labels read with :func:`meddino.data.volumes.read_volume`.

A label outside the class map (other than ``ignore_index``) is a :class:`~meddino.errors.DataError` naming
the file (:func:`check_labels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from meddino.data.volumes import read_volume
from meddino.errors import ConfigError, DataError

#: The 13 classes of CholecSeg8k (Hong et al. 2020), in the dataset's own index order.
CHOLECSEG8K_CLASSES: tuple[str, ...] = (
    "black background", "abdominal wall", "liver", "gastrointestinal tract", "fat", "grasper",
    "connective tissue", "blood", "cystic duct", "l-hook electrocautery", "gallbladder", "hepatic vein",
    "liver ligament",
)
#: Grey value of each class in the ``*_watershed_mask.png`` files (the Kaggle page writes them as
#: "#505050", "#111111", ...: the decimal value repeated on R, G and B).
CHOLECSEG8K_GREY: tuple[int, ...] = (50, 11, 21, 13, 12, 31, 23, 24, 25, 32, 22, 33, 5)
#: RGB of each class in the ``*_color_mask.png`` files (also accepted).
CHOLECSEG8K_RGB: tuple[tuple[int, int, int], ...] = (
    (127, 127, 127), (210, 140, 140), (255, 114, 114), (231, 70, 156), (186, 183, 75), (170, 255, 0),
    (255, 85, 0), (255, 0, 0), (255, 255, 0), (169, 255, 184), (255, 160, 165), (0, 50, 128), (111, 74, 0),
)
#: Unannotated (0) and region-edge (255) grey values: ignored, not classes.
CHOLECSEG8K_UNLABELLED_GREY: tuple[int, ...] = (0, 255)


def rgb_key(rgb: tuple[int, int, int] | np.ndarray) -> int:
    """24-bit key of an RGB colour (the keys of the colour -> class tables)."""
    r, g, b = (int(v) for v in rgb)
    return (r << 16) | (g << 8) | b


def cholecseg8k_table(exclude: Sequence[str], excluded_to: str, ignore_index: int) -> tuple[list[str], dict[int, int]]:
    """Kept class names and the colour-key -> new index table (keys: 24-bit RGB of grey and colour codes)."""
    known = {n.lower(): i for i, n in enumerate(CHOLECSEG8K_CLASSES)}
    excluded = set()
    for name in exclude:
        if name.lower() not in known:
            raise ConfigError(f"data.exclude_classes: unknown CholecSeg8k class '{name}' "
                              f"(known: {', '.join(CHOLECSEG8K_CLASSES)})")
        if known[name.lower()] == 0:
            raise ConfigError("data.exclude_classes: the background class cannot be excluded")
        excluded.add(known[name.lower()])
    kept = [i for i in range(len(CHOLECSEG8K_CLASSES)) if i not in excluded]
    new_index = {old: new for new, old in enumerate(kept)}
    drop_to = 0 if excluded_to == "background" else ignore_index
    table: dict[int, int] = {}
    for old in range(len(CHOLECSEG8K_CLASSES)):
        target = new_index.get(old, drop_to)
        g = CHOLECSEG8K_GREY[old]
        table[rgb_key((g, g, g))] = target
        table[rgb_key(CHOLECSEG8K_RGB[old])] = target
    for g in CHOLECSEG8K_UNLABELLED_GREY:
        table[rgb_key((g, g, g))] = ignore_index
    return [CHOLECSEG8K_CLASSES[i] for i in kept], table


def decode_color_mask(rgb: np.ndarray, table: dict[int, int], path: Path | str) -> np.ndarray:
    """[H, W, 3] uint8 colours -> [H, W] uint8 indices via ``table`` (24-bit key -> index).

    An unknown colour raises a DataError naming the file and the colour.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if np.array_equal(r, g) and np.array_equal(r, b):  # grey masks (watershed): a 256-entry lookup
        lut = np.full(256, -1, dtype=np.int16)
        for v in range(256):
            lut[v] = table.get(rgb_key((v, v, v)), -1)
        out = lut[r]
        if (out < 0).any():
            v = int(r[out < 0].ravel()[0])
            raise DataError(f"mask {path}: unknown colour ({v}, {v}, {v}) (not in the class colour table)")
        return out.astype(np.uint8)
    keys = (r.astype(np.int64) << 16) | (g.astype(np.int64) << 8) | b
    uniq, inverse = np.unique(keys, return_inverse=True)
    lut = np.empty(len(uniq), dtype=np.uint8)
    for i, k in enumerate(uniq.tolist()):
        if k not in table:
            r, g, b = (k >> 16) & 255, (k >> 8) & 255, k & 255
            raise DataError(f"mask {path}: unknown colour ({r}, {g}, {b}) (not in the class colour table)")
        lut[i] = table[k]
    return lut[inverse.reshape(keys.shape)]


def read_png_mask(path: Path, colors: dict[int, int] | None = None) -> np.ndarray:
    """A class-index mask image -> [H, W] integer array (see the module docstring for the modes).

    ``colors``: 24-bit colour key (:func:`rgb_key`) -> class index, for colour-coded RGB masks.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
                arr = np.asarray(im).astype(np.int64)
            elif mode in ("RGB", "RGBA", "LA"):
                rgb = np.asarray(im.convert("RGB"))
                if colors is not None:
                    return decode_color_mask(rgb, colors, path).astype(np.int64)
                if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                    raise DataError(f"mask {path}: colour-coded RGB mask; give data.colors (RGB per class) "
                                    "or save class indices (mode L or P)")
                arr = rgb[..., 0].astype(np.int64)
            else:
                raise DataError(f"mask {path}: unsupported image mode {mode}")
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable mask {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return arr


def check_labels(mask: np.ndarray, num_classes: int, ignore_index: int, path: Path | str) -> np.ndarray:
    """Labels must be in [0, num_classes) or ``ignore_index``; returns the mask as uint8."""
    bad = ((mask < 0) | (mask >= num_classes)) & (mask != ignore_index)
    if bad.any():
        value = mask[bad].ravel()[0]
        raise DataError(f"mask {path}: label {value} outside the class map (0..{num_classes - 1}, "
                        f"ignore {ignore_index})")
    return mask.astype(np.uint8)


def read_label_volume(path: Path) -> np.ndarray:
    """A label volume -> integer [D, H, W] labels (non-integer values are an error naming the file)."""
    vol, _ = read_volume(path)
    rounded = np.rint(vol)
    if not np.allclose(vol, rounded, atol=1e-3):
        raise DataError(f"label volume {path}: non-integer labels")
    return rounded.astype(np.int64)
