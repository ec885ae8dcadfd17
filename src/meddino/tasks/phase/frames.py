"""Phase video pixels: decoding at the sampling rate and the per-video frame cache.

Split from :mod:`meddino.tasks.phase.data` (which reads the annotations and splits) because decoding is a
separate concern used by both the evaluation (:func:`extract_frames`, the cache) and online prediction
(:func:`iter_source_frames`, :func:`resize_frame` on a live video).

Videos are decoded once at ``fps`` (default 1) into a frame cache (``uint8 [T, S, S, 3]`` .npy per video,
bicubic resize to the model's input size, written atomically; a complete file is reused). Decoding keeps the
first frame at or after each sampling time ``i / fps`` (relative to the first frame's timestamp).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from meddino.data.io import read_image
from meddino.data.video import iter_video_frames as decode_video
from meddino.errors import DataError
from meddino.runlog import atomic_path
from meddino.tasks.phase.data import FRAME_EXTS, PhaseVideo, natural_key


def iter_video_frames(path: Path, fps: float) -> Iterator[np.ndarray]:
    """RGB uint8 frames of ``path`` at ``fps``; frame i is the first decoded frame at or after time i / fps
    (gaps in variable-frame-rate streams repeat it), so indices line up with annotations at ``fps``."""
    for _, _, rgb in decode_video(path, fps, fill_gaps=True):
        yield rgb


def frame_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTS and not p.name.startswith(".")]
    if not files:
        raise DataError(f"frame folder {folder} has no images ({', '.join(FRAME_EXTS)})")
    return sorted(files, key=lambda p: natural_key(p.name))


def iter_source_frames(source: Path, fps: float) -> Iterator[np.ndarray]:
    """Frames of a video file (decoded at ``fps``) or of a frame folder (taken as already at ``fps``)."""
    if source.is_dir():
        for f in frame_files(source):
            yield read_image(f)
    else:
        yield from iter_video_frames(source, fps)


def resize_frame(rgb: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize to ``size x size`` (seed 000 resizes frames bicubically to the backbone resolution)."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return np.ascontiguousarray(rgb)
    return np.array(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))


def cache_file(cache_dir: Path, video: PhaseVideo) -> Path:
    return cache_dir / f"{video.name}.npy"


def label_tolerance(fps: float) -> int:
    """Annotations may run past the decoded video by up to one second (rounding of the last frame)."""
    return max(1, math.ceil(fps))


def check_coverage(video: PhaseVideo, n_frames: int, fps: float) -> None:
    """The annotations must cover every decoded frame; more than one extra second of labels is refused too."""
    n_labels = len(video.labels)
    if n_frames > n_labels:
        raise DataError(
            f"annotations {video.label_file} cover {n_labels} frames of '{video.name}' at {fps:g} fps "
            f"but the video has {n_frames}"
        )
    if n_labels - n_frames > label_tolerance(fps):
        raise DataError(
            f"annotations {video.label_file} have {n_labels} frames of '{video.name}' at {fps:g} fps "
            f"but the video has only {n_frames} (wrong fps or wrong file?)"
        )


def extract_frames(video: PhaseVideo, fps: float, size: int, cache_dir: Path) -> Path:
    """Decode ``video`` at ``fps`` into ``cache_dir/<name>.npy`` (uint8 [T, size, size, 3]); resumable.

    An existing file of the right shape is reused (files are written atomically, so existing = complete).
    The video's labels are truncated to the decoded length (within :func:`label_tolerance`).
    """
    path = cache_file(cache_dir, video)
    if path.is_file():
        try:
            arr = np.load(path, mmap_mode="r")
            ok = arr.ndim == 4 and arr.shape[1:] == (size, size, 3) and arr.dtype == np.uint8
        except (ValueError, OSError):
            ok = False
        if ok:
            check_coverage(video, arr.shape[0], fps)
            video.labels = video.labels[: arr.shape[0]]
            return path
    frames = []
    for rgb in iter_source_frames(video.source, fps):
        frames.append(resize_frame(rgb, size))
        if len(frames) > len(video.labels) + label_tolerance(fps) + 1:
            break  # enough to know the annotations are too short; do not decode an hour for nothing
    check_coverage(video, len(frames), fps)
    video.labels = video.labels[: len(frames)]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.stack(frames))
    return path
