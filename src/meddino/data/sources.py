"""Pretraining sources: every 2D sample of a folder or CSV manifest, as a torch Dataset.

``PretrainSource(path)`` indexes, recognised by extension:

- images (any PIL format; 16-bit/greyscale/alpha converted by :mod:`meddino.data.io`'s rules),
- DICOM files (``.dcm``/``.dicom``/``.dic``, and extension-less files carrying the ``DICM`` magic),
- videos (sampled at ``fps``; one sample per (video, time), decoded lazily by seeking when asked for),
- volumes (NIfTI, NRRD, MHA/MHD; one sample per slice along each of ``axes``, optionally without
  near-empty slices).

A CSV manifest (``path`` ending in ``.csv``) lists files in a column ``image`` (relative to the CSV's
folder or absolute) and optionally ``patient``; each row is expanded by the same rules (a row may name a
video or a volume).

Indexing (:mod:`meddino.data.index`) is a sorted depth-first walk, listed on threads, that opens no image
file (only video and volume headers are read for their length; with ``min_foreground`` volumes are read
whole). The index lives in flat numpy arrays (paths included, as one byte blob), a few bytes per sample, so
millions of frames cost little memory in every DataLoader worker; :meth:`PretrainSource.from_index` uses one
written once by ``meddino data index`` and memory-mapped.

Unreadable samples never stop a run: ``__getitem__`` returns a :class:`Skipped` sentinel (path and reason)
instead of raising. The collate functions (:func:`collate_skip_none`, or
:func:`meddino.data.multicrop.collate_multicrop`) drop the sentinels and hand them to the main process with
the batch, where a :class:`SkipCounter` counts them; counting so happens once per sample, whatever the
number of workers, with no shared state. Files that fail already at index time (an unreadable video
header) are in ``source.index_skipped`` and should be added to the counter once (``counter.add(...)``).

Randomness: a transform that accepts ``generator=`` (like :class:`~meddino.data.multicrop.MultiCropAugmentation`)
receives a ``torch.Generator`` seeded from ``(seed, epoch, index)`` (:func:`~meddino.data.multicrop.sample_seed`);
the epoch is ``set_epoch(e)`` or passed with the index as ``dataset[(epoch, index)]`` (use the latter with
persistent workers, which do not see ``set_epoch`` calls made in the main process).
"""

from __future__ import annotations

import inspect
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, default_collate

from meddino.data import io, volumes
from meddino.data.index import KIND_DICOM, KIND_FRAME, KIND_IMAGE, KIND_SLICE, SampleIndex, build_index
from meddino.data.multicrop import sample_generator
from meddino.data.video import read_frame_at
from meddino.errors import DataError, UserError

KIND_NAMES = ("image", "dicom", "frame", "slice")


@dataclass(frozen=True)
class Skipped:
    """Sentinel returned for a sample that could not be read (picklable, crosses worker processes)."""

    path: str
    reason: str

    def __str__(self) -> str:
        """``PATH: reason``, or the reason alone when it names the path already (a reader's DataError does)."""
        return self.reason if self.path and self.path in self.reason else f"{self.path}: {self.reason}"


class SkipCounter:
    """Counts skipped samples (in the main process, from the sentinels the collate hands over) and keeps
    the first few for the end-of-run report."""

    def __init__(self, keep: int = 10):
        self.count = 0
        self.examples: list[Skipped] = []
        self.keep = keep

    def add(self, skipped: Iterable[Skipped] | Skipped | None) -> int:
        """Record sentinels (a list, one, or None); returns how many were added."""
        if skipped is None:
            return 0
        items = [skipped] if isinstance(skipped, Skipped) else list(skipped)
        self.count += len(items)
        for item in items:
            if len(self.examples) < self.keep:
                self.examples.append(item)
        return len(items)

    def merge(self, other: SkipCounter) -> SkipCounter:
        self.count += other.count
        self.examples = (self.examples + other.examples)[: self.keep]
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "examples": [(s.path, s.reason) for s in self.examples]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("count", 0))
        self.examples = [Skipped(p, r) for p, r in state.get("examples", [])][: self.keep]

    def summary(self) -> str:
        """One line for the end of a run."""
        if not self.count:
            return "no unreadable samples"
        return f"{self.count} unreadable sample(s) skipped; first: {self.examples[0]}"


