"""A class with a single sample: `data split` refuses to stratify on it, the classification protocols say so
in one warning line (it is never both learnt and tested, and its AUROC is undefined in all units but one)."""

from __future__ import annotations

import csv

import numpy as np
from PIL import Image

from meddino.data.splits import single_sample_classes


def test_single_sample_classes_by_hand():
    assert single_sample_classes(np.array([0, 0, 1, 2, 2]), ["a", "b", "c"]) == [("b", 2)]
    multi = np.array([[1, 0, 1], [1, 0, 0], [1, 1, 0]])
    assert single_sample_classes(multi, ["x", "y", "z"]) == [("y", 2), ("z", 0)]
    assert single_sample_classes(np.array([0, 1, 0, 1]), ["a", "b"]) == []


def _manifest(root, labels):
    (root / "images").mkdir(parents=True)
    rows = []
    for i, label in enumerate(labels):
        rel = f"images/{i}.png"
        Image.fromarray(np.full((32, 32, 3), 40 * i % 255, np.uint8)).save(root / rel)
        rows.append({"image": rel, "label": label, "patient": f"P{i}", "split": "train" if i % 3 else "test"})
    path = root / "manifest.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "label", "patient", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_data_split_refuses_to_stratify_on_a_single_sample_class(tmp_path, cli):
    manifest = _manifest(tmp_path, ["a", "b"] * 4 + ["rare"])
    res = cli("data", "split", manifest, "k=2")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "'rare' (CSV line 10)" in lines[0] and "stratify=false" in lines[0]
    assert not (tmp_path / "manifest_folds.csv").exists()
    assert cli("data", "split", manifest, "k=2", "stratify=false").returncode == 0


def test_knn_warns_in_one_line(tmp_path, cli):
    manifest = _manifest(tmp_path, ["a", "b"] * 4 + ["rare"])
    res = cli("eval", "knn", "--config", "knn_tiny", f"data.manifest={manifest}", "backbone=random:dinov2_tiny",
              f"out={tmp_path / 'knn'}")
    assert res.returncode == 0, res.stderr[-2000:]
    warnings = [line for line in res.stderr.splitlines() if line.startswith("meddino: warning:")]
    assert len(warnings) == 1 and "1 class(es) with a single sample: 'rare' (CSV line 10)" in warnings[0]
