"""Readers for the 2D inputs meddino sees (photos/frames, 16-bit scans, DICOM), window rules, file kinds.

One convention everywhere (pretraining and downstream tasks alike): a 2D image comes back as a C-contiguous
``numpy.ndarray`` of dtype ``uint8`` and shape ``(H, W, 3)``, RGB. Intensity images (greyscale, 16-bit PNG/TIFF,
float TIFF, DICOM, volume slices) are mapped to 0..255 by a documented rule and repeated on three channels,
because every DINO backbone expects RGB input.

- 8-bit images (any PIL format): converted to RGB; palette images through their palette; alpha (RGBA, LA,
  palette transparency) is composited over black, the usual background of medical and endoscopic frames.
- 16-bit / 32-bit / float images without a window: each file is min-max scaled by its own range
  (``(x - min) / (max - min)``; a constant image maps to 0). The rule is exact and reversible up to
  quantisation; pass ``window=(center, width)`` or a preset name to use a fixed window instead.
- DICOM (``.dcm``/``.dicom`` or any file with the ``DICM`` magic at byte 128): the modality LUT
  (RescaleSlope/RescaleIntercept) maps stored values to physical units (e.g. Hounsfield units), then the
  VOI window is applied with the linear function of DICOM PS3.3 C.11.2.1.2.1 -- the ``window`` argument if
  given (a preset name from :data:`WINDOW_PRESETS` or ``(center, width)``), else the file's own
  WindowCenter/WindowWidth, else min-max. MONOCHROME1 images (where high values are dark) are inverted.
  Colour DICOM (RGB/YBR) is returned as RGB without windowing.
- Corrupt, truncated, zero-byte or unsupported files raise :class:`~meddino.errors.DataError` with one line
  naming the file, never a decoder traceback.

``size_hint`` lets JPEG files decode at 1/2, 1/4 or 1/8 resolution in the DCT domain (``Image.draft``): the
decoder picks the smallest scale whose size is still at least the hint, so the result is never smaller than
asked. This is the large speed-up for big frames when only a smaller image is needed.

Volumes (NIfTI, NRRD, MetaImage) are read by :mod:`meddino.data.volumes` with the same window rules.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from meddino.errors import DataError, first_line

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm",
     ".pbm", ".pnm", ".tga", ".jp2", ".j2k"}
)
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom", ".dic"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv",
                              ".ts", ".mts", ".ogv"})
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

#: Named VOI windows ``(center, width)`` in the units of the modality LUT (Hounsfield units for CT).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "ct_lung": (-600.0, 1500.0),
    "ct_soft": (40.0, 400.0),
    "ct_abdomen": (40.0, 400.0),
    "ct_bone": (400.0, 1800.0),
    "ct_mediastinum": (50.0, 350.0),
    "ct_liver": (60.0, 160.0),
    "brain": (40.0, 80.0),
    "ct_brain": (40.0, 80.0),
    "ct_stroke": (40.0, 40.0),
}

Window = str | tuple[float, float] | None


# ---------------------------------------------------------------------------------------------- file kinds
def file_suffix(path: str | os.PathLike[str]) -> str:
    """The lower-case extension that names a file's kind: ``.nii.gz`` counts as one."""
    name = os.fspath(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """A 2D image format PIL reads (by extension)."""
    return file_suffix(path) in IMAGE_EXTENSIONS


def is_video_file(path: str | os.PathLike[str]) -> bool:
    """A video container PyAV decodes (by extension)."""
    return file_suffix(path) in VIDEO_EXTENSIONS


def is_volume_file(path: str | os.PathLike[str]) -> bool:
    """A 3D volume: NIfTI, NRRD or MetaImage (by extension)."""
    return file_suffix(path) in VOLUME_EXTENSIONS


def is_dicom_file(path: str | os.PathLike[str], check_magic: bool = True) -> bool:
    """A DICOM file: ``.dcm``/``.dicom``/``.dic``, or (``check_magic``) an extension-less file whose bytes
    128..131 are ``DICM`` (PACS exports often have no extension). Only extension-less files are opened."""
    suffix = file_suffix(path)
    if suffix in DICOM_EXTENSIONS:
        return True
    extensionless = suffix == "" or suffix[1:].isdigit()  # "IM0001", "1.2.840.113619.2.55.3"
    if not (check_magic and extensionless):
        return False
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- windowing
def resolve_window(window: Window, where: str = "window") -> tuple[float, float] | None:
    """A preset name or ``(center, width)`` -> ``(center, width)``; None stays None."""
    if window is None:
        return None
    if isinstance(window, str):
        key = window.lower()
        if key not in WINDOW_PRESETS:
            raise DataError(f"{where}: unknown window preset '{window}' (known: {', '.join(sorted(WINDOW_PRESETS))})")
        return WINDOW_PRESETS[key]
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise DataError(f"{where}: a window is a preset name or (center, width), got {window!r}") from None
    if width <= 0:
        raise DataError(f"{where}: window width must be > 0, got {width}")
    return center, width


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear VOI function onto 0..255 (uint8).

    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255, clipped below ``c - 0.5 - (w - 1)/2`` and above
    ``c - 0.5 + (w - 1)/2``. (For w = 1 the standard makes it a threshold at c - 0.5.)
    """
    x = np.asarray(values, dtype=np.float64)
    if width <= 1:
        return np.where(x > center - 0.5, 255, 0).astype(np.uint8)
    y = ((x - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def minmax_to_uint8(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Linear map of ``[lo, hi]`` (default: the array's own min and max) onto 0..255; constant -> 0."""
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.all():
        x = np.where(finite, x, np.nan)
    lo = float(np.nanmin(x)) if lo is None else lo
    hi = float(np.nanmax(x)) if hi is None else hi
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(x.shape, dtype=np.uint8)
    y = (x - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(np.nan_to_num(y, nan=0.0)), 0, 255).astype(np.uint8)


def intensity_to_uint8(values: np.ndarray, window: Window = None, where: str = "image") -> np.ndarray:
    """Intensity array -> uint8 by a window (preset or (center, width)) if given, else min-max."""
    win = resolve_window(window, where)
    if win is None:
        return minmax_to_uint8(values)
    return apply_window(values, *win)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (H, W, 3) uint8, C-contiguous."""
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


# ---------------------------------------------------------------------------------------------- 2D images
def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open a PIL-readable image lazily (header only, nothing decoded yet); DataError if it cannot be."""
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            raise DataError(f"empty image file (0 bytes): {p}")
        return Image.open(p)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"image not found: {p}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"unreadable image {p}: {first_line(exc)}") from None


def pil_to_rgb(im: Image.Image, size_hint: int | tuple[int, int] | None = None, window: Window = None,
               where: str = "image") -> np.ndarray:
    """Decode an opened PIL image to uint8 RGB (H, W, 3) by the module's rules (see module docstring)."""
    try:
        if size_hint is not None and im.format == "JPEG":
            hint = (size_hint, size_hint) if isinstance(size_hint, int) else tuple(size_hint)
            im.draft("RGB", (max(1, int(hint[0])), max(1, int(hint[1]))))
        im.load()
        mode = im.mode
        if mode == "RGB" and window is None:
            return np.array(im, dtype=np.uint8)  # a writable copy (np.asarray would be read-only)
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F") or window is not None and mode in ("L", "LA"):
            arr = np.asarray(im.convert("L") if mode == "LA" else im)
            if mode == "I;16B" or arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("="))
            return gray_to_rgb(intensity_to_uint8(arr, window, where))
        if mode == "L":
            return gray_to_rgb(np.asarray(im, dtype=np.uint8))
        if mode == "1":
            return gray_to_rgb(np.asarray(im.convert("L"), dtype=np.uint8))
        if mode == "P":
            im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
            mode = im.mode
        if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
            alpha = rgba[..., 3:4] / 255.0
            return np.ascontiguousarray(np.clip(np.rint(rgba[..., :3] * alpha), 0, 255).astype(np.uint8))
        if mode == "I;16" or mode.startswith("I;16"):
            return gray_to_rgb(intensity_to_uint8(np.asarray(im.convert("I")), window, where))
        return np.array(im.convert("RGB"), dtype=np.uint8)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError) as exc:
        raise DataError(f"unreadable image {where}: {first_line(exc)}") from None


