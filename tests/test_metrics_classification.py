"""Classification metrics against scikit-learn / scipy and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn import metrics as skm

from meddino.errors import ConfigError, DataError, UserError
from meddino.metrics import classification as cm


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def test_average_ranks_match_scipy(rng):
    for _ in range(20):
        x = rng.integers(0, 6, size=rng.integers(1, 40)).astype(float)  # many ties
        np.testing.assert_array_equal(cm._average_ranks(x), rankdata(x, method="average"))


def test_auroc_hand_computed():
    # pairs (pos, neg): (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4) -> 3 of 4
    assert cm.auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]), "binary") == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half
    assert cm.auroc(np.array([0, 1, 1]), np.array([0.5, 0.5, 0.9]), "binary") == pytest.approx(0.75)
    assert cm.auroc(np.array([1, 0]), np.array([0.2, 0.9]), "binary") == 0.0


@pytest.mark.parametrize("n", [7, 50, 301])
def test_auroc_binary_matches_sklearn_with_ties(rng, n):
    y = rng.integers(0, 2, size=n)
    y[:2] = [0, 1]
    s = np.round(rng.random(n), 1)  # coarse scores -> many ties
    ref = skm.roc_auc_score(y, s)
    assert cm.auroc(y, s, "binary") == pytest.approx(ref, abs=1e-12)
    two_col = np.stack([1 - s, s], axis=1)
    assert cm.auroc(y, two_col, "binary") == pytest.approx(ref, abs=1e-12)
    assert cm.auroc(y.astype(bool), s, "binary") == pytest.approx(ref, abs=1e-12)


def test_auroc_multiclass_ovr_macro_matches_sklearn(rng):
    n, c = 120, 4
    y = rng.integers(0, c, size=n)
    y[:c] = np.arange(c)
    p = _softmax(rng.standard_normal((n, c)) + 1.5 * np.eye(c)[y])
    ref = skm.roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert cm.auroc(y, p, "multiclass") == pytest.approx(ref, abs=1e-12)
    per = cm.auroc_per_class(y, p, "multiclass")
    for k in range(c):
        assert per[k] == pytest.approx(skm.roc_auc_score(y == k, p[:, k]), abs=1e-12)


def test_auroc_multiclass_rejects_logits(rng):
    y = np.array([0, 1, 2, 0, 1, 2])
    with pytest.raises(DataError, match="softmax"):
        cm.auroc(y, rng.standard_normal((6, 3)) * 3, "multiclass")


def test_auroc_multiclass_absent_class_is_skipped(rng):
    y = rng.integers(0, 3, size=60)  # class 3 never occurs
    y[:3] = [0, 1, 2]
    p = _softmax(rng.standard_normal((60, 4)))
    per = cm.auroc_per_class(y, p, "multiclass")
    assert np.isnan(per[3]) and not np.isnan(per[:3]).any()
    expected = np.mean([skm.roc_auc_score(y == k, p[:, k]) for k in range(3)])
    assert cm.auroc(y, p, "multiclass") == pytest.approx(expected, abs=1e-12)
    out = cm.classification_metrics(y, p, "multiclass")
    assert out["auroc_skipped"] == [3]


def test_auroc_multilabel_matches_sklearn_and_skips_constant_column(rng):
    n, l = 80, 5
    y = (rng.random((n, l)) < 0.3).astype(int)
    y[0] = 1
    y[1] = 0
    s = 1 / (1 + np.exp(-(rng.standard_normal((n, l)) + 2 * y)))
    assert cm.auroc(y, s, "multilabel") == pytest.approx(skm.roc_auc_score(y, s, average="macro"), abs=1e-12)
    y[:, 2] = 0  # a label with no positive case: undefined. scikit-learn >= 1.6 returns NaN for it (with a
    # warning) and so a NaN macro; meddino reports the NaN per label and averages the defined labels.
    with pytest.warns(UserWarning):
        ref_per = skm.roc_auc_score(y, s, average=None)
    per = cm.auroc_per_class(y, s, "multilabel")
    np.testing.assert_allclose(per, ref_per, atol=1e-12)  # NaN in the same place
    assert np.isnan(per[2]) and np.isfinite(np.delete(per, 2)).all()
    keep = [0, 1, 3, 4]
    assert cm.auroc(y, s, "multilabel") == pytest.approx(
        skm.roc_auc_score(y[:, keep], s[:, keep], average="macro"), abs=1e-12
    )


def test_auroc_undefined_binary_is_nan():
    assert np.isnan(cm.auroc(np.zeros(5, int), np.linspace(0, 1, 5), "binary"))


@pytest.mark.filterwarnings("ignore::UserWarning")  # sklearn: "y_pred contains classes not in y_true"
def test_label_metrics_single_label_match_sklearn(rng):
    for c in (2, 3, 6):
        for _ in range(5):
            n = int(rng.integers(5, 60))
            y = rng.integers(0, c, size=n)
            p = rng.integers(0, c + 1, size=n)  # class c only ever predicted: counts in macro F1 as sklearn does
            assert cm.accuracy(y, p) == pytest.approx(skm.accuracy_score(y, p))
            ref_bal = skm.balanced_accuracy_score(y, p)
            assert cm.balanced_accuracy(y, p) == pytest.approx(ref_bal)
            ref_f1 = skm.f1_score(y, p, average="macro", zero_division=0)
            assert cm.macro_f1(y, p) == pytest.approx(ref_f1)


def test_macro_f1_hand_computed():
    # class 0: tp 1, fp 0, fn 1 -> 2/3 ; class 1: tp 1, fp 1, fn 0 -> 2/3 ; class 2 (pred only): 0
    y = np.array([0, 0, 1])
    p = np.array([0, 1, 1])
    assert cm.macro_f1(y, p) == pytest.approx(2 / 3)
    p2 = np.array([0, 2, 1])
    assert cm.macro_f1(y, p2) == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_label_metrics_multilabel_match_sklearn(rng):
    y = (rng.random((40, 4)) < 0.4).astype(int)
    p = (rng.random((40, 4)) < 0.4).astype(int)
    y[:, 3] = 0
    p[:, 3] = 0  # never present, never predicted: F1 0 under zero_division=0
    assert cm.accuracy(y, p) == pytest.approx(1 - skm.hamming_loss(y, p))
    assert cm.macro_f1(y, p) == pytest.approx(skm.f1_score(y, p, average="macro", zero_division=0))
    ref = np.mean([skm.balanced_accuracy_score(y[:, j], p[:, j]) for j in range(4)])
    assert cm.balanced_accuracy(y, p) == pytest.approx(ref)


def test_classification_metrics_binary_thresholds(rng):
    y = rng.integers(0, 2, size=50)
    s = rng.random(50)
    out = cm.classification_metrics(y, s, "binary", threshold=0.3)
    pred = (s >= 0.3).astype(int)
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert out["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert out["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert out["auroc"] == pytest.approx(skm.roc_auc_score(y, s))
    assert out["n"] == 50 and out["auroc_skipped"] == []


def test_classification_metrics_multiclass_uses_argmax(rng):
    y = rng.integers(0, 3, size=40)
    y[:3] = [0, 1, 2]
    p = _softmax(rng.standard_normal((40, 3)))
    out = cm.classification_metrics(y, p, "multiclass")
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, p.argmax(1)))
    assert len(out["auroc_per_class"]) == 3


def test_input_errors_are_user_errors():
    with pytest.raises(DataError, match="0 or 1"):
        cm.auroc(np.array([0, 2, 1]), np.array([0.1, 0.2, 0.3]), "binary")
    with pytest.raises(ConfigError, match="task"):
        cm.auroc(np.array([0, 1]), np.array([0.1, 0.2]), "regression")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="out of range"):
        cm.auroc(np.array([0, 3]), np.array([[0.5, 0.5], [0.5, 0.5]]), "multiclass")
    with pytest.raises(DataError, match="NaN"):
        cm.auroc(np.array([0, 1]), np.array([0.1, np.nan]), "binary")
    with pytest.raises(DataError, match="shape"):
        cm.accuracy(np.array([0, 1]), np.array([0, 1, 1]))
    assert issubclass(DataError, UserError)


def test_aggregate_by_patient_mean_and_order():
    ids = np.array(["b", "a", "b", "c", "a"])
    y = np.array([1, 0, 1, 0, 0])
    s = np.array([[0.2, 0.8], [0.9, 0.1], [0.4, 0.6], [0.5, 0.5], [0.7, 0.3]])
    pats, yt, ys = cm.aggregate_by_patient(ids, y, s)
    assert pats.tolist() == ["b", "a", "c"]  # first appearance
    assert yt.tolist() == [1, 0, 0]
    np.testing.assert_allclose(ys, [[0.3, 0.7], [0.8, 0.2], [0.5, 0.5]])
    _, _, ys_max = cm.aggregate_by_patient(ids, y, s, reduce="max")
    np.testing.assert_allclose(ys_max, [[0.4, 0.8], [0.9, 0.3], [0.5, 0.5]])


def test_aggregate_by_patient_conflicting_labels_names_patient():
    with pytest.raises(DataError, match="patient p7"):
        cm.aggregate_by_patient(["p1", "p7", "p7"], np.array([0, 0, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ConfigError, match="reduce"):
        cm.aggregate_by_patient(["p1"], np.array([0]), np.array([0.1]), reduce="median")  # type: ignore[arg-type]


def test_aggregate_by_patient_multilabel_takes_max():
    ids = [1, 1, 2]
    y = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]])
    s = np.array([[0.9, 0.1, 0.2], [0.1, 0.3, 0.8], [0.2, 0.7, 0.1]])
    pats, yt, ys = cm.aggregate_by_patient(ids, y, s)
    assert pats.tolist() == [1, 2]
    np.testing.assert_array_equal(yt, [[1, 0, 1], [0, 1, 0]])
    np.testing.assert_allclose(ys, [[0.5, 0.2, 0.5], [0.2, 0.7, 0.1]])


def test_summarize_folds():
    folds = [
        {"auroc": 0.8, "accuracy": 0.7, "auroc_per_class": [0.8]},
        {"auroc": 0.9, "accuracy": 0.6, "auroc_per_class": [0.9]},
        {"auroc": 0.7, "accuracy": float("nan"), "auroc_per_class": [0.7]},
    ]
    out = cm.summarize_folds(folds)
    assert set(out) == {"auroc", "accuracy"}
    assert out["auroc"]["mean"] == pytest.approx(0.8)
    assert out["auroc"]["std"] == pytest.approx(np.std([0.8, 0.9, 0.7], ddof=1))
    assert out["auroc"]["values"] == [0.8, 0.9, 0.7]
    assert out["accuracy"]["mean"] == pytest.approx(0.65) and out["accuracy"]["n"] == 2
    single = cm.summarize_folds([{"auroc": 0.5}])
    assert single["auroc"] == {"mean": 0.5, "std": 0.0, "values": [0.5], "n": 1}
    with pytest.raises(DataError, match="'auroc' missing in fold 1"):
        cm.summarize_folds([{"auroc": 0.5}, {"acc": 0.1}])
