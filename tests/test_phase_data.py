"""Phase data: the three layouts, label resampling, splits, frame decoding at N fps, and bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from meddino.errors import DataError
from meddino.tasks.phase.data import (
    AUTOLAPARO_PHASES,
    CHOLEC80_PHASES,
    assign_splits,
    load_phase_dataset,
    resample_labels,
)
from meddino.tasks.phase.frames import extract_frames, iter_video_frames

COLOURS = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40), (40, 220, 220), (220, 40, 220), (128, 128, 128)]


def write_video(
    path: Path, seconds: int, fps: int = 25, size: tuple[int, int] = (64, 48), colour_of_second=None
) -> None:
    """An mpeg4 video whose frame colour encodes the second (so decoding at 1 fps can be checked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for sec in range(seconds):
            colour = colour_of_second(sec) if colour_of_second else (sec * 20 % 256, 100, 50)
            img = np.empty((h, w, 3), np.uint8)
            img[:] = colour
            for _ in range(fps):
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_csv(path: Path, rows: list[tuple], header=("video", "frame", "phase")) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


# ------------------------------------------------------------------------------------------- decoding


def test_video_decoded_at_one_fps(tmp_path: Path) -> None:
    write_video(tmp_path / "v.mp4", 5, colour_of_second=lambda s: (s * 50, 0, 0))
    frames = list(iter_video_frames(tmp_path / "v.mp4", 1.0))
    assert len(frames) == 5
    reds = [int(f[..., 0].mean()) for f in frames]
    assert all(abs(r - 50 * s) <= 6 for s, r in enumerate(reds)), reds  # frame i is second i
    assert len(list(iter_video_frames(tmp_path / "v.mp4", 2.0))) == 10
    assert len(list(iter_video_frames(tmp_path / "v.mp4", 0.5))) == 3  # t = 0, 2, 4 s


def test_undecodable_video_is_one_line_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 50)
    with pytest.raises(DataError) as exc:
        list(iter_video_frames(bad, 1.0))
    assert "cannot be decoded" in str(exc.value) and "\n" not in str(exc.value)


# ------------------------------------------------------------------------------------------- layouts


def test_csv_layout_videos_and_frame_folders(tmp_path: Path) -> None:
    write_video(tmp_path / "videos" / "a.mp4", 3)
    folder = tmp_path / "frames" / "b"
    folder.mkdir(parents=True)
    for i in (0, 1, 2, 10):  # natural order: 10 comes last
        Image.fromarray(np.full((20, 30, 3), i * 20, np.uint8)).save(folder / f"frame_{i}.png")
    rows = [("a", i, p) for i, p in enumerate(["x", "x", "y"])] + [("b", i, p) for i, p in enumerate("xyyz")]
    write_csv(tmp_path / "phases.csv", rows)
    ds = load_phase_dataset(tmp_path, "csv", train_videos=["a"], test_videos=["b"])
    assert ds.phases == ["x", "y", "z"]
    a, b = ds.videos
    assert a.source.suffix == ".mp4" and b.source.is_dir()
    assert a.labels.tolist() == [0, 0, 1] and b.labels.tolist() == [0, 1, 1, 2]
    assert (a.split, b.split) == ("train", "test")
    path = extract_frames(b, 1.0, 16, tmp_path / "cache")
    arr = np.load(path)
    assert arr.shape == (4, 16, 16, 3) and arr.dtype == np.uint8
    assert [int(arr[i].mean()) for i in range(4)] == [0, 20, 40, 200]


def test_csv_phase_order_and_errors(tmp_path: Path) -> None:
    write_video(tmp_path / "videos" / "a.mp4", 2)
    write_csv(tmp_path / "phases.csv", [("a", 0, "late"), ("a", 1, "early")])
    ds = load_phase_dataset(tmp_path, "csv", phases=["early", "late"], test_fraction=0)
    assert ds.videos[0].labels.tolist() == [1, 0]
    with pytest.raises(DataError, match="line 2: unknown phase 'late'"):
        load_phase_dataset(tmp_path, "csv", phases=["early", "middle"])
    write_csv(tmp_path / "phases.csv", [("a", 0, "p"), ("a", 2, "p")])
    with pytest.raises(DataError, match="no phase for frame 1"):
        load_phase_dataset(tmp_path, "csv")
    write_csv(tmp_path / "phases.csv", [("zz", 0, "p")])
    with pytest.raises(DataError, match="no video for 'zz'"):
        load_phase_dataset(tmp_path, "csv")
    write_csv(tmp_path / "phases.csv", [("a", 0)], header=("video", "frame"))
    with pytest.raises(DataError, match="missing column"):
        load_phase_dataset(tmp_path, "csv")


