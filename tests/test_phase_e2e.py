"""End to end through the real CLI on generated videos: extract, stage 1, features, stage 2, metrics, online.

Videos are encoded with PyAV in the test (64x48, 25 fps, 12 s); the frame colour encodes the phase so the
tiny pipeline can learn it. Layouts: csv (videos/ + phases.csv) and cholec80 (phase_annotations at 25 fps).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest

pytestmark = pytest.mark.slow

COLOURS = [(210, 50, 50), (50, 210, 50), (50, 50, 210)]
SECONDS = 12
FPS = 25


def phases_of(v: int) -> list[int]:
    """Phase per second of video v: 3 phases, boundaries shifted per video."""
    a, b = 3 + v % 2, 8 - v % 2
    return [0 if s < a else 1 if s < b else 2 for s in range(SECONDS)]


def write_video(path: Path, phases: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for phase in phases:
            for _ in range(FPS):
                img = np.clip(np.array(COLOURS[phase]) + rng.integers(-25, 25, (48, 64, 3)), 0, 255).astype(np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def csv_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phase_csv")
    rows = []
    for v in range(3):
        write_video(root / "videos" / f"case{v}.mp4", phases_of(v), seed=v)
        rows += [(f"case{v}", s, ["prep", "dissect", "close"][p]) for s, p in enumerate(phases_of(v))]
    with open(root / "phases.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["video", "frame", "phase"])
        w.writerows(rows)
    return root


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _check_run(out: Path, n_test_frames: int, n_phases: int) -> dict:
    res = json.loads((out / "results.json").read_text())
    for key in ("accuracy", "macro_f1", "edit", "f1@10", "f1@25", "f1@50"):
        assert set(res["metrics"][key]) == {"mean", "std", "n"} and res["metrics"][key]["n"] == 1
    rows = _read_csv(out / "predictions" / "test.csv")
    assert len(rows) == n_test_frames
    probs = np.array([[float(r[f"prob_{i}"]) for i in range(n_phases)] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert [int(r["pred"]) for r in rows] == probs.argmax(1).tolist()
    acc = np.mean([r["true"] == r["pred"] for r in rows])
    assert res["metrics"]["accuracy"]["mean"] == pytest.approx(acc)
    for name in ("backbone.safetensors", "backbone.json", "mstcn.safetensors", "model.json"):
        assert (out / "model" / name).is_file()
    return res


def test_csv_videos_eval_then_online_predict(cli, csv_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = cli("eval", "phase", "--config", "phase_tiny", f"data.root={csv_root}", "data.layout=csv",
            "backbone=random:dinov2_tiny", f"out={out}", "data.phases=[prep,dissect,close]",
            "data.test_videos=[case2]", "data.val_videos=[]")
    assert r.returncode == 0, r.stderr[-3000:]
    res = _check_run(out, SECONDS, 3)
    assert res["split_sizes"] == {"train": 2, "val": 0, "test": 1}
    assert res["phases"] == ["prep", "dissect", "close"]
    assert res["metrics"]["accuracy"]["mean"] >= 0.6  # colour-coded phases are learnable; chance is ~0.33
    assert res["frame_model_metrics"] is not None
    assert (out / "model" / "head.safetensors").is_file()

    # online, frame by frame with the rolling causal state: same phases and probabilities as offline
    pred_csv = tmp_path / "online.csv"
    video = csv_root / "videos" / "case2.mp4"
    r = cli("predict", "phase", str(video), f"model={out}", f"out={pred_csv}", "quiet=true")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["frames"] == SECONDS
    assert summary["latency"]["median_ms"] > 0 and summary["latency"]["p95_ms"] >= summary["latency"]["median_ms"]
    online = _read_csv(pred_csv)
    offline = _read_csv(out / "predictions" / "test.csv")
    assert [o["pred"] for o in online] == [o["pred"] for o in offline]
    on = np.array([[float(o[f"prob_{i}"]) for i in range(3)] for o in online])
    off = np.array([[float(o[f"prob_{i}"]) for i in range(3)] for o in offline])
    np.testing.assert_allclose(on, off, atol=1e-4)


def test_cholec80_layout_eval(cli, tmp_path: Path) -> None:
    root = tmp_path / "cholec80"
    names = ["Preparation", "CalotTriangleDissection", "ClippingCutting"]
    (root / "phase_annotations").mkdir(parents=True)
    for v in range(1, 4):
        phases = phases_of(v)
        write_video(root / "videos" / f"video{v:02d}.mp4", phases, seed=10 + v)
        lines = ["Frame\tPhase"] + [f"{i}\t{names[phases[i // FPS]]}" for i in range(SECONDS * FPS)]
        (root / "phase_annotations" / f"video{v:02d}-phase.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    r = cli("eval", "phase", "--config", "phase_tiny", f"data.root={root}", "data.layout=cholec80",
            "backbone=random:dinov2_tiny", f"out={out}", "data.test_videos=[video03]", "data.val_videos=[video02]",
            "stage1.freeze_backbone=true", "stage1.class_weights=balanced", "stage2.class_weights=balanced")
    assert r.returncode == 0, r.stderr[-3000:]
    res = _check_run(out, SECONDS, 7)
    assert len(res["phases"]) == 7 and res["split_sizes"] == {"train": 1, "val": 1, "test": 1}
    assert res["stage2"]["val_accuracy"] is not None and 1 <= res["stage2"]["best_epoch"] <= 40
    assert "phase:" in r.stdout and "accuracy" in r.stdout


def test_undecodable_video_exits_2_with_one_line(cli, csv_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "bad"
    (root / "videos").mkdir(parents=True)
    (root / "videos" / "case0.mp4").write_bytes((csv_root / "videos" / "case0.mp4").read_bytes())
    (root / "videos" / "case1.mp4").write_bytes(b"\x00garbage, not a video" * 100)
    rows = [f"case{v},{s},p\n" for v in (0, 1) for s in range(SECONDS)]
    (root / "phases.csv").write_text("video,frame,phase\n" + "".join(rows))
    r = cli("eval", "phase", "--config", "phase_tiny", f"data.root={root}", f"out={tmp_path / 'run'}",
            "data.test_videos=[case1]")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "case1.mp4 cannot be decoded" in lines[0], r.stderr


def test_annotations_not_covering_video_exit_2(csv_root: Path, tmp_path: Path, capsys) -> None:
    """In-process through ``meddino.cli.main`` (the same code path without a second interpreter start-up)."""
    from meddino.cli import main

    root = tmp_path / "short"
    (root / "videos").mkdir(parents=True)
    for v in (0, 1):
        (root / "videos" / f"case{v}.mp4").write_bytes((csv_root / "videos" / f"case{v}.mp4").read_bytes())
    rows = [f"case0,{s},p\n" for s in range(SECONDS)] + [f"case1,{s},p\n" for s in range(SECONDS - 4)]
    (root / "phases.csv").write_text("video,frame,phase\n" + "".join(rows))
    code = main(["eval", "phase", "--config", "phase_tiny", f"data.root={root}", f"out={tmp_path / 'run'}",
                 "data.test_videos=[case1]"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"cover {SECONDS - 4} frames of 'case1'" in lines[0], err


def test_frozen_backbone_features_and_resume(csv_root: Path, tmp_path: Path, capsys) -> None:
    """stage1.enabled=false: MS-TCN on frozen-backbone features; a rerun reuses the feature files."""
    from meddino.cli import main

    out = tmp_path / "run"
    args = ["eval", "phase", "--config", "phase_tiny", f"data.root={csv_root}", f"out={out}", "stage1.enabled=false",
            "data.test_videos=[case0]", "data.val_videos=[case1]", "stage2.epochs=5"]
    assert main(args) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["frame_model_metrics"] is None and not (out / "model" / "head.safetensors").exists()
    assert (out / "model" / "backbone.safetensors").is_file()
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "reused 3 existing file(s)" in err
    second = json.loads((out / "results.json").read_text())
    assert second["per_video"] == first["per_video"]  # same features, same seed -> same result


def test_rerun_reuses_the_stage1_model(csv_root: Path, tmp_path: Path, capsys) -> None:
    from meddino.cli import main

    out = tmp_path / "run"
    args = ["eval", "phase", "--config", "phase_tiny", f"data.root={csv_root}", f"out={out}",
            "data.test_videos=[case0]", "data.val_videos=[]", "stage2.epochs=3"]
    assert main(args) == 0
    head = (out / "model" / "head.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "reusing the finished model" in err and "reused 3 existing file(s)" in err
    assert (out / "model" / "head.safetensors").read_bytes() == head
    # another stage-1 setting invalidates both the stage-1 model and the features
    assert main(args + ["stage1.lr=2e-3"]) == 0
    err = capsys.readouterr().err
    assert "reusing" not in err and "reused" not in err