def collate_skip_none(batch: Sequence[Any], collate: Callable[[list[Any]], Any] | None = None) -> tuple[Any, list[Skipped]]:
    """Drop ``None``/:class:`Skipped` items, collate the rest (default: torch's ``default_collate``).

    Returns ``(batch or None when nothing is left, skipped sentinels)``; ``len(skipped)`` is the count.
    """
    kept = [item for item in batch if item is not None and not isinstance(item, Skipped)]
    skipped = [item if isinstance(item, Skipped) else Skipped("<unknown>", "dataset returned None")
               for item in batch if item is None or isinstance(item, Skipped)]
    if not kept:
        return None, skipped
    return (collate or default_collate)(kept), skipped


class PretrainSource(Dataset):
    """Every 2D sample (image, DICOM, video frame, volume slice) under ``path`` or listed in a CSV.

    Args:
        path: a folder (searched recursively) or a ``.csv`` manifest, or one file.
        transform: called as ``transform(sample, generator=g)`` (or ``transform(sample)``) where ``sample``
            is the file path for ordinary image files (so a transform may decode at reduced size) and a
            uint8 RGB (H, W, 3) array for DICOM, frames and slices. None: the uint8 array itself.
        fps: frames per second sampled from videos.
        axes: volume axes to slice along (0 = first axis of the (z, y, x) array, i.e. axial for most CT/MR).
        window: intensity window for DICOM and volumes (preset name or (center, width)); default: the DICOM
            file's own window, or the volume's 0.5-99.5 percentiles.
        min_foreground: drop volume slices with less than this fraction of non-background pixels (reads the
            volumes at index time).
        seed: base seed of the per-sample generators.
        follow_symlinks: follow symlinked folders while walking.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        transform: Callable[..., Any] | None = None,
        fps: float = 1.0,
        axes: Sequence[int] = (0,),
        window: io.Window = None,
        min_foreground: float | None = None,
        seed: int = 0,
        follow_symlinks: bool = True,
        volume_cache: int = 2,
    ):
        self.root = Path(path).expanduser()
        if not self.root.exists():
            raise DataError(f"data path not found: {self.root}")
        if fps <= 0:
            raise UserError(f"fps must be > 0, got {fps}")
        for axis in axes:
            if axis not in (0, 1, 2):
                raise UserError(f"volume slice axes must be among 0, 1, 2, got {list(axes)}")
        io.resolve_window(window, "window")
        self.transform = transform
        self.fps = float(fps)
        self.axes = tuple(int(a) for a in axes)
        self.window = window
        self.min_foreground = min_foreground
        self.seed = int(seed)
        self.epoch = 0
        self.follow_symlinks = follow_symlinks
        self.volume_cache = volume_cache
        self._cache: OrderedDict[int, tuple[np.ndarray, float, float]] = OrderedDict()
        self._takes_generator = _accepts_generator(transform)
        self._build_index()

    # ------------------------------------------------------------------------------------ index
    def _build_index(self) -> None:
        """Index in memory with :func:`meddino.data.index.build_index` (flat arrays, no list per file)."""
        self._use_index(build_index(self.root, fps=self.fps, axes=self.axes, window=self.window,
                                    min_foreground=self.min_foreground, follow_symlinks=self.follow_symlinks))

    def _use_index(self, index: SampleIndex) -> None:
        self.index = index
        self.files = index.files
        self.patients = _Patients(index)
        self.kinds = index.kinds
        self.file_index = index.file_index
        self.params = index.params
        self.slice_axes = index.slice_axes
        self.index_skipped = [Skipped(p, r) for p, r in index.skipped]

    @classmethod
    def from_index(cls, index: SampleIndex, transform: Callable[..., Any] | None = None,
                   window: io.Window = None, seed: int = 0, volume_cache: int = 2) -> PretrainSource:
        """A source over a built (usually memory-mapped, :func:`meddino.data.index.open_index`) index."""
        self = cls.__new__(cls)
        params = index.header.get("params", {})
        self.root = Path(index.header.get("source", ""))
        self.transform, self.window, self.seed, self.epoch = transform, window, int(seed), 0
        self.fps, self.axes = float(params.get("fps", 1.0)), tuple(params.get("axes", (0,)))
        self.min_foreground = params.get("min_foreground")
        self.follow_symlinks = bool(params.get("follow_symlinks", True))
        self.volume_cache = volume_cache
        self._cache = OrderedDict()
        self._takes_generator = _accepts_generator(transform)
        self._use_index(index)
        return self

    # ------------------------------------------------------------------------------------ access
    def __len__(self) -> int:
        return int(self.kinds.shape[0])

    def set_epoch(self, epoch: int) -> None:
        """The epoch mixed into each sample's seed (call before iterating, without persistent workers)."""
        self.epoch = int(epoch)

    def describe(self, index: int) -> dict[str, Any]:
        """What sample ``index`` is: kind, file, time (frames) or axis/slice (volumes), patient."""
        kind = int(self.kinds[index])
        fid = int(self.file_index[index])
        out: dict[str, Any] = {"kind": KIND_NAMES[kind], "path": self.files[fid], "patient": self.patients[fid]}
        if kind == KIND_FRAME:
            out["time_s"] = float(self.params[index])
        elif kind == KIND_SLICE:
            out["axis"] = int(self.slice_axes[index])
            out["slice"] = int(self.params[index])
        return out

    def counts(self) -> dict[str, int]:
        """Samples per kind, e.g. ``{"image": 120, "frame": 3600, ...}``."""
        values, n = np.unique(self.kinds, return_counts=True)
        return {KIND_NAMES[int(v)]: int(c) for v, c in zip(values, n)}

    def load(self, index: int) -> str | np.ndarray:
        """Sample ``index`` before the transform: a path (ordinary images) or uint8 RGB (H, W, 3)."""
        kind = int(self.kinds[index])
        path = self.files[int(self.file_index[index])]
        if kind == KIND_IMAGE:
            return path
        if kind == KIND_DICOM:
            return io.read_image(path, window=self.window)
        if kind == KIND_FRAME:
            return read_frame_at(path, float(self.params[index]))
        volume, lo, hi = self._volume(int(self.file_index[index]))
        return volumes.volume_slice(volume, int(self.slice_axes[index]), int(self.params[index]), lo, hi)

    def _volume(self, fid: int) -> tuple[np.ndarray, float, float]:
        hit = self._cache.get(fid)
        if hit is not None:
            self._cache.move_to_end(fid)
            return hit
        volume, _ = volumes.read_volume(self.files[fid])
        lo, hi = volumes.volume_window_range(volume, self.window)
        self._cache[fid] = (volume, lo, hi)
        while len(self._cache) > max(self.volume_cache, 1):
            self._cache.popitem(last=False)
        return volume, lo, hi

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (self.epoch, int(key))
        if index < 0:
            index += len(self)
        path = self.files[int(self.file_index[index])]
        try:
            sample = self.load(index)
            if self.transform is None:
                return io.read_image(sample) if isinstance(sample, str) else sample
            if self._takes_generator:
                out = self.transform(sample, generator=sample_generator(self.seed, epoch, index))
            else:
                if isinstance(sample, str):
                    sample = io.read_image(sample)
                out = self.transform(sample)
        except (DataError, OSError, ValueError, EOFError, MemoryError) as exc:
            return Skipped(path, _one_line(exc))
        if isinstance(out, dict):
            out["index"] = index
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # volumes are reloaded per worker, never pickled
        return state

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v}" for k, v in self.counts().items())
        return f"PretrainSource({self.root}, {len(self)} samples: {parts}; {len(self.index_skipped)} unreadable)"


class _Patients:
    """``patients[fid]``: the manifest's patient of file ``fid`` or None, read from the index's codes."""

    def __init__(self, index: SampleIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index.files)

    def __getitem__(self, fid: int) -> str | None:
        return self.index.patient(fid)


def _accepts_generator(transform: Callable[..., Any] | None) -> bool:
    if transform is None:
        return False
    try:
        return "generator" in inspect.signature(transform).parameters
    except (TypeError, ValueError):
        return False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
