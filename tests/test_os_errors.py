"""An OS error on a path the user chose (not a folder, disk full, a file-size limit) is one line naming
the path, exit code 2, and a failed checkpoint write keeps the previous checkpoint intact."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import torch

from meddino.models import build_backbone, export_backbone


def _one_line(res) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-1500:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meddino: error:"), res.stderr[-1500:]
    return lines[0]


def test_out_under_a_file_is_one_line(tmp_path, cli):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    runs = tmp_path / "runs"
    runs.mkdir()
    line = _one_line(cli("report", runs, f"out={blocker / 'report'}"))
    assert str(blocker) in line and "Not a directory" in line
    src = export_backbone(build_backbone("dinov2_tiny"), tmp_path / "tiny")
    line = _one_line(cli("convert", src, blocker / "sub" / "converted"))
    assert str(blocker) in line
    line = _one_line(cli("pretrain", "--config", "dinov2_tiny", f"data.path={runs}", f"out={blocker / 'run'}"))
    assert str(blocker) in line


def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def test_a_file_size_limit_during_an_export_is_one_line_and_leaves_nothing(tmp_path):
    src = export_backbone(build_backbone("dinov2_tiny"), tmp_path / "tiny")  # ~0.9 MB of weights
    res = subprocess.run([sys.executable, "-m", "meddino", "convert", str(src), str(tmp_path / "out" / "big")],
                         capture_output=True, text=True, env=dict(os.environ), preexec_fn=_limit_file_size(100_000))
    assert "File too large" in _one_line(res)
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # no half-written file, no temp file


_SAVE_TWICE = """
import sys, torch
from meddino.errors import CheckpointError
from meddino.pretrain.checkpoint import save_checkpoint
folder = sys.argv[1]
save_checkpoint(folder, 1, {"iteration": 1, "student": {"w": torch.ones(10)}}, keep_last=2)
try:
    save_checkpoint(folder, 2, {"iteration": 2, "student": {"w": torch.ones(200_000)}}, keep_last=2)
except CheckpointError as exc:
    print(exc)
"""


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    res = subprocess.run([sys.executable, "-c", _SAVE_TWICE, str(tmp_path)], capture_output=True, text=True,
                         env=dict(os.environ), preexec_fn=_limit_file_size(200_000), check=True)
    message = res.stdout.strip()
    assert message.startswith(f"cannot write checkpoint {tmp_path / 'checkpoint_00000002.pt'}"), message
    assert f"the previous checkpoint is intact: {tmp_path / 'checkpoint_00000001.pt'}" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_00000001.pt"]
    state = torch.load(tmp_path / "checkpoint_00000001.pt", weights_only=True)
    assert state["iteration"] == 1 and torch.equal(state["student"]["w"], torch.ones(10))
