"""Sharded (torch.distributed.checkpoint) pretraining checkpoints on one process (``train.checkpoint_format=
sharded``): bit-identical resume, keep_last and interrupted writes, ``meddino convert CKPT.dcp``, and the
one-line refusals of an incomplete or damaged folder. The same format under FSDP2 with 2 gloo processes is
in tests/test_pretrain_distributed.py; the SLURM example of docs/distributed.md is checked here too."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from meddino.cli import main
from meddino.errors import CheckpointError
from meddino.models.checkpoints.dcp import MARKER, read_tensors
from meddino.pretrain.checkpoint import latest_checkpoint, list_checkpoints, remove_stale_temp_files, resume_path
from meddino.pretrain.engine import run_pretrain
from meddino.runlog import read_metrics
from test_pretrain_engine import config, make_images

ROOT = Path(__file__).resolve().parents[1]
SHARDED = ("train.checkpoint_format=sharded", "data.num_workers=0")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("sharded_images") / "imgs")


@pytest.fixture(scope="module")
def run(images, tmp_path_factory) -> Path:
    """A 6-iteration DINOv1 run checkpointed every 2 iterations, keeping the last 2."""
    out = tmp_path_factory.mktemp("sharded_run") / "run"
    run_pretrain(config("dinov1_tiny", images, out, "train.iterations=6", "train.checkpoint_every=2",
                        "train.keep_last=2", *SHARDED))
    return out


def _sections(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {s: read_tensors(path, s) for s in ("student", "teacher", "optimizer")}


@pytest.mark.parametrize("recipe, extra", [
    ("dinov1_tiny", ["optim.freeze_last_layer_epochs=0.6"]),  # prototypes without AdamW state at 4
    ("dinov2_tiny", []),  # the shared DINO/iBOT head (registered twice)
    ("dinov3_tiny", ["method.gram.enabled=true", "method.gram.teacher=random", "method.gram.refresh_every=3"]),
])
def test_resume_from_a_sharded_checkpoint_is_bit_identical(recipe, extra, images, tmp_path):
    """Straight 8 iterations vs 4 + resume + 4. DINOv1: the prototypes stay frozen for 6 iterations (0.6
    of the recipe's 10-iteration epochs), so the checkpoint at 4 has no AdamW state for them and the
    resumed run must not invent one; DINOv3: the Gram teacher, refreshed after iterations 3 and 6."""
    common = ["train.iterations=8", "train.checkpoint_every=4", *extra, *SHARDED]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_pretrain(config(recipe, images, straight, *common))
    run_pretrain(config(recipe, images, resumed, *common, "train.stop_at=4"))
    at4 = resumed / "checkpoints" / "checkpoint_00000004.dcp"
    assert [p for _, p in list_checkpoints(resumed / "checkpoints")] == [at4]
    marker = json.loads((at4 / MARKER).read_text())
    if recipe == "dinov1_tiny":
        assert marker["optimizer_params"] and not [n for n in marker["optimizer_params"] if "last_layer" in n]
    run_pretrain(config(recipe, images, resumed, *common, "resume=auto"))
    sections = ["student", "teacher", "optimizer"] + (["gram_teacher"] if recipe == "dinov3_tiny" else [])
    for section in sections:
        a, b = (read_tensors(p / "checkpoints" / "checkpoint_00000008.dcp", section) for p in (straight, resumed))
        assert a.keys() == b.keys() and a, section
        for k in a:
            assert torch.equal(a[k], b[k]), (section, k)
        if section == "student":
            moved = read_tensors(at4, "student")
            assert max((a[k] - moved[k]).abs().max().item() for k in moved) > 1e-6  # it trained on
        if section == "optimizer" and recipe == "dinov1_tiny":
            assert any("last_layer" in k for k in a)  # trained after iteration 6, in both runs
    if recipe == "dinov3_tiny":
        assert marker["gram_refreshes"] == 1
        assert json.loads((resumed / "checkpoints" / "checkpoint_00000008.dcp" / MARKER).read_text())["gram_refreshes"] == 2
    small = [torch.load(p / "checkpoints" / "checkpoint_00000008.dcp" / "state.pt", weights_only=True)
             for p in (straight, resumed)]
    assert torch.equal(small[0]["center"], small[1]["center"])
    assert torch.equal(small[0]["ibot_center"], small[1]["ibot_center"])
    la = {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}
    lb = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
    assert la[8] == lb[8]


def test_keep_last_prunes_folders_and_interrupted_writes_are_never_resumed(run, tmp_path):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(run / "checkpoints", ckpts)
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["checkpoint_00000004.dcp", "checkpoint_00000006.dcp",
                     "teacher_backbone_00000004.json", "teacher_backbone_00000004.safetensors",
                     "teacher_backbone_00000006.json", "teacher_backbone_00000006.safetensors"]
    # a killed write: its temp folder, and a folder whose marker never came
    shutil.copytree(ckpts / "checkpoint_00000006.dcp", ckpts / ".checkpoint_00000008.dcp.tmp")
    shutil.copytree(ckpts / "checkpoint_00000006.dcp", ckpts / "checkpoint_00000010.dcp")
    (ckpts / "checkpoint_00000010.dcp" / MARKER).unlink()
    assert latest_checkpoint(ckpts) == ckpts / "checkpoint_00000006.dcp"
    assert resume_path("auto", ckpts, tmp_path) == ckpts / "checkpoint_00000006.dcp"
    removed = remove_stale_temp_files(ckpts)
    assert sorted(p.name for p in removed) == [".checkpoint_00000008.dcp.tmp", "checkpoint_00000010.dcp"]
    assert sorted(p.name for p in ckpts.iterdir()) == names


def test_convert_of_a_sharded_checkpoint_is_the_runs_own_export(run, tmp_path, capsys):
    ckpt = run / "checkpoints" / "checkpoint_00000006.dcp"
    assert main(["convert", str(ckpt), str(tmp_path / "teacher")]) == 0
    ours = (tmp_path / "teacher.safetensors").read_bytes()
    assert ours == (run / "checkpoints" / "teacher_backbone_00000006.safetensors").read_bytes()
    assert ours == (run / "teacher_backbone.safetensors").read_bytes()  # the end of the run is iteration 6
    sidecar = json.loads((tmp_path / "teacher.json").read_text())
    assert sidecar.pop("weights") == "teacher.safetensors"
    run_sidecar = json.loads((run / "teacher_backbone.json").read_text())
    assert run_sidecar.pop("weights") == "teacher_backbone.safetensors" and sidecar == run_sidecar
    assert "meddino sharded checkpoint" in capsys.readouterr().out
    from meddino.models import load_backbone

    student = load_backbone(ckpt, key="student")
    saved = read_tensors(ckpt, "student", "backbone.vit.")
    assert {f"backbone.vit.{k}" for k in student.vit.state_dict()} == set(saved)
    for k, v in student.vit.state_dict().items():
        assert torch.equal(v, saved[f"backbone.vit.{k}"]), k


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _damage(folder: Path, how: str, tmp_path: Path) -> None:
    if how == "no marker":
        (folder / MARKER).unlink()
    elif how == "truncated shard":
        shard = folder / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif how == "garbled shard":  # its length kept: only reading it tells
        shard = folder / "__0_0.distcp"
        shard.write_bytes(b"\0" * shard.stat().st_size)
    elif how == "missing shard":
        (folder / "__0_0.distcp").unlink()
    elif how == "code in the metadata":
        (folder / ".metadata").write_bytes(pickle.dumps(_Payload(str(tmp_path / "ran"))))


@pytest.mark.parametrize("how", ["no marker", "truncated shard", "garbled shard", "missing shard",
                                 "code in the metadata"])
def test_an_incomplete_or_damaged_sharded_checkpoint_is_one_line(how, run, tmp_path, capsys):
    says = {
        "no marker": "incomplete sharded checkpoint (no meddino_checkpoint.json: its write was interrupted)",
        "truncated shard": "damaged sharded checkpoint (shard file __0_0.distcp has",
        "garbled shard": "cannot read the sharded checkpoint (rank 0: ",
        "missing shard": "damaged sharded checkpoint (shard file __0_0.distcp is missing)",
        "code in the metadata": "refused to unpickle posix.system",
    }[how]
    folder = tmp_path / "checkpoint_00000006.dcp"
    shutil.copytree(run / "checkpoints" / "checkpoint_00000006.dcp", folder)
    _damage(folder, how, tmp_path)
    capsys.readouterr()
    assert main(["convert", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"meddino: error: {folder}: ") and says in err[0], err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out.safetensors").exists()


def test_resume_from_a_damaged_or_foreign_sharded_checkpoint_is_refused(run, images, tmp_path):
    folder = tmp_path / "checkpoint_00000006.dcp"
    shutil.copytree(run / "checkpoints" / "checkpoint_00000006.dcp", folder)
    common = ["train.iterations=8", f"resume={folder}", *SHARDED]
    # another head width: the checkpoint's tensors do not fit (named, no silent partial load)
    wrong = re.escape("does not match this config (other shape or dtype ['student.dino_head")
    with pytest.raises(CheckpointError, match=wrong):
        run_pretrain(config("dinov1_tiny", images, tmp_path / "wide", *common, "model.head.out_dim=128"))
    with pytest.raises(CheckpointError, match="was written by a v1 run, not v2"):
        run_pretrain(config("dinov2_tiny", images, tmp_path / "v2", *common))
    (folder / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(CheckpointError, match="shard file __0_0.distcp has 0 bytes"):
        run_pretrain(config("dinov1_tiny", images, tmp_path / "cut", *common))


def test_the_slurm_example_is_valid_bash_and_runs_meddino_pretrain():
    script = ROOT / "examples" / "slurm_pretrain.sbatch"
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0
    assert text.startswith("#!/bin/bash\n") and "#SBATCH --nodes=" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "scontrol show hostnames" in text and "srun" in text and "--rdzv-backend=c10d" in text
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text
    assert "-m meddino pretrain" in text and "resume=auto" in text and "--max-restarts" in text
    from meddino.cli import build_parser

    assert "pretrain" in build_parser()._subparsers._group_actions[0].choices  # the verb it runs exists
    assert (ROOT / "docs" / "distributed.md").read_text().count("examples/slurm_pretrain.sbatch") >= 1


def test_a_failed_sharded_write_is_one_line_and_keeps_the_previous_checkpoint(images, tmp_path, monkeypatch):
    """A rank's writer fails inside DCP (which wraps it in its CheckpointException, a BaseException): one
    line naming the rank's own reason and the previous checkpoint; the temp folder goes at the next start."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    real, calls = FileSystemWriter.write_data, []

    def write_data(self, *args, **kwargs):
        calls.append(self.path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FileSystemWriter, "write_data", write_data)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError) as err:
        run_pretrain(config("dinov1_tiny", images, out, "train.iterations=4", "train.checkpoint_every=2", *SHARDED))
    ckpts = out / "checkpoints"
    assert str(err.value) == (f"cannot write checkpoint {ckpts / 'checkpoint_00000004.dcp'} (rank 0: No space left "
                              "on device; is the disk full or a file-size limit set?); the previous checkpoint is "
                              f"intact: {ckpts / 'checkpoint_00000002.dcp'}")
    assert [p.name for _, p in list_checkpoints(ckpts)] == ["checkpoint_00000002.dcp"]
    assert (ckpts / ".checkpoint_00000004.dcp.tmp").is_dir()
    assert remove_stale_temp_files(ckpts) == [ckpts / ".checkpoint_00000004.dcp.tmp"]


