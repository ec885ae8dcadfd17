"""No silent overwrite: a verb's out= folder may be new, empty, or a folder this verb may rerun into;
anything else is one line and exit code 2 naming what is there, unless --force."""

from __future__ import annotations

import json

import pytest

from meddino.errors import UserError
from meddino.runlog import RUN_MARKER, claim_run_folder, complete_run_folder


def _pretrain_run(folder):
    folder.mkdir(parents=True)
    (folder / RUN_MARKER).write_text(json.dumps({"verb": "pretrain", "complete": True}))
    (folder / "config.yaml").write_text("the pretraining run's config\n")
    return folder


def test_new_empty_own_and_forced_folders(tmp_path):
    assert claim_run_folder(tmp_path / "new" / "run", "eval knn").is_dir()
    assert json.loads((tmp_path / "new" / "run" / RUN_MARKER).read_text()) == {"verb": "eval knn", "complete": False}
    (tmp_path / "empty").mkdir()
    claim_run_folder(tmp_path / "empty", "eval knn")
    claim_run_folder(tmp_path / "empty", "eval knn")  # the first attempt failed (not complete): try again
    complete_run_folder(tmp_path / "empty", "eval knn")
    with pytest.raises(UserError, match=r"already holds a `meddino eval knn` run; .*--force"):
        claim_run_folder(tmp_path / "empty", "eval knn")  # no rerun: a second kNN run needs --force
    claim_run_folder(tmp_path / "empty", "eval knn", force=True)
    report = claim_run_folder(tmp_path / "r", "report", rerun=True)
    complete_run_folder(report, "report")
    claim_run_folder(report, "report", rerun=True)  # a report refreshes its own folder


def test_other_runs_and_user_folders_are_refused_in_one_line(tmp_path):
    run = _pretrain_run(tmp_path / "pre")
    with pytest.raises(UserError) as info:
        claim_run_folder(run, "eval knn", rerun=True)
    assert "already holds a `meddino pretrain` run" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"resume=auto continues it"):
        claim_run_folder(run, "pretrain")
    claim_run_folder(run, "pretrain", rerun=True)  # resume=auto
    (run / RUN_MARKER).write_text(json.dumps({"verb": "pretrain", "complete": False}))  # killed mid-way
    with pytest.raises(UserError, match=r"already holds an unfinished `meddino pretrain` run \(resume=auto"):
        claim_run_folder(run, "pretrain", retry=False)  # its checkpoints: only resume= may continue them
    claim_run_folder(run, "pretrain", rerun=True, retry=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own notes\n")
    with pytest.raises(UserError, match=r"already holds config.yaml;"):
        claim_run_folder(mine, "pretrain", rerun=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"is a file, not a folder"):
        claim_run_folder(tmp_path / "file", "viz pca")
    assert (run / "config.yaml").read_text() == "the pretraining run's config\n"


def test_the_cli_refuses_before_any_work_and_force_overwrites(tmp_path, cli):
    profile = ["profile", "backbone=random:dinov2_tiny", "head=backbone", "img_size=32", "warmup=0",
               "repeats=1"]
    out = tmp_path / "prof"
    assert cli(*profile, f"out={out}").returncode == 0
    again = cli(*profile, f"out={out}")
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0, again.stderr
    assert "already holds a `meddino profile` run" in again.stderr
    assert cli(*profile, f"out={out}", "--force").returncode == 0
    bad = cli("profile", f"backbone={tmp_path / 'nowhere.pth'}", *profile[2:], f"out={tmp_path / 'fails'}")
    assert bad.returncode == 2 and "nowhere.pth" in bad.stderr  # a failed first attempt, after the claim ...
    assert not (tmp_path / "fails").exists()  # refused before writing anything: no folder left behind
    assert cli(*profile, f"out={tmp_path / 'fails'}").returncode == 0  # ... does not block the corrected one
    pre = _pretrain_run(tmp_path / "pre")
    res = cli("eval", "knn", "--config", "knn_tiny", "data.manifest=nowhere.csv", "backbone=random:dinov2_tiny",
              f"out={pre}")
    assert res.returncode == 2 and "already holds a `meddino pretrain` run" in res.stderr
    assert (pre / "config.yaml").read_text() == "the pretraining run's config\n"
    res = cli("pretrain", "--config", "dinov2_tiny", "data.path=nowhere", f"out={pre}")
    assert res.returncode == 2 and "resume=auto continues it" in res.stderr


def test_a_new_run_in_an_earlier_runs_folder_starts_its_metrics_empty(tmp_path):
    from test_pretrain_engine import config, make_images

    from meddino.cli import main
    from meddino.pretrain.engine import run_pretrain
    from meddino.runlog import read_metrics

    profile = ["profile", "backbone=random:dinov2_tiny", "head=backbone", "img_size=32", "warmup=0", "repeats=1"]
    out = tmp_path / "prof"
    assert main([*profile, f"out={out}"]) == 0
    assert main([*profile, f"out={out}", "--force"]) == 0
    assert len(read_metrics(out)) == 1  # the forced run's row only, not both runs' rows
    # pretraining: an attempt killed before its first checkpoint, then resume=auto starts afresh
    images = make_images(tmp_path / "imgs")
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / RUN_MARKER).write_text(json.dumps({"verb": "pretrain", "complete": False}))
    (pre / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 99.0}) + "\n" + json.dumps({"step": 3, "loss": 98.0}) + "\n")
    run_pretrain(config("dinov1_tiny", images, pre, "train.iterations=2", "train.log_every=1", "resume=auto"))
    rows = [r for r in read_metrics(pre) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] < 90 for r in rows)


def test_a_pretraining_run_that_crashed_after_a_checkpoint_continues_with_resume_auto(tmp_path, monkeypatch):
    """A first attempt that fails after writing (here an exception at iteration 3, as when a torchrun
    worker is lost) keeps its marker: the folder is an unfinished attempt that ``resume=auto`` continues
    (torchrun's --max-restarts reruns exactly that command); before, the failure removed the marker and
    the restart was refused as a folder of the user's own files."""
    from meddino.cli import main
    from meddino.pretrain import engine
    from test_pretrain_engine import make_images

    data = make_images(tmp_path / "imgs", n=8)
    out = tmp_path / "run"
    args = ["pretrain", "--config", "dinov1_tiny", f"data.path={data}", "data.batch_size=4", "train.iterations=4",
            "train.checkpoint_every=2", "data.num_workers=0", f"out={out}", "resume=auto"]
    step = engine.Trainer.train_step

    def crash(self, it, batch):
        if it == 3:
            raise RuntimeError("a worker went away")
        return step(self, it, batch)

    monkeypatch.setattr(engine.Trainer, "train_step", crash)
    with pytest.raises(RuntimeError, match="a worker went away"):
        main(args)
    assert json.loads((out / RUN_MARKER).read_text()) == {"verb": "pretrain", "complete": False, "recipe": "dinov1_tiny"}
    monkeypatch.setattr(engine.Trainer, "train_step", step)
    assert main(args) == 0
    assert json.loads((out / RUN_MARKER).read_text())["complete"] is True
    assert (out / "teacher_backbone.safetensors").is_file()
