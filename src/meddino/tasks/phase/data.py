"""Phase recognition data: videos or frame folders with per-frame phase labels, three layouts, splits.

Layouts (``data.layout``):

``csv`` (generic)
    ``DIR/videos/<video>.<ext>`` (any container PyAV decodes) or ``DIR/frames/<video>/*.png|jpg`` (frames
    already at the sampling rate, sorted by the number in their name), and ``DIR/phases.csv`` with columns
    ``video, frame, phase`` and optionally ``patient`` and ``split`` (train/val/test). ``frame`` is the index
    at the sampling rate (0, 1, 2, ... at 1 fps = seconds); every video needs a label for every frame 0..n-1.
    Phase names are taken in the order of ``data.phases`` when given, else sorted (numerically when all
    names are integers).
``autolaparo`` (AutoLaparo task 1, Wang et al., MICCAI 2022)
    ``DIR/videos/01.mp4 ... 21.mp4`` (or ``DIR/frames/01/...`` extracted at 1 fps) and ``DIR/labels/
    label_01.txt ...``: one line per second, ``<frame> <phase>`` separated by tabs or spaces, phase 1-7
    (or its name); a non-numeric first line is a header. Official split: videos 1-10 train, 11-14 val,
    15-21 test. Phases: Preparation, Dividing Ligament and Peritoneum, Dividing Uterine Vessels and
    Ligament, Transecting the Vagina, Specimen Removal, Suturing, Washing.
``cholec80`` (Twinanda et al., 2016)
    ``DIR/videos/videoNN.mp4`` (or ``DIR/frames/videoNN/...`` at the sampling rate) and
    ``DIR/phase_annotations/videoNN-phase.txt``: header ``Frame<TAB>Phase``, one line per frame at 25 fps with
    a phase name; subsampled to the sampling rate (label of sampled frame i = annotation of frame
    floor(i * 25 / fps)). Default split as TeCNO: videos 1-32 train, 33-40 val, 41-80 test.

``data.train_videos`` / ``val_videos`` / ``test_videos`` override any split. Without a split column or official
split, videos are split at random (seeded) by patient; a video without a patient is a group of its own. Whatever
the split, a patient's videos on two sides of it are refused (:func:`meddino.data.splits.check_no_leak`).

This module reads annotations only; decoding the pixels and the frame cache are in
:mod:`meddino.tasks.phase.frames`.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meddino.data.splits import check_no_leak
from meddino.errors import DataError

CHOLEC80_PHASES = (
    "Preparation",
    "CalotTriangleDissection",
    "ClippingCutting",
    "GallbladderDissection",
    "GallbladderPackaging",
    "CleaningCoagulation",
    "GallbladderRetraction",
)
AUTOLAPARO_PHASES = (
    "Preparation",
    "Dividing Ligament and Peritoneum",
    "Dividing Uterine Vessels and Ligament",
    "Transecting the Vagina",
    "Specimen Removal",
    "Suturing",
    "Washing",
)
LAYOUTS = ("csv", "autolaparo", "cholec80")
SPLITS = ("train", "val", "test")
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".ogv")
FRAME_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class PhaseVideo:
    """One annotated video: where its pixels are and its phase index per sampled frame."""

    name: str
    source: Path  # a video file or a folder of frames
    labels: np.ndarray  # int64 [T] phase index per frame at the sampling rate
    label_file: str  # where the labels came from (for error messages)
    split: str | None = None
    patient: str | None = None

    @property
    def is_frames(self) -> bool:
        return self.source.is_dir()


@dataclass
class PhaseDataset:
    root: Path
    layout: str
    phases: list[str]
    fps: float
    videos: list[PhaseVideo] = field(default_factory=list)

    def split(self, name: str) -> list[PhaseVideo]:
        return [v for v in self.videos if v.split == name]

    def split_sizes(self) -> dict[str, int]:
        return {s: len(self.split(s)) for s in SPLITS}


# --------------------------------------------------------------------------------------------- helpers


def natural_key(text: str) -> list:
    """Sort key that orders ``frame_2`` before ``frame_10``."""
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", text)]


def video_number(name: str) -> int | None:
    """The number in a video name (``"video07"`` -> 7, ``"15"`` -> 15), None if there is none."""
    m = re.findall(r"\d+", name)
    return int(m[-1]) if m else None


def find_source(root: Path, name: str) -> Path:
    """``root/videos/<name>.<ext>`` or ``root/frames/<name>/``; a one-line DataError when neither exists."""
    videos = root / "videos"
    for ext in VIDEO_EXTS:
        for cand in (videos / f"{name}{ext}", videos / f"{name}{ext.upper()}"):
            if cand.is_file():
                return cand
    frames = root / "frames" / name
    if frames.is_dir():
        return frames
    raise DataError(f"no video for '{name}': expected {videos}/{name}.<mp4|avi|mkv|...> or {frames}/")


def resample_labels(labels: np.ndarray, source_fps: float, fps: float) -> np.ndarray:
    """Labels at ``source_fps`` -> labels at ``fps``: sampled frame i takes annotation floor(i * src / fps)."""
    if len(labels) == 0:
        return labels
    if math.isclose(source_fps, fps):
        return labels
    n = math.floor((len(labels) - 1) * fps / source_fps + 1e-9) + 1
    idx = np.floor(np.arange(n) * source_fps / fps + 1e-9).astype(np.int64)
    return labels[np.minimum(idx, len(labels) - 1)]


def assign_splits(groups: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Seeded random split of the unique ``groups`` (videos or patients) into train/val/test.

    At least one test group when there are >= 2 groups and ``test_fraction > 0``; train keeps >= 1.
    """
    uniq = sorted(set(groups), key=natural_key)
    rng = np.random.default_rng(seed)
    order = [uniq[i] for i in rng.permutation(len(uniq))]
    n = len(order)
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 and n >= 2 else 0
    n_val = round(n * val_fraction) if val_fraction > 0 else 0
    n_val = min(n_val, max(0, n - n_test - 1))
    out = {}
    for i, g in enumerate(order):
        out[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


# --------------------------------------------------------------------------------------------- layouts


def _csv_layout(root: Path, phases: list[str] | None, fps: float) -> tuple[list[str], list[PhaseVideo]]:
    path = root / "phases.csv"
    if not path.is_file():
        raise DataError(f"phases.csv not found: {path} (layout csv needs DIR/phases.csv with video,frame,phase)")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("video", "frame", "phase") if c not in cols]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (need video, frame, phase)")
        rows = []
        for lineno, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            try:
                frame = int(row["frame"])
            except ValueError:
                raise DataError(f"{path} line {lineno}: frame '{row['frame']}' is not an integer") from None
            if frame < 0:
                raise DataError(f"{path} line {lineno}: negative frame {frame}")
            if not row["video"] or not row["phase"]:
                raise DataError(f"{path} line {lineno}: empty video or phase")
            patient, split = row.get("patient") or None, row.get("split") or None
            rows.append((lineno, row["video"], frame, row["phase"], patient, split))
    if not rows:
        raise DataError(f"{path}: no annotation rows")
    if phases is None:
        names = sorted({r[3] for r in rows})
        if all(n.lstrip("-").isdigit() for n in names):
            names = sorted(names, key=int)
        phases = names
    index = {p: i for i, p in enumerate(phases)}
    per_video: dict[str, dict[int, int]] = {}
    meta: dict[str, dict[str, str | None]] = {}
    for lineno, video, frame, phase, patient, split in rows:
        if phase not in index:
            raise DataError(f"{path} line {lineno}: unknown phase '{phase}' (known: {', '.join(phases)})")
        if split is not None and split not in SPLITS:
            raise DataError(f"{path} line {lineno}: split '{split}' must be train, val or test")
        frames = per_video.setdefault(video, {})
        if frame in frames:
            raise DataError(f"{path} line {lineno}: video '{video}' frame {frame} is annotated twice")
        frames[frame] = index[phase]
        m = meta.setdefault(video, {"patient": patient, "split": split, "line": str(lineno)})
        for key, val in (("patient", patient), ("split", split)):
            if m[key] != val:
                raise DataError(
                    f"{path} line {lineno}: video '{video}' has {key} '{val}' here but '{m[key]}' on line {m['line']}"
                )
    videos = []
    for name in sorted(per_video, key=natural_key):
        frames = per_video[name]
        n = max(frames) + 1
        gaps = [f for f in range(n) if f not in frames]
        if gaps:
            raise DataError(f"{path}: video '{name}' has no phase for frame {gaps[0]} (frames must cover 0..{n - 1})")
        labels = np.array([frames[f] for f in range(n)], dtype=np.int64)
        videos.append(
            PhaseVideo(name, find_source(root, name), labels, str(path), meta[name]["split"], meta[name]["patient"])
        )
    return phases, videos