def test_csv_split_and_patient_columns(tmp_path: Path) -> None:
    names = [f"v{i}" for i in range(6)]
    for n in names:
        (tmp_path / "frames" / n).mkdir(parents=True)
    rows = [(n, 0, "p", f"pat{i // 2}", "") for i, n in enumerate(names)]
    write_csv(tmp_path / "phases.csv", rows, header=("video", "frame", "phase", "patient", "split"))
    ds = load_phase_dataset(tmp_path, "csv", val_fraction=0.34, test_fraction=0.34, seed=3)
    by_patient: dict[str, set[str]] = {}
    for v in ds.videos:
        by_patient.setdefault(v.patient, set()).add(v.split)
    assert all(len(s) == 1 for s in by_patient.values())  # no patient in two splits
    assert sorted(s.pop() for s in by_patient.values()) == ["test", "train", "val"]
    # an explicit split column is used as given, and a patient leak is refused
    rows = [(n, 0, "p", f"pat{i // 2}", "train" if i < 4 else "test") for i, n in enumerate(names)]
    write_csv(tmp_path / "phases.csv", rows, header=("video", "frame", "phase", "patient", "split"))
    assert load_phase_dataset(tmp_path, "csv").split_sizes() == {"train": 4, "val": 0, "test": 2}
    rows[3] = ("v3", 0, "p", "pat1", "test")
    write_csv(tmp_path / "phases.csv", rows, header=("video", "frame", "phase", "patient", "split"))
    with pytest.raises(DataError, match=r"^patient pat1 is in both train and test \(column 'split' in .*phases.csv: "
                                        r"video v2 in train, video v3 in test\)$"):
        load_phase_dataset(tmp_path, "csv")


def test_video_lists_and_random_splits_keep_patients_on_one_side(tmp_path: Path) -> None:
    """The explicit video lists are checked against the patient column too, and a random split keeps a
    patient's videos together even when other videos have no patient."""
    names = [f"v{i}" for i in range(8)]
    for n in names:
        (tmp_path / "frames" / n).mkdir(parents=True)
    patients = ["pat0", "pat0", "pat1", "pat1", "", "", "", ""]
    rows = [(n, 0, "p", p) for n, p in zip(names, patients)]
    write_csv(tmp_path / "phases.csv", rows, header=("video", "frame", "phase", "patient"))
    with pytest.raises(DataError) as err:
        load_phase_dataset(tmp_path, "csv", test_videos=["v1", "v4"])
    assert str(err.value) == (f"patient pat0 is in both train and test (data.*_videos, patients from "
                              f"{tmp_path / 'phases.csv'}: video v0 in train, video v1 in test)")
    ds = load_phase_dataset(tmp_path, "csv", test_videos=["v2", "v3", "v4"])
    assert ds.split_sizes() == {"train": 5, "val": 0, "test": 3}
    for seed in range(20):
        ds = load_phase_dataset(tmp_path, "csv", val_fraction=0.2, test_fraction=0.4, seed=seed)
        split = {v.name: v.split for v in ds.videos}
        assert split["v0"] == split["v1"] and split["v2"] == split["v3"], (seed, split)