def read_image(path: str | os.PathLike[str], size_hint: int | tuple[int, int] | None = None,
               window: Window = None, frame: int = 0) -> np.ndarray:
    """Any 2D image file -> uint8 RGB ``(H, W, 3)``.

    ``size_hint`` (int or (width, height)): the smallest size needed; JPEGs then decode at a reduced DCT
    scale that still covers it (others ignore it). ``window``: a preset name (:data:`WINDOW_PRESETS`) or
    ``(center, width)`` for intensity images and DICOM; default is the DICOM file's own window, else the
    image's min-max. ``frame``: which frame of a multi-frame DICOM/TIFF/GIF.
    """
    p = Path(path)
    if is_dicom_file(p):
        return read_dicom(p, window=window, frame=frame)
    im = open_image(p)
    try:
        if frame:
            try:
                im.seek(frame)
            except EOFError:
                raise DataError(f"image {p} has no frame {frame}") from None
        return pil_to_rgb(im, size_hint=size_hint, window=window, where=str(p))
    finally:
        im.close()


#: PIL modes of a JPEG that torchvision's decoder gives exactly as PIL does (to RGB, greyscale repeated on 3
#: channels); CMYK/YCCK JPEGs stay with PIL.
TORCH_JPEG_MODES = ("RGB", "L")