def _read_table(path: Path) -> list[tuple[int, list[str]]]:
    """Non-empty lines of a tab/space separated annotation file as (line number, tokens)."""
    out = []
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line:
            toks = line.split("\t") if "\t" in line else line.split(None, 1)
            out.append((lineno, [t.strip() for t in toks]))
    return out


def _parse_phase_table(
    path: Path, phases: Sequence[str], numeric_base: int | None
) -> np.ndarray:
    """``frame phase`` lines (optional header) -> labels [N]; phase by name (case-insensitive) or number."""
    lower = {p.lower(): i for i, p in enumerate(phases)}
    rows = _read_table(path)
    if rows and not rows[0][1][0].isdigit():
        rows = rows[1:]  # header, e.g. "Frame\tPhase"
    if not rows:
        raise DataError(f"{path}: no annotation lines")
    frames: dict[int, int] = {}
    for lineno, toks in rows:
        if len(toks) < 2:
            raise DataError(f"{path} line {lineno}: expected '<frame> <phase>'")
        try:
            frame = int(toks[0])
        except ValueError:
            raise DataError(f"{path} line {lineno}: frame '{toks[0]}' is not an integer") from None
        name = toks[1]
        if name.lower() in lower:
            idx = lower[name.lower()]
        elif numeric_base is not None and name.isdigit() and 0 <= int(name) - numeric_base < len(phases):
            idx = int(name) - numeric_base
        else:
            raise DataError(f"{path} line {lineno}: unknown phase '{name}' (known: {', '.join(phases)})")
        frames[frame] = idx
    first = min(frames)
    n = max(frames) + 1
    if first != 0:
        raise DataError(f"{path}: annotations start at frame {first}, not 0")
    gaps = [f for f in range(n) if f not in frames]
    if gaps:
        raise DataError(f"{path}: no phase for frame {gaps[0]} (frames must cover 0..{n - 1})")
    return np.array([frames[f] for f in range(n)], dtype=np.int64)


