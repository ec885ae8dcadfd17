"""3D volumes: NIfTI, NRRD and MetaImage readers, header-only shapes, and slices as uint8 RGB images.

Apart from :mod:`.io` (2D images and DICOM) because the volume path has its own readers (nibabel, pynrrd,
SimpleITK, each imported only when a file of its format is read), its own axis convention and a
whole-volume intensity mapping; it reuses :mod:`.io`'s window rules and file kinds, so both stay alike.

Volumes (:func:`read_volume`) come back as ``float32 [D, H, W]`` in physical units plus the voxel spacing
``(z, y, x)`` in mm; :func:`volume_slices` turns them into uint8 RGB slices with the same window rules.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddino.data.io import Window, file_suffix, gray_to_rgb, minmax_to_uint8, resolve_window
from meddino.errors import DataError, first_line


def read_volume(path: str | os.PathLike[str]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """NIfTI (.nii/.nii.gz, nibabel), NRRD (.nrrd/.nhdr, pynrrd), MetaImage (.mha/.mhd, SimpleITK) ->
    ``(float32 [D, H, W], spacing (z, y, x) mm)``.

    Axis order follows the file's own storage: NIfTI/NRRD arrays are (x, y, z) on disk and are transposed to
    (z, y, x); SimpleITK already gives (z, y, x). No reorientation to a canonical frame is done (slices of
    a pretraining source need not be oriented; a downstream task that needs orientation must do it). NIfTI
    scl_slope/scl_inter are applied. A 4D volume keeps its first time point.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"volume not found: {p}")
    if p.stat().st_size == 0:
        raise DataError(f"empty volume file (0 bytes): {p}")
    suffix = file_suffix(p)
    try:
        if suffix in (".nii", ".nii.gz"):
            import nibabel as nib  # why: format reader, only for its files

            img = nib.load(str(p))
            data = np.asarray(img.dataobj, dtype=np.float32)
            zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
            data, zooms = _xyz_to_zyx(data, zooms)
        elif suffix in (".nrrd", ".nhdr"):
            import nrrd  # why: format reader, only for its files

            raw, header = nrrd.read(str(p))
            data = np.asarray(raw, dtype=np.float32)
            zooms = _nrrd_spacing(header, data.ndim)
            data, zooms = _xyz_to_zyx(data, zooms)
        elif suffix in (".mha", ".mhd"):
            import SimpleITK as sitk  # why: format reader, only for its files

            img = sitk.ReadImage(str(p))
            if img.GetNumberOfComponentsPerPixel() > 1:
                img = sitk.VectorIndexSelectionCast(img, 0)
            data = sitk.GetArrayFromImage(img).astype(np.float32)
            sx, sy, *rest = img.GetSpacing()
            zooms = (float(rest[0]) if rest else 1.0, float(sy), float(sx))
            if data.ndim == 2:
                data = data[None]
        else:
            raise DataError(f"not a volume format (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd): {p}")
    except DataError:
        raise
    except Exception as exc:  # nibabel/pynrrd/SimpleITK raise their own error types for corrupt files
        raise DataError(f"unreadable volume {p}: {first_line(exc)}") from None
    if data.ndim != 3:
        raise DataError(f"volume {p} has {data.ndim} dimensions after loading, expected 3")
    return np.ascontiguousarray(data), zooms


def _xyz_to_zyx(data: np.ndarray, zooms: Sequence[float]) -> tuple[np.ndarray, tuple[float, float, float]]:
    while data.ndim > 3:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    zooms = list(zooms) + [1.0] * (3 - len(zooms))
    return np.transpose(data, (2, 1, 0)), (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def _nrrd_spacing(header: dict[str, Any], ndim: int) -> tuple[float, ...]:
    if "spacings" in header:
        return tuple(float(s) if np.isfinite(s) else 1.0 for s in header["spacings"][:3])
    if "space directions" in header:
        out = []
        for row in header["space directions"]:
            row = np.asarray(row, dtype=np.float64)
            if row.size and np.all(np.isfinite(row)):
                out.append(float(np.linalg.norm(row)))
        return tuple(out[:3]) if out else (1.0,) * min(ndim, 3)
    return (1.0,) * min(ndim, 3)


def volume_shape(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """``(D, H, W)`` from the header only (no voxel data read), in :func:`read_volume`'s axis order."""
    p = Path(path)
    suffix = file_suffix(p)
    try:
        if suffix in (".nii", ".nii.gz"):
            import nibabel as nib  # why: format reader, only for its files

            shape = tuple(int(s) for s in nib.load(str(p)).shape[:3])
        elif suffix in (".nrrd", ".nhdr"):
            import nrrd  # why: format reader, only for its files

            shape = tuple(int(s) for s in nrrd.read_header(str(p))["sizes"][:3])
        elif suffix in (".mha", ".mhd"):
            import SimpleITK as sitk  # why: format reader, only for its files

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(p))
            reader.ReadImageInformation()
            size = reader.GetSize()  # (x, y, z)
            return (int(size[2]) if len(size) > 2 else 1, int(size[1]), int(size[0]))
        else:
            raise DataError(f"not a volume format: {p}")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"unreadable volume {p}: {first_line(exc)}") from None
    shape = shape + (1,) * (3 - len(shape))
    return shape[2], shape[1], shape[0]


def volume_window_range(volume: np.ndarray, window: Window = None,
                        percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
    """The intensity range ``(lo, hi)`` mapped to 0..255 for a whole volume: the window's if given, else
    robust per-volume percentiles (so all slices of a volume share one mapping and a few hot voxels
    do not wash out the rest)."""
    win = resolve_window(window)
    if win is not None:
        center, width = win
        return center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, percentiles)
    return float(lo), float(hi)


def volume_slice(volume: np.ndarray, axis: int, index: int, lo: float, hi: float) -> np.ndarray:
    """One slice -> uint8 RGB (H, W, 3), intensities ``[lo, hi]`` mapped linearly to 0..255."""
    sl = np.take(volume, index, axis=axis)
    return gray_to_rgb(minmax_to_uint8(sl, lo, hi))


def volume_slices(volume: np.ndarray, axes: Sequence[int] = (0,), window: Window = None,
                  min_foreground: float | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(axis, index, uint8 RGB slice)`` along each of ``axes`` (0 = axial for (z, y, x) volumes).

    ``window``: a preset / (center, width) in the volume's units, else the volume's 0.5-99.5 percentiles.
    ``min_foreground``: skip slices whose fraction of pixels above 0 (after windowing) is below it.
    """
    lo, hi = volume_window_range(volume, window)
    for axis in axes:
        if axis not in (0, 1, 2):
            raise DataError(f"volume slice axis must be 0, 1 or 2, got {axis}")
        for index in range(volume.shape[axis]):
            rgb = volume_slice(volume, axis, index, lo, hi)
            if min_foreground is not None and foreground_fraction(rgb) < min_foreground:
                continue
            yield axis, index, rgb


def foreground_fraction(rgb: np.ndarray, threshold: int = 8) -> float:
    """Fraction of pixels brighter than ``threshold`` (a near-empty slice of air/background scores ~0)."""
    gray = rgb[..., 0] if rgb.ndim == 3 else rgb
    return float((gray > threshold).mean()) if gray.size else 0.0
