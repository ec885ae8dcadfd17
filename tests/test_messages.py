"""Refusals through the real CLI name the file and give the right reason, in one stderr line (issue 12 §3).

Each case ends with exit code 2 and exactly one stderr line ``meddino: error: ...``: no traceback, no
torch warning, no message that blames the batch size for an unreadable folder.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from meddino.errors import CheckpointError
from meddino.models.checkpoints.read import read_checkpoint

TINY = ("train.iterations=2", "data.batch_size=2", "data.num_workers=0")


class _Payload:
    """Unpickling it would run a shell command (touch the marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_error(res, *needles: str) -> str:
    """The single stderr line of a refusal, checked for exit code 2 and every needle."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("meddino: error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _images(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _pretrain(cli, tmp_path: Path, *args: str):
    return cli("pretrain", "--config", "dinov2_tiny", f"out={tmp_path / 'run'}", *TINY, *args)


# ------------------------------------------------------------------------------------------ checkpoints


def test_random_bytes_are_not_a_checkpoint(tmp_path, cli):
    path = tmp_path / "x.pth"
    path.write_bytes(random.Random(0).randbytes(4096))
    line = _one_error(cli("convert", path, tmp_path / "out"), str(path),
                      "not a readable checkpoint (neither a torch zip/pickle nor safetensors)")
    assert "could run code" not in line
    _one_error(_pretrain(cli, tmp_path, f"data.path={_images(tmp_path / 'imgs')}", f"init={path}"), str(path),
               "neither a torch zip/pickle nor safetensors")


def test_random_bytes_never_pass_for_a_pickle(tmp_path):
    """torch's weights-only unpickler raises UnpicklingError, IndexError, KeyError... on junk: one reason."""
    rng = random.Random(1)
    path = tmp_path / "junk.pth"
    for _ in range(100):
        path.write_bytes(rng.randbytes(rng.choice([64, 4096])))
        with pytest.raises(CheckpointError, match=r"neither a torch zip/pickle nor safetensors"):
            read_checkpoint(path)


def test_malicious_pickle_is_refused_in_one_line(tmp_path, cli):
    """A raw pickle (protocol 4: torch warns about it) whose reduce calls os.system: the refusal names
    the call, torch's warning is not printed, and nothing runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {"x": torch.zeros(1)}, "evil": _Payload(str(marker))}, fh, protocol=4)
    line = _one_error(cli("convert", path, tmp_path / "out"), str(path), "refused to unpickle",
                      "could run code", "system")
    assert "Warning" not in line and not marker.exists()
    torch.save({"evil": _Payload(str(marker))}, tmp_path / "evil_zip.pth")  # the torch zip format
    _one_error(cli("convert", tmp_path / "evil_zip.pth", tmp_path / "out2"), "evil_zip.pth", "refused to unpickle")
    assert not marker.exists()


def test_cnn_state_dict_as_init_names_the_file(tmp_path, cli):
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    _one_error(_pretrain(cli, tmp_path, f"data.path={_images(tmp_path / 'imgs')}", f"init={path}"), str(path),
               "not a ViT checkpoint: a CNN state dict", "conv1.weight")


def test_safetensors_with_wrong_keys_names_the_file(tmp_path, cli):
    path = tmp_path / "foo.safetensors"
    save_file({"foo": torch.zeros(3)}, str(path))
    _one_error(cli("convert", path, tmp_path / "out"), str(path), "unrecognised checkpoint layout", "keys: foo")


# ------------------------------------------------------------------------------------------ pretraining data


@pytest.mark.parametrize("content", [b"random", b"dicm"], ids=["random-bytes", "dicm-preamble"])
def test_folder_of_one_corrupt_dicom_has_no_readable_image(tmp_path, cli, content):
    """Not '1 inputs but a global batch of 2': the folder's only file is unreadable, and why."""
    folder = tmp_path / "dicom"
    folder.mkdir()
    junk = random.Random(2).randbytes(200)
    (folder / "x.dcm").write_bytes(junk if content == b"random" else b"\0" * 128 + b"DICM" + junk)
    line = _one_error(_pretrain(cli, tmp_path, f"data.path={folder}"), f"{folder}: no readable images",
                      "1 file skipped", "x.dcm", "no decodable pixel data")
    assert "global batch" not in line


def test_batch_of_garbage_pngs_names_the_files(tmp_path, cli):
    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = random.Random(3)
    for i in range(12):
        (folder / f"img{i:02d}.png").write_bytes(rng.randbytes(500))
    _one_error(_pretrain(cli, tmp_path, f"data.path={folder}"),
               "every image of the batch at iteration 0 was unreadable", "2 files skipped", ".png",
               "cannot identify image file")


def test_one_readable_image_and_one_corrupt_dicom_names_the_file_not_koleo(tmp_path, cli):
    """A batch of 2 with one unreadable file leaves 1 image, too few for KoLeo: the line names the file."""
    folder = _images(tmp_path / "mixed", n=1)
    (folder / "y.dcm").write_bytes(b"\0" * 128 + b"DICM" + random.Random(4).randbytes(200))
    line = _one_error(_pretrain(cli, tmp_path, f"data.path={folder}", "data.batch_size=2"),
                      "1 readable image left in the batch at iteration 0 and KoLeo needs at least 2",
                      "1 file skipped", "y.dcm", "method.koleo_weight=0")
    assert "koleo_loss" not in line
