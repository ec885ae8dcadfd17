"""Bad segmentation input ends with one line and exit code 2 (real CLI)."""

from __future__ import annotations

import numpy as np
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


def test_a_patient_on_two_sides_is_refused(cli, tmp_path):
    """A manifest whose patient p0 (img0, img1) is in train and test, or in two folds, would train on test
    images: refused in one line naming the patient, the sides, the column and the rows, before any mask is
    read and before a run folder exists."""
    csv = make_manifest(tmp_path / "m", n=4)  # patients p0 (img0, img1) and p1 (img2, img3)
    lines = csv.read_text().strip().splitlines()

    def run(column, values):
        csv.write_text("\n".join([f"{lines[0]},{column}"] + [f"{ln},{v}" for ln, v in zip(lines[1:], values)]) + "\n")
        return cli("eval", "seg", "-c", "seg_tiny", f"data.manifest={csv}", "data.classes=[bg,a,b]",
                   f"data.{column}_column={column}", f"out={tmp_path / 'o'}")

    _one_line_error(run("split", ["train", "test", "train", "train"]),
                    f"patient p0 is in both train and test (data.split_column 'split' in {csv}: "
                    "img0.png in train, img1.png in test)")
    assert not (tmp_path / "o").exists()
    _one_line_error(run("fold", ["0", "1", "1", "1"]),
                    f"patient p0 is in both fold 0 and fold 1 (data.fold_column 'fold' in {csv}: "
                    "img0.png in fold 0, img1.png in fold 1)")
    assert not (tmp_path / "o").exists()


def test_recipes_set_their_metric_policy_and_a_wrong_one_is_one_line(cli, tmp_path):
    """Seed 000's recipe scores as seed 000's code does; the others keep the monai definitions."""
    from meddino.config import list_recipes, load_config
    from meddino.tasks.seg.config import SegConfig

    data = ["data.manifest=pairs.csv", "data.root=frames"]  # whichever the recipe's layout needs
    policies = {name: load_config(SegConfig, name, data, group="seg").metrics.policy
                for name, _ in list_recipes()["seg"]}
    assert policies == {"cholecseg8k_eomt": "seed000", "seed001_linear": "monai", "seed001_unet": "monai",
                        "seg_tiny": "monai"}
    r = cli("eval", "seg", "-c", "seg_tiny", "data.layout=cholecseg8k", f"data.root={tmp_path}",
            "metrics.policy=medpy", f"out={tmp_path / 'o'}")
    _one_line_error(r, "metrics.policy")


def test_eomt_annealing_longer_than_the_run_is_refused_before_any_work(cli, tmp_path):
    """EoMT's kept model must be one trained past its mask annealing: an annealing the run cannot finish is
    one line naming both lengths, before a run folder exists; so are two annealing lengths at once."""
    root = make_cholec(tmp_path / "c", videos=3, frames=2)
    base = ["eval", "seg", "-c", "seg_tiny", "data.layout=cholecseg8k", f"data.root={root}", "data.folds=3",
            "data.val_fraction=0.5", "train.epochs=2", "head=eomt", f"out={tmp_path / 'o'}"]
    # fold 0 trains on one video (2 frames): one batch of 4 per epoch
    _one_line_error(cli(*base, "eomt.anneal_steps=100"),
                    "fold 0: EoMT mask annealing needs 100 optimiser steps (eomt.anneal_steps=100), the run has 2 "
                    "(train.epochs=2 x 1 per epoch)")
    assert not (tmp_path / "o").exists()
    _one_line_error(cli(*base, "eomt.anneal_epochs=3"), "eomt.anneal_epochs=3 is longer than the run (train.epochs=2)")
    _one_line_error(cli(*base, "eomt.anneal_epochs=1", "eomt.anneal_steps=1"),
                    "eomt.anneal_steps and eomt.anneal_epochs exclude each other")
    assert not (tmp_path / "o").exists()
