"""Experiment tracking (``log`` block): what pretraining and an eval verb send to TensorBoard, MLflow and W&B,
read back with each tool's own reader; the refusal of a backend that is not installed; rank 0 only."""

from __future__ import annotations

import csv
import json
import os
import struct
import sys
from pathlib import Path

import pytest
from test_pretrain_engine import config, make_images
from test_seg_data import make_cholec

from meddino.cli import main
from meddino.config import load_config
from meddino.errors import ConfigError
from meddino.pretrain.engine import run_pretrain
from meddino.runlog import RunDir, read_metrics
from meddino.viz.run import VizConfig
from meddino.tracking import LogConfig, Tracker

EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch, tmp_path):
    """W&B never reaches the network and keeps its own settings in the test's folder."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"), "WANDB_CACHE_DIR": str(tmp_path / "wc"),
                       "WANDB_DATA_DIR": str(tmp_path / "wd")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _mlflow_run(out: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    # a reader of a file store must opt in as meddino does for its writer (docs/tracking.md); a run written
    # by a subprocess (torchrun) has not set it in this process
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    state = json.loads((out / "tracking.json").read_text())["mlflow"]
    mlflow.set_tracking_uri(state["tracking_uri"])
    assert state["tracking_uri"] == (out / "mlruns").resolve().as_uri()  # offline: a file store in the run
    client = MlflowClient()
    return client, client.get_run(state["run_id"])


def _wandb_records(path: Path):
    """The records of a W&B transaction log (``run-ID.wandb``), parsed with W&B's own protobuf ``Record``:
    a 7-byte header, then LevelDB-log blocks of 32 KiB whose chunks (FULL, FIRST, MIDDLE, LAST) hold them."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


def _wandb_history(out: Path) -> tuple[list[dict], list, list[int]]:
    """(history rows, run records, exit codes) over every attempt's transaction log, in order."""
    rows, runs, exits = [], [], []
    for path in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        for r in _wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
            elif kind == "run":
                runs.append(r.run)
            elif kind == "exit":
                exits.append(r.exit.exit_code)
    return rows, runs, exits


def _monitor_csv(images: Path, path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "label", "split"])
        w.writeheader()
        for i, p in enumerate(sorted(images.glob("*.png"))):
            w.writerow({"image": str(p), "label": "a" if i % 2 else "b", "split": "val" if i % 4 < 2 else "train"})
    return path