def decode_jpeg_torch(data: Any, device: Any = "cpu") -> Any:
    """``torchvision.io.decode_jpeg`` of uint8 byte tensor(s) (one, or a list: one batched call) to RGB
    ``[3, H, W]`` uint8 on ``device`` (libjpeg on the CPU, nvJPEG on a GPU); raises RuntimeError for bytes
    that do not decode. On the CPU it returns the pixels PIL does, channels-last strided, and is about a
    quarter faster than PIL plus its copy into numpy (no per-line unpacking into PIL's 4-byte pixels)."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg  # why: torchvision only where JPEGs go to it

    with warnings.catch_warnings():  # torchvision 0.29 says its decoders will move to torchcodec
        warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def decoder_reason(exc: BaseException) -> str:
    """torchvision's decoder message without its source location ('decode_jpeg, .../x.cpp:171, WHY')."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.rsplit(", ", 1)[-1] if ".cpp:" in text else text


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) from the header alone (PIL formats) or the DICOM Rows/Columns, without decoding."""
    p = Path(path)
    if is_dicom_file(p):
        ds = _dcmread(p, stop_before_pixels=True)
        return int(ds.Columns), int(ds.Rows)
    with open_image(p) as im:
        return im.size


# ---------------------------------------------------------------------------------------------- DICOM
def _dcmread(path: Path, stop_before_pixels: bool = False) -> Any:
    import pydicom  # why: pydicom (~0.5 s) only when a DICOM file is read
    from pydicom.errors import InvalidDicomError  # why: as above

    try:
        if path.stat().st_size == 0:
            raise DataError(f"empty DICOM file (0 bytes): {path}")
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"DICOM file not found: {path}") from None
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"unreadable DICOM {path}: {first_line(exc)}") from None


def _first(value: Any) -> float:
    """WindowCenter/Width may be multi-valued; the first value is the default window."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def read_dicom(path: str | os.PathLike[str], window: Window = None, frame: int = 0) -> np.ndarray:
    """DICOM -> uint8 RGB (H, W, 3): modality LUT, VOI window (argument > file > min-max), MONOCHROME1 inverted."""
    p = Path(path)
    ds = _dcmread(p)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for missing/compressed/truncated pixel data
        raise DataError(f"DICOM {p} has no decodable pixel data: {first_line(exc)}") from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    colour = int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1
    if n_frames > 1:
        if not 0 <= frame < n_frames:
            raise DataError(f"DICOM {p} has {n_frames} frames, asked for frame {frame}")
        pixels = pixels[frame]
    if colour:  # pydicom >= 3 already converts YBR_* to RGB in pixel_array
        if pixels.dtype != np.uint8:
            pixels = minmax_to_uint8(pixels)
        return np.ascontiguousarray(pixels[..., :3].astype(np.uint8))
    values = modality_lut(pixels, ds)
    win = resolve_window(window, str(p))
    if win is None and "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            win = (_first(ds.WindowCenter), _first(ds.WindowWidth))
        except (TypeError, ValueError, IndexError):
            win = None
    gray = apply_window(values, *win) if win is not None and win[1] > 0 else minmax_to_uint8(values)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return gray_to_rgb(gray)


def modality_lut(pixels: np.ndarray, ds: Any) -> np.ndarray:
    """Stored values -> physical units: ``x * RescaleSlope + RescaleIntercept`` (float64)."""
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return pixels.astype(np.float64) * slope + intercept
