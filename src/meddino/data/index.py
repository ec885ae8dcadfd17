"""The sample index of a pretraining source, built once, written as one compact file and memory-mapped.

A :class:`SampleIndex` holds every 2D sample of a folder or CSV manifest (images, DICOM, video frames at
``fps``, volume slices along ``axes``) in flat numpy buffers: per sample a kind, a file number, a time or
slice number and an axis; per file its path as bytes in one blob with offsets, and a patient code. No Python
object per sample or per file exists, so DataLoader workers share the pages instead of copying them (the
copy-on-write growth of Python lists), and a memory-mapped index costs a rank only the pages it reads.

File layout (``.mdidx``): 16 magic bytes, an 8-byte little-endian header length, a JSON header (what it was
built from, the parameters, the staleness key, each array's dtype/shape/offset), then the arrays, each
64-byte aligned. The staleness key is the manifest's size and mtime (a manifest's images are not stat'ed:
4.7M rows), or for a folder the mtime of every folder of the walk (a file added, removed or renamed changes
its folder's mtime), plus size and mtime of every video and volume, whose durations and shapes are in the
index. :func:`stale_reason` says why an index no longer matches, in words.

The folder walk lists directories on a thread pool (a network filesystem answers many listings at once far
faster than one after another) and returns the same sorted depth-first order as a plain walk.
"""

from __future__ import annotations

import csv
import io as io_module
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from meddino.config import Schema
from meddino.data import io
from meddino.errors import DataError

MAGIC = b"MEDDINO-INDEX-1\n"
SUFFIX = ".mdidx"
FORMAT = 1
KIND_IMAGE, KIND_DICOM, KIND_FRAME, KIND_SLICE = 0, 1, 2, 3
_ALIGN = 64
_CHUNK = 65536
_BLOCK = 1 << 22  # bytes of a manifest parsed at once by the fast reader
# per-file categories found from the name alone; PROBE files are opened (extension-less DICOM candidates)
_CAT_SKIP, _CAT_IMAGE, _CAT_DICOM, _CAT_VIDEO, _CAT_VOLUME, _CAT_PROBE = 0, 1, 2, 3, 4, 5


def default_threads() -> int:
    """Listing and header-reading threads: I/O bound, so more than the cores (capped for small machines)."""
    return min(32, 4 * (os.cpu_count() or 1))


def default_index_path(source: str | os.PathLike[str]) -> Path:
    """Where ``meddino data index`` writes and ``meddino pretrain`` looks: beside the source
    (``frames.csv`` -> ``frames.csv.mdidx``, folder ``data/ct`` -> ``data/ct.mdidx``), never inside a
    folder it indexes (writing there would change the folder it keys on)."""
    p = Path(os.path.abspath(Path(source).expanduser()))
    return p.with_name(p.name + SUFFIX)


class StringTable:
    """A read-only sequence of strings stored as one utf-8 blob and ``n + 1`` offsets (``base`` joined to
    relative entries), so millions of paths are two arrays, not millions of Python objects."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, base: str = ""):
        self.blob, self.offsets, self.base = blob, offsets, base

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def raw(self, i: int) -> str:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return bytes(self.blob[a:b]).decode("utf-8", "surrogateescape")

    def __getitem__(self, i: int) -> str:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        name = self.raw(i)
        return os.path.join(self.base, name) if self.base and not os.path.isabs(name) else name

    def __iter__(self):  # noqa: ANN204 (a generator of str)
        return (self[i] for i in range(len(self)))


@dataclass
class SampleIndex:
    """Every sample of a source as flat arrays (see the module docstring); ``path`` is None until written
    or when opened from a file."""

    kinds: np.ndarray  # int8 per sample
    file_index: np.ndarray  # uint32 per sample
    params: np.ndarray  # float64 per sample: a frame's time (s) or a slice's number
    slice_axes: np.ndarray  # int8 per sample
    files: StringTable
    patient_codes: np.ndarray  # int32 per file, -1 = none
    patients: StringTable
    skipped: list[tuple[str, str]]  # (path, reason) of files that failed at index time
    header: dict[str, Any] = field(default_factory=dict)  # source, params, key
    path: str | None = None
    # the staleness key beyond the header: every folder walked with its mtime, every video/volume with
    # its (size, mtime)
    dirs: StringTable | None = None
    dir_mtimes: np.ndarray | None = None
    media: StringTable | None = None
    media_stat: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.kinds.shape[0])

    def patient(self, fid: int) -> str | None:
        code = int(self.patient_codes[fid])
        return None if code < 0 else self.patients[code]

    def counts(self) -> dict[str, int]:
        values, n = np.unique(np.asarray(self.kinds), return_counts=True)
        names = ("image", "dicom", "frame", "slice")
        return {names[int(v)]: int(c) for v, c in zip(values, n)}

    def __getstate__(self) -> dict[str, Any]:
        """A written index travels to worker processes as its file name and is mapped again there."""
        if self.path is not None:
            return {"_path": self.path}
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_path" in state:
            state = open_index(state["_path"]).__dict__
        self.__dict__.update(state)


# ------------------------------------------------------------------------------------------ the key
def _stat_key(path: str) -> list[int]:
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


def index_params(fps: float, axes: Iterable[int], min_foreground: float | None, window: Any,
                 follow_symlinks: bool) -> dict[str, Any]:
    """The build parameters an index is only valid for (``window`` matters only with ``min_foreground``)."""
    return {"fps": float(fps), "axes": [int(a) for a in axes], "min_foreground": min_foreground,
            "window": (list(window) if isinstance(window, (list, tuple)) else window) if min_foreground is not None else None,
            "follow_symlinks": bool(follow_symlinks)}


def params_mismatch(index: SampleIndex, params: dict[str, Any]) -> str | None:
    """``built with fps=1.0, this run asks fps=2.0`` when ``params`` differ from the index's, else None."""
    built = index.header.get("params", {})
    for name, value in params.items():
        if built.get(name) != value:
            return f"built with {name}={built.get(name)}, this run asks {name}={value}"
    return None


