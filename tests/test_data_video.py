"""Video sampling with PyAV on a generated mp4, random access by time, and the extract-frames CLI."""

from __future__ import annotations

import csv
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from meddino.data import video
from meddino.errors import DataError

FPS, N_FRAMES = 10, 35  # 3.5 s


def write_video(path: Path, n: int = N_FRAMES, fps: int = FPS) -> Path:
    """Frame i is a flat grey of level 7 i (neutral chroma, so the codec keeps it within a level or two)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            rgb = np.full((48, 64, 3), 7 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_number(rgb: np.ndarray) -> int:
    return int(round(float(rgb.mean()) / 7))


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return write_video(tmp_path / "clip.mp4")


def test_one_frame_per_second(clip: Path) -> None:
    frames = list(video.iter_video_frames(clip, fps=1.0))
    assert [i for i, _, _ in frames] == [0, 1, 2, 3]
    assert [t for _, t, _ in frames] == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert [frame_number(f) for _, _, f in frames] == [0, 10, 20, 30]
    assert frames[0][2].shape == (48, 64, 3) and frames[0][2].dtype == np.uint8


def test_other_rates(clip: Path) -> None:
    assert [frame_number(f) for _, _, f in video.iter_video_frames(clip, fps=4.0)][:5] == [0, 3, 5, 8, 10]
    assert len(list(video.iter_video_frames(clip, fps=0))) == N_FRAMES  # every frame
    assert video.video_duration(clip) == pytest.approx(3.5)
    assert video.sample_times(3.5, 1.0) == [0.0, 1.0, 2.0, 3.0]


def test_random_access_by_time(clip: Path) -> None:
    assert frame_number(video.read_frame_at(clip, 2.0)) == 20
    assert frame_number(video.read_frame_at(clip, 1.25)) == 13  # first frame at or after 1.25 s
    assert frame_number(video.read_frame_at(clip, 0.0)) == 0
    assert frame_number(video.read_frame_at(clip, 99.0)) == N_FRAMES - 1  # past the end: the last frame


def test_undecodable_video(tmp_path: Path) -> None:
    (tmp_path / "bad.mp4").write_bytes(b"this is not a video" * 50)
    (tmp_path / "empty.mp4").write_bytes(b"")
    for name in ("bad.mp4", "empty.mp4"):
        with pytest.raises(DataError, match=name):
            list(video.iter_video_frames(tmp_path / name))
        with pytest.raises(DataError, match=name):
            video.video_duration(tmp_path / name)


def test_extract_frames_cli(cli, clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "frames"
    result = cli("data", "extract-frames", clip, f"out={out}", "fps=1")
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.glob("*.jpg"))
    assert names == [f"clip_{i:06d}.jpg" for i in range(4)]
    with open(out / "frames.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["time_s"]) for r in rows] == [0.0, 1.0, 2.0, 3.0]
    from meddino.data.io import read_image

    assert [frame_number(read_image(out / r["image"])) for r in rows] == [0, 10, 20, 30]


def test_extract_frames_cli_undecodable_is_exit_2_one_line(cli, tmp_path: Path) -> None:
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x01garbage" * 100)
    result = cli("data", "extract-frames", tmp_path / "broken.mp4", f"out={tmp_path / 'o'}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.mp4" in lines[0] and "Traceback" not in result.stderr


def test_extract_frames_cli_folder_skips_bad_videos(cli, tmp_path: Path) -> None:
    src = tmp_path / "videos"
    (src / "case1").mkdir(parents=True)
    write_video(src / "case1" / "a.mp4", n=20)
    (src / "b.mp4").write_bytes(b"nope" * 100)
    out = tmp_path / "out"
    result = cli("data", "extract-frames", src, f"out={out}", "fps=2")
    assert result.returncode == 0, result.stderr
    assert len(list((out / "case1").glob("a_*.jpg"))) == 4
    assert "skipped 1 undecodable" in result.stderr
    bad = cli("data", "extract-frames", src, f"out={out}", "fps=-1")
    assert bad.returncode == 2 and "fps" in bad.stderr


def test_fill_gaps_repeats_frames_over_a_variable_frame_rate_gap(tmp_path: Path) -> None:
    """Frames at 0, 1, 2 and 5 s: sampled at 1 fps, the 5-s frame also stands for 3 and 4 s with fill_gaps."""
    import av
    import numpy as np

    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=1)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for second in (0, 1, 2, 5):
            img = np.full((32, 32, 3), second * 40, np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = second * 1000, Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    plain = [(i, round(t)) for i, t, _ in video.iter_video_frames(path, fps=1.0)]
    filled = [(i, round(t), int(rgb.mean() / 40 + 0.5)) for i, t, rgb in video.iter_video_frames(path, 1.0, fill_gaps=True)]
    assert plain == [(0, 0), (1, 1), (2, 2), (3, 5)]
    assert filled == [(0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 5, 5), (4, 5, 5), (5, 5, 5)]
