"""What a run leaves on disk: readable by colleagues (the umask, not 0600), byte-reproducible exports, no
stale temp files and no exports orphaned from their checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from meddino.pretrain import checkpoint as ckpt
from meddino.runlog import atomic_path, atomic_write


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_get_the_umask_not_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "a.json", "w") as fh:
            fh.write("{}")
        with atomic_path(tmp_path / "b.pt") as tmp:
            torch.save({"x": 1}, tmp)
        with open(tmp_path / "plain", "w") as fh:  # what open() gives: the reference
            fh.write("")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "b.pt") == _mode(tmp_path / "plain") == 0o666 & ~umask


_EXPORT = """
import sys, torch
from meddino.models import build_backbone, export_backbone
torch.manual_seed(0)
export_backbone(build_backbone("dinov2_tiny"), sys.argv[1])
"""


def test_exports_are_byte_reproducible_across_processes(tmp_path):
    """safetensors writes its metadata from a hash map whose order changes per process: the export sorts it."""
    digests = set()
    for i in range(2):
        subprocess.run([sys.executable, "-c", _EXPORT, str(tmp_path / f"run{i}" / "teacher_backbone")], check=True,
                       env={**os.environ, "PYTHONHASHSEED": str(i)})
        digests.add(hashlib.md5((tmp_path / f"run{i}" / "teacher_backbone.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    data = (tmp_path / "run0" / "teacher_backbone.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == ["arch", "format"]
    assert n % 8 == 0


def _touch(path):
    path.write_bytes(b"")
    return path


def test_prune_takes_exports_with_their_checkpoint(tmp_path):
    for it in (1, 2, 3):
        torch.save({"iteration": it}, ckpt.checkpoint_path(tmp_path, it))
    for it in (1, 2, 3, 7):  # 7: an export whose checkpoint never completed
        _touch(ckpt.export_path(tmp_path, it))
        _touch(ckpt.export_path(tmp_path, it).with_suffix(".json"))
    ckpt.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_00000002.pt", "checkpoint_00000003.pt",
        "teacher_backbone_00000002.json", "teacher_backbone_00000002.safetensors",
        "teacher_backbone_00000003.json", "teacher_backbone_00000003.safetensors",
    ]


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path):
    run, ck = tmp_path, tmp_path / "checkpoints"
    ck.mkdir()
    stale = [_touch(ck / ".checkpoint_00000010.pt.k2j3h4g5.pt"),
             _touch(ck / ".teacher_backbone_00000010.safetensors.ab_cd123.safetensors"),
             _touch(ck / ".teacher_backbone_00000010.json.zz9y8x7w.tmp"),
             _touch(run / ".metrics.jsonl.abcdefgh.tmp")]
    kept = [_touch(ck / "checkpoint_00000010.pt"), _touch(run / ".my_notes.txt"), _touch(run / "metrics.jsonl"),
            _touch(run / ".checkpoint_backup.pt")]
    assert sorted(ckpt.remove_stale_temp_files(run, ck)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