def stale_reason(index: SampleIndex, threads: int | None = None) -> str | None:
    """Why ``index`` no longer describes its source (None: it still does). Raises :class:`DataError` when
    the source is gone, since nothing could be rebuilt from it."""
    head = index.header
    source = head["source"]
    where = index.path or "the index"
    if not os.path.exists(source):
        raise DataError(f"{where}: built from {source}, which no longer exists; point data.path at the data "
                        "(or rebuild the index with meddino data index PATH out=INDEX)")
    key = head["key"]
    if key["type"] in ("manifest", "file"):
        if _stat_key(source) != key["stat"]:
            return f"{source} changed since the index was built (size or modification time)"
    else:
        dirs, mtimes = index.dirs, index.dir_mtimes
        changed = _count_changed(dirs, mtimes, threads)
        if changed:
            return f"{changed} folder(s) under {source} changed since the index was built"
    media, media_stat = index.media, index.media_stat
    if len(media):
        changed = _count_changed(media, media_stat, threads, whole=True)
        if changed:
            return f"{changed} video/volume file(s) changed since the index was built"
    return None


def _count_changed(paths: StringTable, recorded: np.ndarray, threads: int | None, whole: bool = False) -> int:
    def check(i: int) -> bool:
        try:
            now = _stat_key(paths[i])
        except OSError:
            return True
        if whole:
            return now != [int(x) for x in recorded[i]]
        return int(recorded[i]) != -1 and now[1] != int(recorded[i])  # -1: it was unreadable then

    n = len(paths)
    if n < 64:
        return sum(check(i) for i in range(n))
    with ThreadPoolExecutor(threads or default_threads()) as pool:
        return sum(pool.map(check, range(n), chunksize=256))


# ------------------------------------------------------------------------------------------ the walk
def _list_dir(folder: str, follow_symlinks: bool) -> tuple[list[str], list[str], int, tuple[int, int] | None]:
    """Sorted file names and subfolder names of ``folder`` (hidden ones skipped), its mtime, and its
    (device, inode): the identity a symlink loop repeats."""
    try:
        st = os.stat(folder)
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return [], [], -1, None
    mtime, ident = st.st_mtime_ns, (st.st_dev, st.st_ino)
    files, subdirs = [], []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir(follow_symlinks=follow_symlinks):
                subdirs.append(entry.name)
            elif entry.is_file(follow_symlinks=follow_symlinks):
                files.append(entry.name)
        except OSError:
            continue
    return files, subdirs, mtime, ident


