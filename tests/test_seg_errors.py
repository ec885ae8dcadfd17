"""Bad segmentation input ends with one line and exit code 2 (real CLI)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_seg_data import make_cholec, make_manifest


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("meddino: error:"), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_size_mismatch(cli, tmp_path):
    csv = make_manifest(tmp_path / "m", n=4)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "m" / "mask2.png")
    r = cli("eval", "seg", "-c", "seg_tiny", f"data.manifest={csv}", "data.classes=[bg,a,b]", f"out={tmp_path / 'o'}")
    _one_line_error(r, "mask2.png", "differs from its image")


def test_unknown_colour(cli, tmp_path):
    root = make_cholec(tmp_path / "c", videos=2, frames=1)
    mask = sorted(root.rglob("*_watershed_mask.png"))[1]
    arr = np.asarray(Image.open(mask)).copy()
    arr[3, 3] = (77, 77, 77)
    Image.fromarray(arr).save(mask)
    r = cli("eval", "seg", "-c", "seg_tiny", "data.layout=cholecseg8k", f"data.root={root}", f"out={tmp_path / 'o'}")
    _one_line_error(r, mask.name, "unknown colour (77, 77, 77)")


def test_empty_dataset(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("eval", "seg", "-c", "seg_tiny", "data.layout=msd", f"data.root={tmp_path / 'empty'}",
            "data.classes=[bg,x]", f"out={tmp_path / 'o'}")
    _one_line_error(r, "imagesTr")
    (tmp_path / "empty" / "imagesTr").mkdir()
    (tmp_path / "empty" / "labelsTr").mkdir()
    r = cli("eval", "seg", "-c", "seg_tiny", "data.layout=msd", f"data.root={tmp_path / 'empty'}",
            "data.classes=[bg,x]", f"out={tmp_path / 'o'}")
    _one_line_error(r, "no image/mask pairs found")


@pytest.mark.parametrize("column, values, sides", [
    ("split", ["train", "test", "train", "train"], ("train", "test")),
    ("fold", ["0", "1", "1", "1"], ("fold 0", "fold 1")),
], ids=["split_column", "fold_column"])
def test_a_patient_on_two_sides_is_refused(cli, tmp_path, column, values, sides):
    """A manifest whose patient p0 (img0, img1) is in train and test, or in two folds, would train on test
    images: refused in one line naming the patient, the sides, the column and the rows, before any mask is
    read and before a run folder exists."""
    csv = make_manifest(tmp_path / "m", n=4)  # patients p0 (img0, img1) and p1 (img2, img3)
    lines = csv.read_text().strip().splitlines()
    csv.write_text("\n".join([f"{lines[0]},{column}"] + [f"{ln},{v}" for ln, v in zip(lines[1:], values)]) + "\n")
    r = cli("eval", "seg", "-c", "seg_tiny", f"data.manifest={csv}", "data.classes=[bg,a,b]",
            f"data.{column}_column={column}", f"out={tmp_path / 'o'}")
    _one_line_error(r, f"patient p0 is in both {sides[0]} and {sides[1]} (data.{column}_column '{column}' in {csv}: "
                       f"img0.png in {sides[0]}, img1.png in {sides[1]})")
    assert not (tmp_path / "o").exists()