def _official_split(name: str, ranges: dict[str, tuple[int, int]]) -> str | None:
    """The official split of a numbered video (``ranges``: split -> first, last video number)."""
    num = video_number(name)
    if num is None:
        return None
    return next((split for split, (lo, hi) in ranges.items() if lo <= num <= hi), None)


def _annotated_layout(
    root: Path, files: list[Path], name_of, phases: list[str], numeric_base: int | None, source_fps: float,
    fps: float, ranges: dict[str, tuple[int, int]],
) -> tuple[list[str], list[PhaseVideo]]:
    """One video per annotation file: labels resampled from ``source_fps`` to ``fps``, official splits."""
    videos = []
    for f in files:
        name = name_of(f)
        labels = resample_labels(_parse_phase_table(f, phases, numeric_base=numeric_base), source_fps, fps)
        videos.append(PhaseVideo(name, find_source(root, name), labels, str(f), _official_split(name, ranges)))
    return phases, videos


def _autolaparo_layout(root: Path, fps: float) -> tuple[list[str], list[PhaseVideo]]:
    labels_dir = root / "labels"
    if not labels_dir.is_dir():
        raise DataError(f"AutoLaparo labels folder not found: {labels_dir} (expected labels/label_01.txt ...)")
    files = sorted(labels_dir.glob("label_*.txt"), key=lambda p: natural_key(p.name))
    if not files:
        raise DataError(f"no label_XX.txt files in {labels_dir}")
    return _annotated_layout(root, files, lambda f: f.stem.removeprefix("label_"), list(AUTOLAPARO_PHASES),
                             1, 1.0, fps, {"train": (1, 10), "val": (11, 14), "test": (15, 21)})


