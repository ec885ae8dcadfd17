"""Frozen protocols on cached features: head math vs written-out formulas, the batched grid vs single heads,
grid selection, kNN with an obvious answer, few-shot draws, and the results/predictions files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from meddino.data.manifest import Manifest
from meddino.tasks.classify.config import ClassifyConfig
from meddino.tasks.classify.embed import save_cache
from meddino.tasks.classify.frozen import fewshot_draw, run_fewshot, run_knn, run_linear
from meddino.tasks.classify.linear_heads import (
    batched_logits,
    batched_loss,
    class_scores,
    fit_heads,
    head_targets,
    linear_grid,
)

# ------------------------------------------------------------------------------------------------ math


def test_batched_loss_matches_written_out_formulas():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3))
    w = rng.normal(size=(2, 3, 4))
    b = rng.normal(size=(2, 4))
    logits = batched_logits(torch.tensor(x), torch.tensor(w), torch.tensor(b))
    ref_logits = np.stack([x @ w[h] + b[h] for h in range(2)])
    np.testing.assert_allclose(logits.numpy(), ref_logits, rtol=1e-12)

    y = np.array([0, 3, 1, 1, 2])
    ce = batched_loss(logits, torch.tensor(y), "multiclass").numpy()
    for h in range(2):
        z = ref_logits[h]
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        assert ce[h] == pytest.approx(-np.mean(logp[np.arange(5), y]), rel=1e-10)

    yl = rng.integers(0, 2, size=(5, 4)).astype(float)
    bce = batched_loss(logits, torch.tensor(yl), "multilabel").numpy()
    for h in range(2):
        p = 1 / (1 + np.exp(-ref_logits[h]))
        ref = -np.mean(yl * np.log(p) + (1 - yl) * np.log(1 - p))
        assert bce[h] == pytest.approx(ref, rel=1e-10)


def test_class_scores_conventions():
    z = torch.tensor([[0.0], [2.0]])
    s = class_scores(z, "binary")
    p = 1 / (1 + np.exp(-2.0))
    np.testing.assert_allclose(s.numpy(), [[0.5, 0.5], [1 - p, p]], rtol=1e-6)
    s = class_scores(torch.tensor([[1.0, 2.0, 3.0]]), "multiclass").numpy()
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(s[0], e / e.sum(), rtol=1e-6)


def test_grid_heads_train_like_single_heads():
    """One pass over a 4-head grid on two input sets == each head trained alone (heads are independent)."""
    gen = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(40, 6, generator=gen), torch.randn(40, 9, generator=gen)
    y = head_targets(np.arange(40) % 3, "multiclass")
    lrs, wds = [0.1, 0.1, 0.01, 0.3], [0.0, 0.01, 0.0, 0.001]
    grid = fit_heads([xa, xb], y, "multiclass", 3, lrs, wds, epochs=3, batch_size=16, seed=5)
    for h in range(4):
        alone = fit_heads([xa, xb], y, "multiclass", 3, [lrs[h]], [wds[h]], epochs=3, batch_size=16, seed=5)
        for (gw, gb), (aw, ab) in zip(grid, alone):
            torch.testing.assert_close(gw[h], aw[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(gb[h], ab[0], rtol=1e-5, atol=1e-6)
    # different hyper-parameters really give different heads
    assert not torch.allclose(grid[0][0][0], grid[0][0][2])


def test_linear_grid_picks_the_informative_input():
    rng = np.random.default_rng(1)
    n = 120
    y = rng.integers(0, 2, n)
    informative = rng.normal(size=(n, 8)) + 2.5 * y[:, None] * np.eye(8)[0]
    noise = rng.normal(size=(n, 8))
    sets = {"noise": torch.tensor(noise, dtype=torch.float32), "good": torch.tensor(informative, dtype=torch.float32)}
    tr, va = np.arange(80), np.arange(80, 120)
    choice = linear_grid({k: v[tr] for k, v in sets.items()}, y[tr], {k: v[va] for k, v in sets.items()}, y[va],
                         "binary", 1, lrs=[0.01, 0.1], weight_decays=[0.0, 1e-3], epochs=30, batch_size=32)
    assert choice.features == "good"
    assert choice.score > 0.9
    assert len(choice.table) == 8
    noise_best = max(r["val_auroc"] for r in choice.table if r["features"] == "noise")
    assert noise_best < choice.score


# -------------------------------------------------------------------------------------------- few-shot


def test_fewshot_draws_exactly_n_patients_per_class():
    patients = np.repeat([f"p{i}" for i in range(24)], 2)
    labels = np.repeat(np.arange(24) % 3, 2)
    names = ["a", "b", "c"]
    for shots in (1, 2, 4):
        rows, chosen = fewshot_draw(patients, labels, "multiclass", names, shots, np.random.default_rng(shots))
        drawn = np.unique(patients[rows])
        assert drawn.size == 3 * shots
        for c in range(3):
            assert np.unique(patients[rows][labels[rows] == c]).size == shots
        assert sorted(sum(chosen.values(), [])) == sorted(drawn.tolist())
        # all rows of a drawn patient come along, nothing else
        assert set(rows.tolist()) == set(np.flatnonzero(np.isin(patients, drawn)).tolist())
    # 8 patients per class: 9 cannot be drawn
    assert fewshot_draw(patients, labels, "multiclass", names, 9, np.random.default_rng(0)) is None
    # seeded and varying between draws
    a = fewshot_draw(patients, labels, "multiclass", names, 2, np.random.default_rng(7))[0]
    b = fewshot_draw(patients, labels, "multiclass", names, 2, np.random.default_rng(7))[0]
    c = fewshot_draw(patients, labels, "multiclass", names, 2, np.random.default_rng(8))[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_fewshot_multilabel_groups():
    patients = np.array([f"p{i}" for i in range(12)])
    labels = np.zeros((12, 2), dtype=int)
    labels[:4, 0] = 1
    labels[4:8, 1] = 1
    rows, chosen = fewshot_draw(patients, labels, "multilabel", ["x", "y"], 2, np.random.default_rng(0))
    assert set(chosen) == {"x", "y", "none"} and all(len(v) == 2 for v in chosen.values())
    assert labels[rows, 0].sum() == 2 and labels[rows, 1].sum() == 2 and rows.size == 6


# ------------------------------------------------------------------------------------- protocols + files


def _cache(tmp: Path, n_patients: int = 24, split: bool = True) -> Path:
    """Features with an obvious answer: class c points along axis c (+ small noise); 2 rows per patient."""
    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i:02d}" for i in range(n_patients)], 2)
    labels = np.repeat(np.arange(n_patients) % 3, 2)
    n = labels.size
    centers = np.eye(16)[labels] * 4.0
    feats = {k: torch.tensor(centers + rng.normal(scale=0.3, size=(n, 16)), dtype=torch.float32)
             for k in ("cls", "mean_patch")}
    feats["cls_blocks"] = torch.cat([feats["cls"]] * 2, dim=1)
    feats["mean_patch_blocks"] = torch.cat([feats["mean_patch"]] * 2, dim=1)
    pidx = np.repeat(np.arange(n_patients), 2)
    split_col = np.where(pidx < n_patients * 0.5, "train", np.where(pidx < n_patients * 0.75, "val", "test"))
    m = Manifest(images=[f"img/{i}.png" for i in range(n)], paths=[tmp / f"img/{i}.png" for i in range(n)],
                 patients=patients, labels=labels, task="multiclass", names=["a", "b", "c"],
                 label_columns=["label"], split=split_col.astype(str) if split else None,
                 fold=None if split else (pidx % 4).astype(np.int64), dataset="toy")
    return save_cache(tmp / "emb", feats, m, {"backbone": "random:toy", "model": "toy"})


def _cfg(tmp: Path, emb: Path, out: str, **sections) -> ClassifyConfig:
    return ClassifyConfig.model_validate({"embeddings": str(emb), "out": str(tmp / out), **sections})


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_knn_obvious_answer_and_files(tmp_path, capsys):
    emb = _cache(tmp_path)
    run_knn(_cfg(tmp_path, emb, "knn", knn={"k": [3, 5], "primary_k": 5}))
    res = json.loads((tmp_path / "knn/results.json").read_text())
    for key in ("task", "protocol", "model", "dataset", "level", "metrics"):
        assert key in res
    assert (res["task"], res["protocol"], res["model"], res["dataset"], res["level"]) == \
        ("classification", "knn", "toy", "toy", "patient")
    for name in ("auroc", "accuracy", "balanced_accuracy", "macro_f1"):
        assert set(res["metrics"][name]) >= {"mean", "std", "values"}
    assert res["metrics"]["accuracy"]["mean"] == 1.0 and res["metrics"]["auroc"]["mean"] == 1.0
    assert set(res["variants"]) == {"k=3", "k=5"} and res["primary_variant"] == "k=5"
    rows = _read_csv(tmp_path / "knn" / res["predictions"]["k=5"])
    assert len(rows) == 12  # 6 test patients x 2 images
    assert {"image", "patient", "unit", "split", "label", "true_a", "score_a", "score_c", "model",
            "protocol"} <= set(rows[0])
    for r in rows:
        scores = [float(r[f"score_{c}"]) for c in "abc"]
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)
        assert "abc"[int(np.argmax(scores))] == r["label"]


def test_linear_protocol_cv_and_files(tmp_path):
    emb = _cache(tmp_path, split=False)
    run_linear(_cfg(tmp_path, emb, "lin", linear={"features": ["cls", "cls_patch"], "lrs": [0.1],
                                                  "weight_decays": [0.0, 0.001], "epochs": 20, "batch_size": 16}))
    res = json.loads((tmp_path / "lin/results.json").read_text())
    assert res["protocol"] == "linear" and len(res["units"]) == 4
    assert len(res["metrics"]["auroc"]["values"]) == 4 and res["metrics"]["auroc"]["mean"] > 0.95
    for unit in res["units"]:
        assert unit["chosen"]["features"] in ("cls", "cls_patch") and len(unit["grid"]) == 4
        assert unit["n_val"] > 0  # validation = the next fold
    rows = _read_csv(tmp_path / "lin/predictions/linear.csv")
    assert len(rows) == 48 and {r["unit"] for r in rows} == {"fold0", "fold1", "fold2", "fold3"}


def test_fewshot_protocol(tmp_path):
    emb = _cache(tmp_path)
    run_fewshot(_cfg(tmp_path, emb, "fs", fewshot={"shots": [1, 2, 5], "draws": 3, "epochs": 30}))
    res = json.loads((tmp_path / "fs/results.json").read_text())
    # 12 train patients, 4 per class: N = 5 cannot be drawn and is reported as skipped
    assert set(res["variants"]) == {"n=1", "n=2"} and "n=5" in res["skipped"]
    assert res["primary_variant"] == "n=2" and len(res["metrics"]["auroc"]["values"]) == 3
    train_patients = {f"p{i:02d}" for i in range(12)}
    for unit in res["units"]:
        drawn = sum(unit["patients"].values(), [])
        assert len(drawn) == 6 and set(drawn) <= train_patients  # never val or test patients
    assert len(_read_csv(tmp_path / "fs/predictions/fewshot_n1.csv")) == 3 * 12


def test_multilabel_protocols(tmp_path):
    """Multi-label (NIH-style) features: label j present <-> a bump on axis j; kNN, linear and few-shot run."""
    rng = np.random.default_rng(3)
    n_patients = 40
    patients = np.array([f"q{i:02d}" for i in range(n_patients)])
    labels = (rng.random((n_patients, 3)) < 0.4).astype(np.int64)
    labels[:3] = np.eye(3, dtype=np.int64)  # every label present in train
    labels[30:33] = np.eye(3, dtype=np.int64)  # ... and in test
    x = labels @ np.eye(3, 12) * 4.0 + rng.normal(scale=0.3, size=(n_patients, 12))
    feats = {k: torch.tensor(x, dtype=torch.float32) for k in ("cls", "mean_patch")}
    feats["cls_blocks"], feats["mean_patch_blocks"] = feats["cls"], feats["mean_patch"]
    split = np.where(np.arange(n_patients) < 20, "train", np.where(np.arange(n_patients) < 30, "val", "test"))
    m = Manifest(images=[f"{p}.png" for p in patients], paths=[tmp_path / f"{p}.png" for p in patients],
                 patients=patients, labels=labels, task="multilabel", names=["x", "y", "z"],
                 label_columns=["x", "y", "z"], split=split, dataset="ml")
    emb = save_cache(tmp_path / "emb", feats, m, {"backbone": "random:toy", "model": "toy"})
    run_knn(_cfg(tmp_path, emb, "knn", knn={"k": [5]}))
    run_linear(_cfg(tmp_path, emb, "lin", linear={"features": ["cls"], "lrs": [0.1], "weight_decays": [0.0],
                                                  "epochs": 30, "batch_size": 16}))
    run_fewshot(_cfg(tmp_path, emb, "fs", fewshot={"shots": [1], "draws": 2, "epochs": 30}))
    for run, floor in (("knn", 0.9), ("lin", 0.9), ("fs", 0.7)):  # few-shot: one patient per label
        res = json.loads((tmp_path / run / "results.json").read_text())
        assert res["problem"] == "multilabel" and res["metrics"]["auroc"]["mean"] > floor, run
        assert set(res["metrics"]["auroc_per_class"]) == {"x", "y", "z"}
    rows = _read_csv(tmp_path / "lin/predictions/linear.csv")
    assert len(rows) == 10 and all(0.0 <= float(r["score_y"]) <= 1.0 for r in rows)
    assert {r["label"] for r in rows} >= {"x", "y", "z"}