def test_eval_phase_refuses_a_patient_in_two_splits(tmp_path: Path, capsys) -> None:
    """Through the CLI (in-process): one line, exit 2, before any frame is decoded or model built."""
    from meddino.cli import main

    for n in ("v0", "v1", "v2"):
        (tmp_path / "data" / "frames" / n).mkdir(parents=True)
    rows = [("v0", 0, "p", "pat0", "train"), ("v1", 0, "p", "pat1", "train"), ("v2", 0, "p", "pat0", "test")]
    write_csv(tmp_path / "data" / "phases.csv", rows, header=("video", "frame", "phase", "patient", "split"))
    code = main(["eval", "phase", "--config", "phase_tiny", f"data.root={tmp_path / 'data'}",
                 f"out={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"meddino: error: patient pat0 is in both train and test (column 'split' in "
                   f"{tmp_path / 'data' / 'phases.csv'}: video v0 in train, video v2 in test)"], err
    assert not (tmp_path / "run").exists()


def test_assign_splits_is_seeded_and_complete() -> None:
    groups = [f"g{i}" for i in range(10)]
    a = assign_splits(groups, 0.2, 0.3, seed=1)
    assert a == assign_splits(groups, 0.2, 0.3, seed=1)
    assert sorted(a.values()).count("test") == 3 and sorted(a.values()).count("val") == 2
    assert set(assign_splits(["x", "y"], 0.5, 0.5, 0).values()) == {"train", "test"}


def test_autolaparo_layout(tmp_path: Path) -> None:
    (tmp_path / "labels").mkdir()
    for n in (1, 11, 15):
        name = f"{n:02d}"
        (tmp_path / "frames" / name).mkdir(parents=True)
        lines = ["Frame\tPhase"] + [f"{i}\t{1 + i // 2}" for i in range(6)]
        (tmp_path / "labels" / f"label_{name}.txt").write_text("\n".join(lines) + "\n")
    ds = load_phase_dataset(tmp_path, "autolaparo")
    assert ds.phases == list(AUTOLAPARO_PHASES) and len(ds.phases) == 7
    assert {v.name: v.split for v in ds.videos} == {"01": "train", "11": "val", "15": "test"}
    assert ds.videos[0].labels.tolist() == [0, 0, 1, 1, 2, 2]
    (tmp_path / "labels" / "label_01.txt").write_text("0\t1\n1\t9\n")
    with pytest.raises(DataError, match="label_01.txt line 2: unknown phase '9'"):
        load_phase_dataset(tmp_path, "autolaparo")


def test_cholec80_layout_subsamples_25fps_annotations(tmp_path: Path) -> None:
    ann = tmp_path / "phase_annotations"
    ann.mkdir()
    (tmp_path / "frames" / "video01").mkdir(parents=True)
    (tmp_path / "frames" / "video41").mkdir(parents=True)
    # 75 frames at 25 fps: 30 x Preparation, 45 x CalotTriangleDissection -> 1 fps labels of frames 0, 25, 50
    lines = ["Frame\tPhase"] + [f"{i}\t{'Preparation' if i < 30 else 'CalotTriangleDissection'}" for i in range(75)]
    for name in ("video01", "video41"):
        (ann / f"{name}-phase.txt").write_text("\n".join(lines) + "\n")
    ds = load_phase_dataset(tmp_path, "cholec80")
    assert ds.phases == list(CHOLEC80_PHASES)
    assert ds.videos[0].labels.tolist() == [0, 0, 1]
    assert {v.name: v.split for v in ds.videos} == {"video01": "train", "video41": "test"}
    (ann / "video01-phase.txt").write_text("Frame\tPhase\n0\tPreparation\n1\tLunch\n")
    with pytest.raises(DataError, match="video01-phase.txt line 3: unknown phase 'Lunch'"):
        load_phase_dataset(tmp_path, "cholec80")


def test_resample_labels() -> None:
    labels = np.repeat(np.arange(4), 25)  # 4 s at 25 fps
    assert resample_labels(labels, 25.0, 1.0).tolist() == [0, 1, 2, 3]
    assert resample_labels(labels, 25.0, 2.0).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert resample_labels(np.array([5, 6]), 1.0, 2.0).tolist() == [5, 5, 6]


def test_annotations_must_cover_the_video(tmp_path: Path) -> None:
    write_video(tmp_path / "videos" / "a.mp4", 6)
    write_csv(tmp_path / "phases.csv", [("a", i, "p") for i in range(4)])
    (v,) = load_phase_dataset(tmp_path, "csv", test_fraction=0).videos
    with pytest.raises(DataError, match="cover 4 frames of 'a' at 1 fps but the video has"):
        extract_frames(v, 1.0, 16, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.npy"))  # nothing half-written
    # one trailing extra second of labels (rounding of the last frame) is accepted and trimmed
    write_csv(tmp_path / "phases.csv", [("a", i, "p") for i in range(7)])
    (v,) = load_phase_dataset(tmp_path, "csv", test_fraction=0).videos
    path = extract_frames(v, 1.0, 16, tmp_path / "cache")
    assert np.load(path).shape[0] == 6 and len(v.labels) == 6
    mtime = path.stat().st_mtime_ns
    (v,) = load_phase_dataset(tmp_path, "csv", test_fraction=0).videos
    assert extract_frames(v, 1.0, 16, tmp_path / "cache") == path and path.stat().st_mtime_ns == mtime  # reused


def test_feature_files_are_resumable(tmp_path: Path) -> None:
    from meddino.models import build_backbone
    from meddino.tasks.phase.data import PhaseVideo
    from meddino.tasks.phase.features import extract_features, weights_fingerprint
    from meddino.tasks.phase.frame_model import FrameClassifier

    torch.manual_seed(0)
    model = FrameClassifier(build_backbone("dinov2_tiny", img_size=32), 3).eval()
    frames = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "v.npy", frames)
    video = PhaseVideo("v", tmp_path, np.array([0, 1, 1, 2, 2]), "x")
    fp = weights_fingerprint(model.backbone, model.head)
    cpu = torch.device("cpu")
    paths = extract_features(model, [video], {"v": tmp_path / "v.npy"}, tmp_path / "f", cpu, 2, True, fp)
    from safetensors.torch import load_file

    data = load_file(str(paths["v"]))
    assert data["features"].shape == (5, model.backbone.embed_dim) and data["logits"].shape == (5, 3)
    mean = torch.tensor(model.backbone.mean)[:, None, None]
    std = torch.tensor(model.backbone.std)[:, None, None]
    with torch.no_grad():
        ref = model.backbone.forward_features((torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 - mean) / std)
    ref = ref["cls"]
    torch.testing.assert_close(data["features"], ref, rtol=1e-4, atol=1e-4)
    mtime = paths["v"].stat().st_mtime_ns
    extract_features(model, [video], {"v": tmp_path / "v.npy"}, tmp_path / "f", cpu, 2, True, fp)
    assert paths["v"].stat().st_mtime_ns == mtime  # same weights: skipped
    extract_features(model, [video], {"v": tmp_path / "v.npy"}, tmp_path / "f", cpu, 2, True, fp + "x")
    assert paths["v"].stat().st_mtime_ns != mtime  # other weights: recomputed