def _cholec80_layout(root: Path, fps: float, annotation_fps: float) -> tuple[list[str], list[PhaseVideo]]:
    ann_dir = root / "phase_annotations"
    if not ann_dir.is_dir():
        raise DataError(f"Cholec80 annotation folder not found: {ann_dir} (expected videoNN-phase.txt files)")
    files = sorted(ann_dir.glob("*-phase.txt"), key=lambda p: natural_key(p.name))
    if not files:
        raise DataError(f"no <video>-phase.txt files in {ann_dir}")
    return _annotated_layout(root, files, lambda f: f.name.removesuffix("-phase.txt"), list(CHOLEC80_PHASES),
                             None, annotation_fps, fps, {"train": (1, 32), "val": (33, 40), "test": (41, 80)})


def load_phase_dataset(
    root: str | Path,
    layout: str,
    fps: float = 1.0,
    phases: list[str] | None = None,
    annotation_fps: float = 25.0,
    train_videos: list[str] | None = None,
    val_videos: list[str] | None = None,
    test_videos: list[str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> PhaseDataset:
    """Read a dataset's annotations and split it; pixels are decoded later
    (:func:`meddino.tasks.phase.frames.extract_frames`).

    ``phases`` fixes the class order of the csv layout (names outside it are errors). The explicit video
    lists override any split; videos named in none of them go to train when any list is given.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    if layout == "csv":
        phases, videos = _csv_layout(root, phases, fps)
    elif layout == "autolaparo":
        phases, videos = _autolaparo_layout(root, fps)
    elif layout == "cholec80":
        phases, videos = _cholec80_layout(root, fps, annotation_fps)
    else:
        raise DataError(f"unknown phase data layout '{layout}' (use one of {', '.join(LAYOUTS)})")
    explicit = {"train": train_videos, "val": val_videos, "test": test_videos}
    if any(lst is not None for lst in explicit.values()):
        videos = _explicit_splits(root, videos, explicit)
        where = f"data.*_videos, patients from {root / 'phases.csv'}"
    elif any(v.split is None for v in videos):
        _random_splits(videos, val_fraction, test_fraction, seed)
        where = f"the seeded random split of {root}"
    else:
        where = f"column 'split' in {root / 'phases.csv'}" if layout == "csv" else f"the official {layout} split"
    _check_patients(videos, where)
    return PhaseDataset(root, layout, list(phases), fps, videos)


def _explicit_splits(
    root: Path, videos: list[PhaseVideo], explicit: dict[str, list[str] | None]
) -> list[PhaseVideo]:
    """Splits from ``data.{train,val,test}_videos``; unlisted videos go to train unless train is listed too
    (then they are dropped)."""
    names = {v.name for v in videos}
    chosen: dict[str, str] = {}
    for split, lst in explicit.items():
        for name in lst or []:
            name = str(name)
            if name not in names:
                raise DataError(f"data.{split}_videos: no annotated video '{name}' in {root}")
            if name in chosen:
                raise DataError(
                    f"video '{name}' is listed in both data.{chosen[name]}_videos and data.{split}_videos"
                )
            chosen[name] = split
    for v in videos:
        v.split = chosen.get(v.name, "train" if explicit["train"] is None else None)
    return [v for v in videos if v.split is not None]


def _random_splits(videos: list[PhaseVideo], val_fraction: float, test_fraction: float, seed: int) -> None:
    """Seeded random splits (:func:`assign_splits`) of patients: a video without a patient is its own."""
    if any(v.split is not None for v in videos):
        missing = next(v.name for v in videos if v.split is None)
        raise DataError(
            f"video '{missing}' has no split while others do (fill the split column or use data.*_videos)"
        )
    # why: grouping by video as soon as one video lacks a patient would split the others' patients apart
    groups = {v.name: v.patient or v.name for v in videos}  # a name equal to a patient id only joins it
    assignment = assign_splits(list(groups.values()), val_fraction, test_fraction, seed)
    for v in videos:
        v.split = assignment[groups[v.name]]


def _check_patients(videos: list[PhaseVideo], where: str) -> None:
    """A patient's videos must all be in one split (no patient leak); videos without a patient are skipped."""
    known = [v for v in videos if v.patient]
    sides = {s: [v for v in known if v.split == s] for s in SPLITS}
    check_no_leak({s: [v.patient for v in vs] for s, vs in sides.items()}, where=where,
                  name_of=lambda s, j: f"video {sides[s][j].name}")