def test_log_block_keeps_jsonl_first_and_refuses_remote_tracking_offline():
    log = LogConfig(backends=["mlflow", "tensorboard", "mlflow"])
    assert log.backends == ["jsonl", "mlflow", "tensorboard"] and log.trackers == ["mlflow", "tensorboard"]
    with pytest.raises(ConfigError, match="unknown|Input should be"):
        load_config(VizConfig, None, ["log.backends=[comet]"])
    with pytest.raises(ConfigError, match="log.offline=true keeps tracking on this machine"):
        load_config(VizConfig, None, ["log.offline=true", "log.tracking_uri=http://mlflow.example:5000"])
    assert load_config(VizConfig, None, ["log.offline=true", "log.tracking_uri=/tmp/store"]).log.offline


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow", "wandb"])
def test_a_backend_that_is_not_installed_is_one_line_naming_its_extra(backend, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, backend, None)  # what find_spec and import see when it is not installed
    out = tmp_path / "run"
    code = main(["pretrain", "--config", "dinov1_tiny", f"data.path={tmp_path}", f"out={out}",
                 f"log.backends=[{backend}]"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"log.backends: {backend} is not installed; pip install 'meddino[{backend}]'" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()  # refused before anything was written


def test_a_tracking_store_that_cannot_be_opened_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    pytest.importorskip("mlflow")
    images = make_images(tmp_path / "imgs", n=2)
    (tmp_path / "afile").write_text("")
    out = tmp_path / "viz"
    code = main(["viz", "pca", str(images), "backbones=[random:dinov2_tiny]", "img_size=32", f"out={out}",
                 "log.backends=[mlflow]", f"log.tracking_uri=file:{tmp_path / 'afile' / 'store'}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "log.backends mlflow: cannot start the run: " in err and "Not a directory" in err
    assert not out.exists()


def test_pretraining_tracks_scalars_config_and_images_and_a_resume_continues_the_run(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    images = make_images(tmp_path / "imgs")
    out = tmp_path / "run"
    common = ["train.iterations=4", "train.checkpoint_every=2", "train.log_every=1", "monitor.every=2",
              "monitor.k=3", f"monitor.manifest={_monitor_csv(images, tmp_path / 'monitor.csv')}",
              "log.backends=[tensorboard,mlflow,wandb]", "log.offline=true", "log.tags=[chest,site=a]"]
    run_pretrain(config("dinov1_tiny", images, out, *common, "train.stop_at=2"))  # stopped half-way ...
    first_state = json.loads((out / "tracking.json").read_text())
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard")) as killed:  # as if a killed attempt had logged past its checkpoint
        killed.add_scalar("loss", 99.0, 3)
    run_pretrain(config("dinov1_tiny", images, out, *common, "resume=auto"))  # ... and continued
    assert json.loads((out / "tracking.json").read_text()) == first_state  # the same tracked runs go on
    rows = read_metrics(out)
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    knn = [(r["step"], r["knn_top1"]) for r in rows if "knn_top1" in r]
    assert [s for s, _ in losses] == [1, 2, 3, 4] and [s for s, _ in knn] == [2, 4]

    # TensorBoard: the scalars of metrics.jsonl once each, the config as HParams and text, the two images
    tb = _events(out / "tensorboard")
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in tb.Scalars("loss")] == losses
    assert [(e.step, pytest.approx(e.value)) for e in tb.Scalars("knn_top1")] == knn
    assert {"lr", "teacher_entropy", "effective_rank"} <= set(tb.Tags()["scalars"])
    for tag in ("pretrain/pca", "pretrain/knn_curve"):
        (image,) = tb.Images(tag)
        assert image.step == 4 and image.width > 0 and image.height > 0
    (pca,) = tb.Images("pretrain/pca")
    assert (pca.width, pca.height) == (4 * 128, 2 * 128)  # 4 images above their maps, 32 px crops at 128 px
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    hp = HParamsPluginData.FromString(tb.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert hp.session_start_info.hparams["train.iterations"].number_value == 4
    assert hp.session_start_info.hparams["model.arch"].string_value == "dinov1_tiny"
    assert "config/text_summary" in tb.Tags()["tensors"]

    # MLflow: one run, finished, the config as params, every step's loss once, the images as artifacts
    client, run = _mlflow_run(out)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.iterations"] == "4" and run.data.params["model.arch"] == "dinov1_tiny"
    assert run.data.params["crops.global_size"] == "32" and run.data.tags["site"] == "a" and "chest" in run.data.tags
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert history == [(s, pytest.approx(v, rel=1e-6)) for s, v in losses]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "pretrain")) == [
        "pretrain/knn_curve.png", "pretrain/pca.png"]

    # W&B (offline): one run id over both attempts, each curve against its step, the images, exit 0
    history_rows, runs, exits = _wandb_history(out)
    assert {r.run_id for r in runs} == {first_state["wandb"]["id"]} and len(runs) == 2
    assert list(runs[0].tags) == ["chest", "site=a"] and runs[0].project == "meddino"
    assert [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in history_rows if "loss" in r] == losses
    assert [(r["step"], r["knn_top1"]) for r in history_rows if "knn_top1" in r] == knn
    assert any(r.get("pretrain/pca/_type") == "image-file" for r in history_rows)
    assert any(r.get("pretrain/knn_curve/_type") == "image-file" for r in history_rows)
    assert exits == [0, 0]


def test_an_eval_verb_tracks_its_folds_and_results(tmp_path):
    pytest.importorskip("mlflow")
    root = make_cholec(tmp_path / "cholec", videos=3, frames=2)
    out = tmp_path / "seg"
    code = main(["eval", "seg", "-c", "seg_tiny", "data.layout=cholecseg8k", f"data.root={root}", "data.folds=3",
                 "data.run_folds=[0,1]", "train.epochs=2", "train.max_steps_per_epoch=1", f"out={out}",
                 "log.backends=[tensorboard,mlflow]", "log.offline=true", "log.run_name=seg-linear"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())["metrics"]
    tb = _events(out / "tensorboard")
    scalars = set(tb.Tags()["scalars"])
    # each fold's curves apart (its steps restart), its test metrics, and results.json's metrics at the end
    assert {"fold0/train_loss", "fold0/val_dice", "fold1/train_loss", "fold1/test_dice"} <= scalars
    assert "fold" not in scalars and "fold0/fold" not in scalars
    assert [e.step for e in tb.Scalars("fold1/train_loss")] == [1, 2]
    (dice,) = tb.Scalars("results/dice.mean")
    assert dice.value == pytest.approx(results["dice"]["mean"])
    assert "results/dice.std" in scalars
    client, run = _mlflow_run(out)
    assert run.info.run_name == "seg-linear" and run.info.status == "FINISHED"
    assert run.data.params["head"] == "linear" and run.data.params["data.run_folds"] == "[0, 1]"
    assert run.data.metrics["results/dice.mean"] == pytest.approx(results["dice"]["mean"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "fold0/val_dice")] == [1, 2]


def test_only_rank_0_tracks(monkeypatch, tmp_path):
    cfg = load_config(VizConfig, None, ["log.backends=[tensorboard]"])
    monkeypatch.setenv("RANK", "1")
    run = RunDir(tmp_path / "r1", cfg)
    run.log(1, loss=1.0)
    run.close()
    assert run.tracker is None and not (tmp_path / "r1" / "tensorboard").exists()
    assert not (tmp_path / "r1" / "metrics.jsonl").exists()
    monkeypatch.setenv("RANK", "0")
    run = RunDir(tmp_path / "r0", cfg)
    run.log(1, loss=1.0)
    run.close()
    assert [e.value for e in _events(tmp_path / "r0" / "tensorboard").Scalars("loss")] == [1.0]


@pytest.mark.slow
def test_under_torchrun_one_tracked_run_is_written(tmp_path):
    import os
    import subprocess

    pytest.importorskip("mlflow")
    images = make_images(tmp_path / "imgs")
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "meddino",
           "pretrain", "--config", "dinov1_tiny", f"data.path={images}", f"out={out}", "data.batch_size=4",
           "train.iterations=2", "train.log_every=1", "log.backends=[tensorboard,mlflow]", "log.offline=true"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [e.step for e in _events(out / "tensorboard").Scalars("loss")] == [1, 2]
    client, run = _mlflow_run(out)
    assert len(client.search_runs([run.info.experiment_id])) == 1 and run.info.status == "FINISHED"


def test_a_tracker_failing_mid_run_is_dropped_with_one_warning(capsys):
    class Broken:
        name = "mlflow"
        closed = None

        def scalars(self, *args):
            raise ConnectionError("tracking server went away")

        def close(self, failed):
            Broken.closed = failed

    tracker = Tracker([Broken()])
    tracker.scalars(1, {"loss": 1.0})
    tracker.scalars(2, {"loss": 0.5})  # nothing left to fail
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["meddino: warning: log.backends mlflow: tracking server went away; it logs nothing more in "
                   "this run (metrics.jsonl has every row)"]
    assert tracker.backends == [] and Broken.closed is True


def test_profile_tracks_its_measurements_and_its_json(tmp_path):
    pytest.importorskip("mlflow")
    out = tmp_path / "prof"
    code = main(["profile", "backbone=random:dinov2_tiny", "head=backbone,unet", "img_size=32", "repeats=2",
                 "warmup=0", f"out={out}", "log.backends=[tensorboard,mlflow]", "log.offline=true"])
    assert code == 0
    rows = {r["head"]: r for r in json.loads((out / "profile.json").read_text())["rows"]}
    tb = _events(out / "tensorboard")
    (latency,) = tb.Scalars("backbone/latency_ms_median")
    assert latency.step == 0 and latency.value == pytest.approx(rows["backbone"]["latency_ms_median"], rel=1e-6)
    assert {"unet/fps", "unet/head_params_m", "backbone/params_m"} <= set(tb.Tags()["scalars"])
    client, run = _mlflow_run(out)
    assert run.info.status == "FINISHED" and run.data.params["head"] == "backbone,unet"
    assert run.data.metrics["unet/fps"] == pytest.approx(rows["unet"]["fps"])
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["profile.json"]
    (row,) = read_metrics(out)  # metrics.jsonl: the same numbers in one row at step 0
    assert row["step"] == 0 and row["unet/latency_ms_p95"] == pytest.approx(rows["unet"]["latency_ms_p95"])


def test_profile_metric_names_are_head_then_runtime_in_what_mlflow_accepts():
    from meddino.profile.run import tracked_numbers

    rows = [{"head": "seg (unet)", "runtime": "onnxruntime", "fps": 12.5, "latency_ms_median": 80.0, "batch_size": 1},
            {"head": "pretraining step", "images_per_s": 3.0, "max_batch": "n/a", "note": "CPU"},
            {"head": "eomt", "note": "skipped: no EoMT"}]
    assert tracked_numbers(rows) == {"seg_unet/onnxruntime/fps": 12.5, "seg_unet/onnxruntime/latency_ms_median": 80.0,
                                     "pretraining_step/images_per_s": 3.0}


def test_the_demo_hands_its_log_block_to_every_step_that_has_one(monkeypatch, tmp_path):
    import meddino.demo as demo

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log = LogConfig(backends=["tensorboard", "mlflow"], experiment="demo-exp", run_name="trial", tags=["site=a"])
    values = demo.step_log_values(log, tmp_path, "knn random init")
    assert values["log.run_name"] == "trial knn random init" and values["log.tags"] == ["site=a", "demo"]
    assert values["log.backends"] == ["jsonl", "tensorboard", "mlflow"] and values["log.experiment"] == "demo-exp"
    assert values["log.tracking_uri"] == str((tmp_path / "mlruns").resolve())  # one store for every step
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert demo.step_log_values(log, tmp_path, "pca")["log.tracking_uri"] is None  # the user's server ...
    offline = log.model_copy(update={"offline": True})
    assert demo.step_log_values(offline, tmp_path, "pca")["log.tracking_uri"] == str((tmp_path / "mlruns").resolve())
    plain = demo.step_log_values(LogConfig(backends=["tensorboard"]), tmp_path, "pca")
    assert plain["log.run_name"] == "pca" and plain["log.tracking_uri"] is None  # ... and no store without MLflow

    calls = []
    monkeypatch.setattr(demo, "run_verb", lambda verb, recipe, overrides, values, force: calls.append((verb.path, values)) or 0)
    demo._run("eval knn", "k=1", recipe="knn_tiny", log=values, manifest="m.csv")
    demo._run("data split", "k=3", log=values, manifest="m.csv")  # its config has no log block
    assert calls[0] == ("eval knn", {**values, "manifest": "m.csv"})
    assert calls[1] == ("data split", {"manifest": "m.csv"})
    # and the values are what the step's schema takes
    cfg = load_config(VizConfig, None, [], values={**values, "images": ["a.png"], "backbones": ["random:dinov2_tiny"]})
    assert cfg.log.run_name == "trial knn random init" and cfg.log.trackers == ["tensorboard", "mlflow"]