def test_a_run_of_full_checkpoints_continues_in_the_sharded_format(images, tmp_path):
    """train.checkpoint_format=auto became sharded under FSDP2: a run that wrote .pt checkpoints resumes from
    them (resume=auto takes the newest of either format) and goes on writing folders, exactly."""
    from meddino.pretrain.checkpoint import load_checkpoint

    common = ["train.iterations=8", "train.checkpoint_every=4", "data.num_workers=0"]
    straight, mixed = tmp_path / "straight", tmp_path / "mixed"
    run_pretrain(config("dinov1_tiny", images, straight, *common))
    run_pretrain(config("dinov1_tiny", images, mixed, *common, "train.stop_at=4"))
    run_pretrain(config("dinov1_tiny", images, mixed, *common, "resume=auto", "train.checkpoint_format=sharded"))
    assert [p.name for _, p in list_checkpoints(mixed / "checkpoints")] == ["checkpoint_00000004.pt",
                                                                          "checkpoint_00000008.dcp"]
    a = load_checkpoint(straight / "checkpoints" / "checkpoint_00000008.pt")
    b = read_tensors(mixed / "checkpoints" / "checkpoint_00000008.dcp", "teacher")
    assert b.keys() == a["teacher"].keys() and all(torch.equal(a["teacher"][k], b[k]) for k in b)
