"""End to end through the real CLI: data split -> embed -> eval knn -> eval linear -> eval finetune (LoRA),
on generated 32 px images whose colour depends on the class, with a tiny random backbone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def make_dataset(root: Path, n_patients: int = 12, per_patient: int = 2) -> Path:
    rng = np.random.default_rng(0)
    colours = {"benign": (200, 60, 60), "malignant": (60, 60, 200)}
    rows = []
    for p in range(n_patients):
        cls = "benign" if p % 2 == 0 else "malignant"
        split = "train" if p < n_patients // 2 else "val" if p < 3 * n_patients // 4 else "test"
        for j in range(per_patient):
            arr = np.clip(np.array(colours[cls])[None, None] + rng.normal(0, 25, (32, 32, 3)), 0, 255)
            rel = f"images/p{p:02d}_{j}.png"
            (root / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr.astype(np.uint8)).save(root / rel)
            rows.append({"image": rel, "label": cls, "patient": f"P{p:02d}", "split": split})
    path = root / "manifest.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "label", "patient", "split"])
        w.writeheader()
        w.writerows(rows)
    return path


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def _results(run: Path, protocol: str) -> dict:
    res = json.loads((run / "results.json").read_text())
    assert res["task"] == "classification" and res["protocol"] == protocol
    assert res["model"] == "random:dinov2_tiny" and res["dataset"] == "manifest" and res["level"] == "patient"
    assert res["classes"] == ["benign", "malignant"] and res["problem"] == "binary"
    for name in ("auroc", "accuracy", "balanced_accuracy", "macro_f1"):
        assert {"mean", "std", "values"} <= set(res["metrics"][name])
    for rel in res["predictions"].values():
        with open(run / rel, newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 6  # 3 test patients x 2 images
        assert {r["patient"] for r in rows} == {"P09", "P10", "P11"}
        assert {"score_benign", "score_malignant", "true_benign", "true_malignant"} <= set(rows[0])
    return res


def test_cli_end_to_end(tmp_path, cli):
    manifest = make_dataset(tmp_path / "data")

    proc = cli("data", "split", manifest, "k=3", "seed=0", f"out={tmp_path / 'data' / 'folds.csv'}")
    _ok(proc)
    with open(tmp_path / "data" / "folds.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    fold_of: dict[str, set[str]] = {}
    for r in rows:
        fold_of.setdefault(r["patient"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in fold_of.values()) and {r["fold"] for r in rows} == {"0", "1", "2"}

    emb = tmp_path / "emb"
    _ok(cli("embed", "--config", "knn_tiny", f"data.manifest={manifest}", "backbone=random:dinov2_tiny",
            f"out={emb}"))
    assert (emb / "features.safetensors").is_file() and (emb / "rows.csv").is_file()

    _ok(cli("eval", "knn", "--config", "knn_tiny", f"embeddings={emb}", f"out={tmp_path / 'knn'}"))
    res = _results(tmp_path / "knn", "knn")
    assert set(res["variants"]) == {"k=3", "k=5"}

    proc = cli("eval", "linear", "--config", "linear_tiny", f"embeddings={emb}", f"out={tmp_path / 'lin'}")
    _ok(proc)
    res = _results(tmp_path / "lin", "linear")
    (unit,) = res["units"]
    assert len(unit["grid"]) == 16  # 4 input sets x 2 lrs x 2 weight decays, trained together
    # colour is linearly readable from the patch tokens: the chosen head separates the test patients
    assert res["metrics"]["auroc"]["mean"] == 1.0

    run = tmp_path / "ft"
    _ok(cli("eval", "finetune", "--config", "finetune_tiny", f"data.manifest={manifest}",
            "backbone=random:dinov2_tiny", f"out={run}"))
    res = _results(run, "finetune")
    assert res["mode"] == "lora" and res["hyperparameters"]["lora_r"] == 4
    assert 0 < res["hyperparameters"]["trainable_params"] < res["hyperparameters"]["total_params"]
    assert (run / "metrics.jsonl").is_file() and (run / "config.yaml").is_file()
