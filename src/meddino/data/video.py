"""Video frames with PyAV: sequential sampling at N fps, random access by time, frame extraction, and the
``meddino data extract-frames`` verb (:func:`run_extract_frames`; registered by :mod:`meddino.data.commands`).

Sampling rule (both for :func:`iter_video_frames` and for the lazily indexed frames of
:class:`~meddino.data.sources.PretrainSource`): the wanted times are ``0, 1/fps, 2/fps, ...`` up to the
stream's duration, and each is served by the first decoded frame whose presentation time (pts * time_base,
relative to the stream start) is at or after it. A 25 fps video sampled at 1 fps therefore gives frames
0, 25, 50, ... exactly; a variable-frame-rate video gives the frame shown at each wanted time.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field

from meddino.config import Schema
from meddino.data.io import is_video_file
from meddino.errors import DataError, first_line, require_file
from meddino.runlog import Progress, atomic_path, atomic_write

_EPS = 1e-6


def _open(path: str | os.PathLike[str]):  # -> (container, stream)
    import av  # why: PyAV only when a video is decoded

    p = Path(path)
    if not p.exists():
        raise DataError(f"video not found: {p}")
    if p.stat().st_size == 0:
        raise DataError(f"empty video file (0 bytes): {p}")
    try:
        container = av.open(str(p))
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"video {p} cannot be decoded: {first_line(exc)}") from None
    if not container.streams.video:
        container.close()
        raise DataError(f"no video stream in {p}")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _start(stream) -> Fraction:
    return Fraction(stream.start_time) * stream.time_base if stream.start_time is not None else Fraction(0)


def _frame_time(frame, start: Fraction) -> float | None:
    if frame.pts is None or frame.time_base is None:
        return None
    return float(Fraction(frame.pts) * frame.time_base - start)


def video_duration(path: str | os.PathLike[str]) -> float:
    """Duration in seconds from the container/stream header (no decoding)."""
    container, stream = _open(path)
    try:
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        if container.duration is not None:
            return container.duration / 1_000_000
        if stream.frames and stream.average_rate:
            return float(stream.frames / stream.average_rate)
        raise DataError(f"video {path} does not state its duration")
    finally:
        container.close()


def sample_times(duration: float, fps: float) -> list[float]:
    """The wanted sampling times ``k / fps`` for ``0 <= k / fps < duration``."""
    if fps <= 0:
        raise DataError(f"fps must be > 0, got {fps}")
    n = max(1, math.ceil(duration * fps - _EPS))
    return [k / fps for k in range(n)]


def iter_video_frames(
    path: str | os.PathLike[str], fps: float = 1.0, fill_gaps: bool = False
) -> Iterator[tuple[int, float, np.ndarray]]:
    """Decode ``path`` front to back (no seeking) and yield ``(index, time_s, uint8 RGB (H, W, 3))`` at
    ``fps`` frames per second (see the module docstring for the rule). ``fps <= 0`` or None: every frame.
    ``fill_gaps``: a gap in a variable-frame-rate stream repeats the next frame for every sampling time it
    skipped, so that index k always means time k / fps (what per-frame annotations at ``fps`` need).
    An undecodable file (or one that yields no frame) raises DataError naming it."""
    import av  # why: PyAV only when a video is decoded

    container, stream = _open(path)
    start = _start(stream)
    every = not fps or fps <= 0
    next_k = 0
    index = 0
    try:
        for frame in container.decode(stream):
            t = _frame_time(frame, start)
            if t is None:
                continue
            if not every and t + _EPS < next_k / fps:
                continue
            rgb = frame.to_ndarray(format="rgb24")
            last_k = math.floor(t * fps + _EPS) if not every else next_k
            for _ in range(last_k - next_k + 1 if fill_gaps and not every else 1):
                yield index, t, rgb
                index += 1
            if not every:
                next_k = last_k + 1  # the next wanted time strictly after this frame
    except av.FFmpegError as exc:
        if index == 0:
            raise DataError(f"video {path} cannot be decoded: {first_line(exc)}") from None
        return  # a truncated tail: keep what decoded
    finally:
        container.close()
    if index == 0:
        raise DataError(f"video {path} cannot be decoded: no frames")


def read_frame_at(path: str | os.PathLike[str], time_s: float) -> np.ndarray:
    """The frame shown at ``time_s`` (first frame at or after it; the last one near the end), uint8 RGB.

    Seeks to the keyframe before ``time_s`` and decodes forward, so random access costs at most one GOP.
    """
    import av  # why: PyAV only when a video is decoded

    container, stream = _open(path)
    start = _start(stream)
    try:
        last = None
        try:
            if time_s > 0 and stream.time_base is not None:
                target = int((Fraction(time_s) + start) / stream.time_base)
                container.seek(target, stream=stream, backward=True, any_frame=False)
        except av.FFmpegError:
            container.seek(0)
        for frame in container.decode(stream):
            t = _frame_time(frame, start)
            if t is None:
                continue
            last = frame
            if t + _EPS >= time_s:
                return frame.to_ndarray(format="rgb24")
        if last is not None:
            return last.to_ndarray(format="rgb24")
        raise DataError(f"no decodable frame at {time_s:.3f}s in video {path}")
    except av.FFmpegError as exc:
        raise DataError(f"undecodable video {path} at {time_s:.3f}s: {first_line(exc)}") from None
    finally:
        container.close()


def extract_frames(video: str | os.PathLike[str], out_dir: str | os.PathLike[str], fps: float = 1.0,
                   fmt: str = "jpg", quality: int = 95, prefix: str | None = None) -> list[tuple[Path, float]]:
    """Write the frames of ``video`` sampled at ``fps`` as ``out_dir/<prefix>_<index:06d>.<fmt>``.

    Returns ``[(path, time_s), ...]``. Files are written whole (temp file + rename), so an interrupted
    extraction never leaves a half-written frame behind.
    """
    fmt = fmt.lower().lstrip(".")
    if fmt not in ("jpg", "jpeg", "png", "webp"):
        raise DataError(f"frame format must be jpg, png or webp, got '{fmt}'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = prefix or Path(video).stem
    written = []
    for index, t, rgb in iter_video_frames(video, fps):
        target = out / f"{stem}_{index:06d}.{fmt}"
        with atomic_path(target) as tmp:
            options = {"quality": quality} if fmt in ("jpg", "jpeg", "webp") else {}
            Image.fromarray(rgb).save(tmp, format="JPEG" if fmt in ("jpg", "jpeg") else fmt.upper(), **options)
        written.append((target, t))
    return written


def write_frame_index(rows: list[tuple[Path, str, float]], path: Path) -> None:
    """A CSV manifest ``image,video,time_s`` (image paths relative to the CSV's folder), readable by
    :class:`~meddino.data.sources.PretrainSource`."""
    with atomic_write(path, "w") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "video", "time_s"])
        for image, video, t in rows:
            writer.writerow([os.path.relpath(image, path.parent), video, f"{t:.6f}"])


# ---------------------------------------------------------------------------------------------- CLI verb
class ExtractFramesConfig(Schema):
    """Config of ``meddino data extract-frames``."""

    video: str = Field(description="a video file, or a folder searched recursively for videos")
    out: str = Field(description="output folder for the frames and frames.csv")
    fps: float = Field(1.0, gt=0, description="frames per second to keep")
    fmt: Literal["jpg", "png", "webp"] = "jpg"
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality")


def run_extract_frames(cfg: ExtractFramesConfig) -> int:
    """Extract frames; a folder's undecodable videos are skipped and counted, a single bad video is an error."""
    src = require_file(cfg.video, "video")
    out = Path(cfg.out).expanduser()
    if src.is_dir():
        videos = sorted(p for p in src.rglob("*") if p.is_file() and is_video_file(p))
        if not videos:
            raise DataError(f"no video files (.mp4, .avi, .mov, .mkv, ...) under {src}")
    else:
        videos = [src]
    rows = []
    skipped: list[str] = []
    with Progress(len(videos), "extract-frames", unit="video") as bar:
        for video in videos:
            rel = video.relative_to(src) if src.is_dir() else Path(video.name)
            target = out / rel.parent
            try:
                frames = extract_frames(video, target, cfg.fps, cfg.fmt, cfg.quality, prefix=rel.stem)
            except DataError as exc:
                if len(videos) == 1:
                    raise
                skipped.append(str(exc))
                bar.advance(1, skipped=len(skipped))
                continue
            rows += [(path, str(video), t) for path, t in frames]
            bar.advance(1, frames=len(rows))
    if not rows:
        raise DataError(f"no frame could be decoded from {len(videos)} video(s) under {src}")
    write_frame_index(rows, out / "frames.csv")
    print(f"wrote {len(rows)} frames from {len(videos) - len(skipped)} video(s) to {out} (index: {out / 'frames.csv'})")
    if skipped:
        print(f"skipped {len(skipped)} undecodable video(s); first: {skipped[0]}", file=sys.stderr)
    return 0
