"""End-to-end ``meddino eval seg`` / ``meddino predict seg`` on generated CholecSeg8k data (real CLI, subprocess).

Every head trains a few steps on one fold, writes results.json, the per-image per-class CSV, the model and
predicted masks; predict writes masks and overlays for a folder of frames."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from test_seg_data import make_cholec

pytestmark = pytest.mark.slow

TINY = ["-c", "seg_tiny", "data.run_folds=[0]", "train.epochs=1", "train.max_steps_per_epoch=2",
        "data.folds=3", "data.val_fraction=0.5"]


def _check_run(out, head, n_classes_reported, unit, policy="monai"):
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "segmentation" and res["protocol"] == head and res["level"] == "patient"
    assert res["hd95_unit"] == unit
    assert res["metric_policy"] == policy
    for m in ("dice", "jaccard", "hd95"):
        entry = res["metrics"][m]
        assert {"mean", "std", "values"} <= set(entry) and entry["n"] >= 1
        assert np.isfinite(entry["mean"])
    assert 0.0 <= res["metrics"]["dice"]["mean"] <= 1.0
    assert len(res["folds"]) == 1 and res["folds"][0]["fold"] == 0
    rows = list(csv.DictReader(open(out / "predictions" / "per_image_class.csv")))
    assert list(rows[0]) == ["image", "patient", "fold", "class", "dice", "jaccard", "hd95", "tp", "fp", "fn",
                             "gt_present", "pred_present"]
    assert len(rows) == n_classes_reported * len({r["image"] for r in rows})
    assert {r["patient"] for r in rows} == set(res["folds"][0]["test"])
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["head"] == head and (out / "model" / "fold0.safetensors").exists()
    return res, rows


@pytest.mark.parametrize("head", ["linear", "unet", "eomt"])
def test_eval_and_predict_cholecseg8k(cli, tmp_path, head):
    root = make_cholec(tmp_path / "cholec", videos=3, frames=2)
    out = tmp_path / "run"
    extra = ["freeze_backbone=false"] if head == "eomt" else []
    r = cli("eval", "seg", *TINY, "data.layout=cholecseg8k", f"data.root={root}", f"head={head}", f"out={out}", *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Dice" in r.stdout
    res, rows = _check_run(out, head, n_classes_reported=8, unit="pixel")  # 9 kept classes minus background
    assert res["classes"][0] == "black background" and "blood" not in res["classes"]
    masks = sorted((out / "predictions" / "masks" / "fold0").glob("*.png"))
    assert len(masks) == len({r["image"] for r in rows})
    assert np.asarray(Image.open(masks[0])).shape == (40, 48)  # native resolution

    pred = tmp_path / "pred"
    r = cli("predict", "seg", root / "video01", f"model={out}", f"out={pred}")
    assert r.returncode == 0, r.stderr[-2000:]
    written = sorted(p.name for p in pred.rglob("*.png"))
    assert written == sorted([f"frame_{n}_endo_mask.png" for n in (80, 81)] + [f"frame_{n}_endo_overlay.png" for n in (80, 81)])
    m = np.asarray(Image.open(next(pred.rglob("frame_80_endo_mask.png"))))
    assert m.shape == (40, 48) and m.max() < 9


def test_seed001_unet_variant_trains_and_predicts_through_the_cli(cli, tmp_path):
    """unet.skips=last4 unet.convs_per_stage=1 (the seed001_unet recipe's decoder) reaches the trained model,
    model.json records it, and predict rebuilds that decoder (a strict load of its weights)."""
    root = make_cholec(tmp_path / "cholec", videos=3, frames=2)
    out = tmp_path / "run"
    r = cli("eval", "seg", *TINY, "data.layout=cholecseg8k", f"data.root={root}", "head=unet",
            "unet.skips=last4", "unet.convs_per_stage=1", "backbone=random:dinov2_tiny", f"out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["unet_blocks"] == [0, 1, 2, 3]  # the last four of dinov2_tiny's four blocks
    assert (meta["unet"]["skips"], meta["unet"]["convs_per_stage"]) == ("last4", 1)
    r = cli("predict", "seg", root / "video01", f"model={out}", f"out={tmp_path / 'pred'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list((tmp_path / "pred").rglob("*_mask.png"))) == 2


def test_seed000_policy_is_recorded_and_pools_the_rows(cli, tmp_path):
    """metrics.policy=seed000: results.json records it; its per-patient Dice is the CSV's tp/fp/fn pooled by
    hand per patient and class, its std numpy's (ddof 0), and no frame missing the class has an HD95."""
    root = make_cholec(tmp_path / "cholec", videos=3, frames=2)
    out = tmp_path / "run"
    r = cli("eval", "seg", *TINY, "data.layout=cholecseg8k", f"data.root={root}", "head=linear",
            "metrics.policy=seed000", f"out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "metric policy seed000" in r.stdout
    res, rows = _check_run(out, "linear", n_classes_reported=8, unit="pixel", policy="seed000")
    expected = {}
    for patient in sorted({row["patient"] for row in rows}):
        per_class = []
        for c in sorted({row["class"] for row in rows}):
            sel = [row for row in rows if row["patient"] == patient and row["class"] == c]
            tp, fp, fn = (sum(int(row[k]) for row in sel) for k in ("tp", "fp", "fn"))
            if 2 * tp + fp + fn:
                per_class.append(2 * tp / (2 * tp + fp + fn))
        if per_class:
            expected[patient] = float(np.mean(per_class))
    dice = res["metrics"]["dice"]
    assert dice["values"] == pytest.approx(expected)
    assert dice["std"] == pytest.approx(np.std(list(expected.values())) if len(expected) > 1 else 0.0)
    for row in rows:
        if row["gt_present"] != row["pred_present"]:
            assert row["hd95"] == "nan", row