def walk_folder(root: str, follow_symlinks: bool = True, threads: int | None = None,
                on_listed: Callable[[int], None] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """Files under ``root`` relative to it, in sorted depth-first order (a folder's files, then its
    subfolders), and every folder listed with its mtime; listings run ``threads`` at a time.

    A folder that is one of its own enclosing folders (a symlink back up the tree: ``find -L`` calls it a
    loop) is not descended into, with one line naming it, where following it would never end."""
    listings: dict[str, tuple[list[str], list[str], int]] = {}
    with ThreadPoolExecutor(threads or default_threads()) as pool:
        pending = {pool.submit(_list_dir, root, follow_symlinks): ("", frozenset())}
        while pending:
            done = next(iter(_as_completed(pending)))
            rel, enclosing = pending.pop(done)
            files, subdirs, mtime, ident = done.result()
            if ident is not None and ident in enclosing:
                say(f"data: skipped {os.path.join(root, rel)}: a symlink loop (it is one of its enclosing folders)")
                files, subdirs = [], []
            listings[rel] = (files, subdirs, mtime)
            if on_listed is not None:
                on_listed(len(files))
            for name in subdirs:
                child = f"{rel}/{name}" if rel else name
                pending[pool.submit(_list_dir, os.path.join(root, child), follow_symlinks)] = (child, enclosing | {ident})
    out: list[str] = []
    dirs: list[tuple[str, int]] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        files, subdirs, mtime = listings[rel]
        dirs.append((rel, mtime))
        prefix = f"{rel}/" if rel else ""
        out.extend(prefix + f for f in files)
        stack.extend(f"{prefix}{d}" for d in reversed(subdirs))
    return out, dirs


def _as_completed(pending: dict[Any, Any]) -> Iterable[Any]:
    from concurrent.futures import FIRST_COMPLETED, wait

    done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
    return done


# ------------------------------------------------------------------------------------------ building
def _category(name: str) -> int:
    suffix = io.file_suffix(name)
    if suffix in io.IMAGE_EXTENSIONS:
        return _CAT_IMAGE
    if suffix in io.VIDEO_EXTENSIONS:
        return _CAT_VIDEO
    if suffix in io.VOLUME_EXTENSIONS:
        return _CAT_VOLUME
    if suffix in io.DICOM_EXTENSIONS:
        return _CAT_DICOM
    if suffix == "" or suffix[1:].isdigit():
        return _CAT_PROBE
    return _CAT_SKIP


def _norm(name: str) -> str:
    """A manifest entry as ``str(Path(name))`` would give it, without paying for Path on clean names."""
    if "//" in name or "/./" in name or name.startswith("./") or name.endswith("/") or name.endswith("/.") \
            or name.startswith("~"):
        return str(Path(name).expanduser())
    return name


class _Builder:
    """Accumulates files (names, categories, patients) chunk by chunk as bytes, never as a list per file."""

    def __init__(self) -> None:
        self.blobs: list[bytes] = []
        self.lengths: list[np.ndarray] = []
        self.cats: list[np.ndarray] = []
        self.patient_codes: list[np.ndarray] = []
        self.patient_ids: dict[str, int] = {}
        self.n = 0

    def add(self, names: list[str], patients: list[str | None] | None = None) -> None:
        encoded = [n.encode("utf-8", "surrogateescape") for n in names]
        self.blobs.append(b"".join(encoded))
        self.lengths.append(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
        self.cats.append(np.fromiter(map(_category, names), dtype=np.uint8, count=len(names)))
        if patients is None:
            codes = np.full(len(names), -1, dtype=np.int32)
        else:
            ids = self.patient_ids
            codes = np.fromiter((-1 if p is None else ids.setdefault(p, len(ids)) for p in patients),
                                dtype=np.int32, count=len(patients))
        self.patient_codes.append(codes)
        self.n += len(names)


def build_index(
    path: str | os.PathLike[str],
    fps: float = 1.0,
    axes: Iterable[int] = (0,),
    window: Any = None,
    min_foreground: float | None = None,
    follow_symlinks: bool = True,
    threads: int | None = None,
    progress: bool = False,
    absolute: bool = False,
) -> SampleIndex:
    """The index of a folder (walked recursively), a ``.csv`` manifest (column ``image``, optional
    ``patient``) or one file. ``absolute``: paths under the absolute source path (for a file that is read
    from any working folder); otherwise as given, like :class:`~meddino.data.sources.PretrainSource`."""
    from meddino.data import volumes
    from meddino.data.video import sample_times, video_duration

    axes = tuple(int(a) for a in axes)
    root = Path(path).expanduser()
    if absolute:
        root = Path(os.path.abspath(root))
    if not root.exists():
        raise DataError(f"data path not found: {root}")
    threads = threads or default_threads()
    builder = _Builder()
    bar = _bar(progress)
    dirs: list[tuple[str, int]] = []
    if root.is_file() and root.suffix.lower() == ".csv":
        base, kind = ("" if str(root.parent) == "." else str(root.parent)), "manifest"
        _read_manifest(root, builder, bar)
    elif root.is_file():
        base, kind = "", "file"
        builder.add([str(root)])
    else:
        base, kind = str(root), "folder"
        names, dirs = walk_folder(str(root), follow_symlinks, threads,
                                  on_listed=(lambda n: bar.advance(n)) if bar else None)
        for start in range(0, len(names), _CHUNK):
            builder.add(names[start:start + _CHUNK])
        del names
    if bar:
        bar.__exit__(None, None, None)

    cats = np.concatenate(builder.cats) if builder.cats else np.zeros(0, np.uint8)
    lengths = np.concatenate(builder.lengths) if builder.lengths else np.zeros(0, np.int64)
    blob = np.frombuffer(b"".join(builder.blobs), dtype=np.uint8)
    builder.blobs = []
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    files = StringTable(blob, offsets, base)

    # files whose samples need a look inside: videos (duration), volumes (shape), extension-less (magic)
    look = np.flatnonzero(cats >= _CAT_VIDEO)
    samples: dict[int, list[tuple[int, float, int]]] = {}
    skipped: list[tuple[str, str]] = []

    def inspect(fid: int) -> tuple[int, list[tuple[int, float, int]] | str]:
        p, cat = files[fid], int(cats[fid])
        try:
            if cat == _CAT_VIDEO:
                return fid, [(KIND_FRAME, t, 0) for t in sample_times(video_duration(p), fps)]
            if cat == _CAT_VOLUME:
                if min_foreground is not None:
                    volume, _ = volumes.read_volume(p)
                    return fid, [(KIND_SLICE, float(i), a)
                                 for a, i, _ in volumes.volume_slices(volume, axes, window, min_foreground)]
                shape = volumes.volume_shape(p)
                return fid, [(KIND_SLICE, float(i), a) for a in axes for i in range(shape[a])]
            return fid, ([(KIND_DICOM, 0.0, 0)] if io.is_dicom_file(p) else [])
        except DataError as exc:
            return fid, str(exc)

    media: list[int] = []
    if len(look):
        with ThreadPoolExecutor(min(threads, len(look))) as pool:
            for fid, got in pool.map(inspect, look.tolist()):
                if isinstance(got, str):
                    skipped.append((files[fid], got))
                    got = []
                samples[fid] = got
                if int(cats[fid]) in (_CAT_VIDEO, _CAT_VOLUME) and got:
                    media.append(fid)
    counts = np.where((cats == _CAT_IMAGE) | (cats == _CAT_DICOM), 1, 0).astype(np.int64)
    for fid, got in samples.items():
        counts[fid] = len(got)
    if not counts.any():
        raise DataError(f"no usable images, videos, DICOM or volumes under {root}"
                        + (f" ({len(skipped)} unreadable)" if skipped else ""))

    # drop files without samples (not a sample, unreadable): compact the blob and renumber
    keep = counts > 0
    new_id = np.cumsum(keep) - 1
    if not keep.all():
        byte_keep = np.repeat(keep, lengths)
        blob = blob[byte_keep]
        lengths = lengths[keep]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
    kept_cats, kept_counts = cats[keep], counts[keep]
    n_files = int(keep.sum())
    file_index = np.repeat(np.arange(n_files, dtype=np.uint32), kept_counts)
    kinds = np.where(np.repeat(kept_cats, kept_counts) == _CAT_DICOM, KIND_DICOM, KIND_IMAGE).astype(np.int8)
    params = np.zeros(len(kinds), dtype=np.float64)
    slice_axes = np.zeros(len(kinds), dtype=np.int8)
    starts = np.zeros(n_files + 1, dtype=np.int64)
    np.cumsum(kept_counts, out=starts[1:])
    for fid, got in samples.items():
        if got:
            s = int(starts[new_id[fid]])
            kinds[s:s + len(got)] = [k for k, _, _ in got]
            params[s:s + len(got)] = [t for _, t, _ in got]
            slice_axes[s:s + len(got)] = [a for _, _, a in got]

    patient_codes = (np.concatenate(builder.patient_codes) if builder.patient_codes else np.zeros(0, np.int32))[keep]
    patient_names = sorted(builder.patient_ids, key=builder.patient_ids.get)
    patients = _table(patient_names)
    files = StringTable(blob, offsets, base)

    media_names = [files.raw(int(new_id[f])) for f in media]
    media_table = _table(media_names, base)
    media_stat = np.asarray([_stat_key(media_table[i]) for i in range(len(media_names))],
                            dtype=np.int64).reshape(-1, 2)
    if kind == "folder":
        dir_table = _table([d for d, _ in dirs], base)
        dir_mtimes = np.asarray([m for _, m in dirs], dtype=np.int64)
        key = {"type": "folder", "folders": len(dirs)}
    else:
        dir_table, dir_mtimes = _table([]), np.zeros(0, np.int64)
        key = {"type": kind, "stat": _stat_key(str(root))}
    header = {"format": FORMAT, "source": str(root), "base": base, "key": key,
              "params": index_params(fps, axes, min_foreground, window, follow_symlinks)}
    index = SampleIndex(kinds, file_index, params, slice_axes, files, patient_codes, patients, skipped, header)
    index.dirs, index.dir_mtimes = dir_table, dir_mtimes
    index.media, index.media_stat = media_table, media_stat
    return index


def _table(strings: list[str], base: str = "") -> StringTable:
    encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    if encoded:
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    return StringTable(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets, base)


def _read_manifest(csv_path: Path, builder: _Builder, bar: Any, fast: bool = True) -> None:
    """Rows of column ``image`` (and ``patient``); empty names are skipped, a UTF-8 BOM is ignored (as
    the labelled manifests' reader does). ``fast``: plain blocks (ASCII, no quotes, every row its full
    width, names needing no normalisation) are parsed with numpy byte operations; any other block goes
    through the csv module (:func:`_manifest_rows`), and from the first quote on the rest of the file does,
    since a quoted field may span lines. Both give the same index (tests/test_data_index.py checks it)."""
    try:
        if not fast:
            with open(csv_path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.reader(fh)
                width, col, pcol = _manifest_columns(csv_path, next(reader, None))
                _manifest_rows(reader, width, col, pcol, builder, bar)
            return
        with open(csv_path, "rb") as fh:
            first = fh.readline()
            offset = len(first)
            if first.startswith(b"\xef\xbb\xbf"):
                first = first[3:]
            if b'"' in first or b"\r" in first.rstrip(b"\r\n"):  # an unusual header: the csv module alone
                return _read_manifest(csv_path, builder, bar, fast=False)
            header = next(csv.reader([first.decode("utf-8")]), None)
            width, col, pcol = _manifest_columns(csv_path, header)
            rest = b""
            while True:
                chunk = fh.read(_BLOCK)
                buf = rest + chunk
                if chunk:
                    cut = buf.rfind(b"\n") + 1
                    if cut == 0:
                        rest = buf
                        continue
                    buf, rest = buf[:cut], buf[cut:]
                elif not buf:
                    break
                if b'"' in buf:  # quoting from here on: the csv module reads the rest of the file
                    fh.seek(offset)
                    text = io_module.TextIOWrapper(fh, encoding="utf-8", newline="")
                    _manifest_rows(csv.reader(text), width, col, pcol, builder, bar)
                    text.detach()
                    return
                offset += len(buf)
                before = builder.n
                if not _fast_block(buf if buf.endswith(b"\n") else buf + b"\n", width, col, pcol, builder):
                    _manifest_rows(csv.reader(io_module.StringIO(buf.decode("utf-8"), newline="")),
                                   width, col, pcol, builder, None)
                if bar:
                    bar.advance(builder.n - before)
                if not chunk:
                    break
    except UnicodeDecodeError:
        raise DataError(f"manifest {csv_path} is not a text CSV file") from None


def _manifest_columns(csv_path: Path, fieldnames: list[str] | None) -> tuple[int, int, int | None]:
    if not fieldnames or "image" not in fieldnames:
        raise DataError(f"manifest {csv_path} needs a column 'image' (has: {fieldnames})")
    return len(fieldnames), fieldnames.index("image"), (fieldnames.index("patient") if "patient" in fieldnames else None)


def _manifest_rows(reader: Iterable[list[str]], width: int, col: int, pcol: int | None, builder: _Builder,
                   bar: Any) -> None:
    """The csv module's rows, one Python string each: the reference reader, and every unusual block's."""
    names: list[str] = []
    patients: list[str | None] = []
    for row in reader:
        if len(row) < width:  # DictReader's rule: missing trailing fields are empty
            row = row + [""] * (width - len(row))
        name = row[col].strip()
        if not name:
            continue
        names.append(_norm(name))
        patients.append(row[pcol] or None if pcol is not None else None)
        if len(names) == _CHUNK:
            builder.add(names, patients)
            if bar:
                bar.advance(len(names))
            names, patients = [], []
    if names:
        builder.add(names, patients)
        if bar:
            bar.advance(len(names))


def _field_keys(a: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, Callable[[Any], bytes]]:
    """Fields ``a[starts[i]:ends[i]]`` (none holding a NUL) as one sortable array (8 bytes or less: one
    integer each; else fixed-width bytes), and how to turn one of its values back into the field's bytes."""
    width = max(int((ends - starts).max()) if len(starts) else 0, 1)
    width = 8 if width <= 8 else width
    pos = starts[:, None] + np.arange(width)
    grid = np.where(pos < ends[:, None], a[np.minimum(pos, len(a) - 1)], 0).astype(np.uint8)
    if width == 8:
        return np.ascontiguousarray(grid).view("<u8").ravel(), lambda v: int(v).to_bytes(8, "little").rstrip(b"\0")
    return np.ascontiguousarray(grid).view(f"S{width}").ravel(), bytes


def _last_before(positions: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For each ``end``, the last of the sorted ``positions`` before it (-1: none)."""
    i = np.searchsorted(positions, ends) - 1
    return np.where(i >= 0, positions[np.maximum(i, 0)] if len(positions) else -1, -1)


def _fast_block(block: bytes, width: int, col: int, pcol: int | None, builder: _Builder) -> bool:
    """Add the rows of ``block`` (whole lines, ending in newline) with array operations and say True, or
    say False and add nothing when the block has anything the csv module treats specially or a name
    :func:`_norm` would change, a hidden file name or a suffix over 32 bytes."""
    if not block.isascii() or (b"\r" in block and block.count(b"\r") != block.count(b"\r\n")):
        return False
    a = np.frombuffer(block, dtype=np.uint8)
    nl = np.flatnonzero(a == 10)
    if np.count_nonzero(a < 32) != len(nl) + block.count(b"\r"):  # another control byte
        return False
    line_start = np.concatenate(([0], nl[:-1] + 1))
    line_end = nl - ((a[np.maximum(nl - 1, 0)] == 13) & (nl > line_start))
    commas = np.flatnonzero(a == 44)
    if width > 1:
        per_line = np.diff(np.concatenate(([0], np.searchsorted(commas, nl))))
        if np.any(per_line != width - 1):
            return False
        grid = commas.reshape(-1, width - 1)
    elif len(commas):
        return False
    else:
        grid = np.zeros((len(nl), 0), np.int64)

    def field(k: int) -> tuple[np.ndarray, np.ndarray]:
        return (line_start if k == 0 else grid[:, k - 1] + 1), (line_end if k == width - 1 else grid[:, k])

    s, e = field(col)
    keep = e > s
    s, e = s[keep], e[keep]
    n = len(s)
    if n == 0:
        return True
    if np.any((a[s] == 32) | (a[e - 1] == 32) | (a[s] == 126) | (a[e - 1] == 47)):  # strip, ~, trailing /
        return False
    two = (e - s) >= 2
    if np.any(two & (((a[s] == 46) & (a[np.minimum(s + 1, len(a) - 1)] == 47))
                     | ((a[e - 1] == 46) & (a[e - 2] == 47)))):  # ./x, x/.
        return False
    for pattern in (b"//", b"/./"):  # anywhere inside a name
        if pattern not in block:
            continue
        at = np.asarray([m.start() for m in re.finditer(re.escape(pattern), block)])
        row = np.minimum(np.searchsorted(e, at), n - 1)  # the first name ending at or after the hit
        if np.any((s[row] <= at) & (at + len(pattern) <= e[row])):
            return False
    last_slash = _last_before(np.flatnonzero(a == 47), e)
    last_dot = _last_before(np.flatnonzero(a == 46), e)
    base = np.maximum(last_slash + 1, s)
    if np.any(a[base] == 46):  # a hidden name: os.path.splitext skips its leading dots
        return False
    ext_start = np.where(last_dot >= base, last_dot, e)
    if np.any(e - ext_start > 32):  # (exact either way; bounds the key grid of one block)
        return False
    keys, to_bytes = _field_keys(a, ext_start, e)
    uniq, inverse = np.unique(keys, return_inverse=True)
    inverse = inverse.ravel()
    exts = [to_bytes(k).decode("ascii").lower() for k in uniq.tolist()]
    cats = np.array([_category("x" + x) for x in exts], dtype=np.uint8)[inverse]
    for j, x in enumerate(exts):
        if x == ".gz":  # .nii.gz: the whole name decides
            for r in np.flatnonzero(inverse == j).tolist():
                cats[r] = _category(block[int(s[r]):int(e[r])].decode("ascii"))
    lengths = (e - s).astype(np.int64)
    total = int(lengths.sum())
    shift = np.repeat(s - (np.cumsum(lengths) - lengths), lengths)
    blob = a[shift + np.arange(total)].tobytes()
    if pcol is None:
        codes = np.full(n, -1, dtype=np.int32)
    else:
        ps, pe = (f[keep] for f in field(pcol))
        longest = int((pe - ps).max())
        codes = np.full(n, -1, dtype=np.int32)
        ids = builder.patient_ids
        if longest <= 64:
            pkeys, to_bytes = _field_keys(a, ps, pe)
            uniq, first, inverse = np.unique(pkeys, return_index=True, return_inverse=True)
            code_of = np.full(len(uniq), -1, dtype=np.int32)
            values = uniq.tolist()
            for j in np.argsort(first, kind="stable").tolist():
                key = to_bytes(values[j])
                if key:
                    code_of[j] = ids.setdefault(key.decode("ascii"), len(ids))
            codes = code_of[inverse.ravel()]
        else:
            for r, (x, y) in enumerate(zip(ps.tolist(), pe.tolist())):
                if y > x:
                    codes[r] = ids.setdefault(block[x:y].decode("ascii"), len(ids))
    builder.blobs.append(blob)
    builder.lengths.append(lengths)
    builder.cats.append(cats)
    builder.patient_codes.append(codes)
    builder.n += n
    return True


def _bar(progress: bool) -> Any:
    if not progress:
        return None
    from meddino.runlog import Progress

    return Progress(None, "index", unit="files", interval=10.0).__enter__()


# ------------------------------------------------------------------------------------------ the file
def write_index(index: SampleIndex, out: str | os.PathLike[str]) -> Path:
    """Write ``index`` to ``out`` atomically (temp file + rename); paths are stored relative to the
    source so the arrays are only as large as the names."""
    from meddino.runlog import atomic_write

    arrays = {
        "kinds": index.kinds, "file_index": index.file_index, "params": index.params,
        "slice_axes": index.slice_axes,
        "files_blob": index.files.blob, "files_offsets": index.files.offsets,
        "patient_codes": index.patient_codes,
        "patients_blob": index.patients.blob, "patients_offsets": index.patients.offsets,
        "dirs_blob": index.dirs.blob, "dirs_offsets": index.dirs.offsets,
        "dir_mtimes": index.dir_mtimes,
        "media_blob": index.media.blob, "media_offsets": index.media.offsets,
        "media_stat": index.media_stat,
    }
    layout: dict[str, list[Any]] = {}
    offset = 0
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        arrays[name] = arr
        layout[name] = [arr.dtype.str, list(arr.shape), offset]
        offset += -(-arr.nbytes // _ALIGN) * _ALIGN
    header = dict(index.header, arrays=layout, skipped=index.skipped[:10000], n_skipped=len(index.skipped),
                  samples=len(index), files=len(index.files), counts=index.counts())
    head = json.dumps(header).encode()
    start = -(-(len(MAGIC) + 8 + len(head)) // _ALIGN) * _ALIGN
    out = Path(out).expanduser()
    with atomic_write(out) as fh:
        fh.write(MAGIC + len(head).to_bytes(8, "little") + head)
        fh.write(b"\0" * (start - len(MAGIC) - 8 - len(head)))
        for arr in arrays.values():
            fh.write(memoryview(arr).cast("B") if arr.nbytes else b"")
            fh.write(b"\0" * (-arr.nbytes % _ALIGN))
    index.path = str(out)
    return out


def is_index_file(path: str | os.PathLike[str]) -> bool:
    """An ``.mdidx`` file (whether intact or not: :func:`open_index` says), or any file with the magic."""
    p = Path(path).expanduser()
    return p.is_file() and (p.suffix == SUFFIX or _has_magic(p))


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """The JSON header and where the arrays start; a file that is not an intact index is one line."""
    p = Path(path).expanduser()
    fix = "; delete it or rebuild it with meddino data index SOURCE out=" + str(p)
    try:
        with open(p, "rb") as fh:
            magic = fh.read(len(MAGIC))
            if magic != MAGIC:
                raise DataError(f"{p}: not a meddino index file (wrong magic bytes){fix}")
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size < 1 << 31:
                raise DataError(f"{p}: corrupt meddino index (bad header length){fix}")
            header = json.loads(fh.read(size))
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{p}: corrupt meddino index (unreadable header){fix}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or "arrays" not in header:
        raise DataError(f"{p}: corrupt or unsupported meddino index (format {header.get('format') if isinstance(header, dict) else '?'}){fix}")
    return header, -(-(len(MAGIC) + 8 + size) // _ALIGN) * _ALIGN


def open_index(path: str | os.PathLike[str]) -> SampleIndex:
    """Memory-map an index file: the arrays are views of the file's pages, shared by every process."""
    p = Path(path).expanduser()
    header, start = read_header(p)
    fix = "; delete it or rebuild it with meddino data index SOURCE out=" + str(p)
    total = os.path.getsize(p)
    mm = np.memmap(p, dtype=np.uint8, mode="r") if total > start else np.zeros(0, np.uint8)
    arrays: dict[str, np.ndarray] = {}
    try:
        for name, (dtype, shape, off) in header["arrays"].items():
            dt = np.dtype(dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            a, b = start + int(off), start + int(off) + nbytes
            if b > total:
                raise DataError(f"{p}: corrupt meddino index (truncated: {name} ends at byte {b} of {total}){fix}")
            arrays[name] = mm[a:b].view(dt).reshape(shape)
        n = arrays["kinds"].shape[0]
        if any(arrays[k].shape[0] != n for k in ("file_index", "params", "slice_axes")) or \
                arrays["files_offsets"].shape[0] != arrays["patient_codes"].shape[0] + 1:
            raise DataError(f"{p}: corrupt meddino index (array lengths disagree){fix}")
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{p}: corrupt meddino index ({exc}){fix}") from None
    base = header.get("base", "")
    index = SampleIndex(
        arrays["kinds"], arrays["file_index"], arrays["params"], arrays["slice_axes"],
        StringTable(arrays["files_blob"], arrays["files_offsets"], base), arrays["patient_codes"],
        StringTable(arrays["patients_blob"], arrays["patients_offsets"]),
        [tuple(x) for x in header.get("skipped", [])], header, str(p),
    )
    index.dirs = StringTable(arrays["dirs_blob"], arrays["dirs_offsets"], base)
    index.dir_mtimes = arrays["dir_mtimes"]
    index.media = StringTable(arrays["media_blob"], arrays["media_offsets"], base)
    index.media_stat = arrays["media_stat"]
    return index


# ------------------------------------------------------------------------------------------ the verb
class IndexConfig(Schema):
    """Config of ``meddino data index``."""

    path: str = Field(description="a folder (searched recursively), a CSV manifest (column image) or one file")
    out: str | None = Field(None, description="the index file (default: beside PATH, PATH.mdidx)")
    fps: float = Field(1.0, gt=0, description="frames per second sampled from videos")
    volume_axes: list[int] = Field([0], description="volume axes to slice along")
    threads: int | None = Field(None, ge=1, description="listing/header threads (default: 4 per core, at most 32)")


def run_index(cfg: IndexConfig) -> int:
    """Build the index of ``cfg.path`` with a progress bar and write it; an existing file that is not an
    index is refused (nothing of the user's is overwritten), an existing index is replaced."""
    src = Path(cfg.path).expanduser()
    if not src.exists():
        raise DataError(f"path: {src} not found")
    for axis in cfg.volume_axes:
        if axis not in (0, 1, 2):
            raise DataError(f"volume_axes must be among 0, 1, 2, got {cfg.volume_axes}")
    out = Path(cfg.out).expanduser() if cfg.out else default_index_path(src)
    if out.is_dir():
        raise DataError(f"out: {out} is a folder; give the index file's name (e.g. {out / ('data' + SUFFIX)})")
    if out.exists() and not _has_magic(out):
        raise DataError(f"out: {out} exists and is not a meddino index; choose another name")
    if os.path.abspath(out).startswith(os.path.abspath(src) + os.sep) and src.is_dir():
        raise DataError(f"out: {out} is inside the folder it indexes (writing it would change the folder); "
                        "put it beside the folder")
    start = time.perf_counter()
    index = build_index(src, fps=cfg.fps, axes=cfg.volume_axes, threads=cfg.threads, progress=True, absolute=True)
    write_index(index, out)
    took = time.perf_counter() - start
    counts = ", ".join(f"{v} {k}" for k, v in index.counts().items())
    print(f"indexed {len(index)} samples ({counts}) of {len(index.files)} files in {took:.1f} s -> {out} "
          f"({os.path.getsize(out) / 2**20:.1f} MiB)")
    if index.skipped:
        path, reason = index.skipped[0]
        print(f"skipped {len(index.skipped)} unreadable file(s); first: {reason if path in reason else f'{path}: {reason}'}",
              file=sys.stderr)
    return 0


def _has_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def say(line: str) -> None:
    """One line on stderr (the stale-index notice), flushed so it precedes a rebuild's progress."""
    print(line, file=sys.stderr, flush=True)
