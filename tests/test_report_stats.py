"""Bootstrap and ranking statistics: closed-form intervals, scipy ranks, group-level resampling."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy.stats import rankdata

from meddino.errors import DataError
from meddino.report import stats as st


# ------------------------------------------------------------------------------------ bootstrap_indices
def test_bootstrap_indices_match_a_plain_loop():
    groups = np.array(["p2", "p1", "p2", "p3", "p1", "p2", "p4"])
    got = st.bootstrap_indices(groups, n_samples=50, seed=3)
    # reference: the same generator call, rows assembled with plain Python loops
    names = sorted(set(groups.tolist()))
    rows_of = {g: [i for i, x in enumerate(groups) if x == g] for g in names}
    rng = np.random.default_rng(3)
    for idx in got:
        drawn = rng.integers(0, len(names), size=len(names))
        expected = [i for d in drawn for i in rows_of[names[d]]]
        assert idx.tolist() == expected


def test_rows_of_a_patient_move_together():
    groups = ["a", "a", "a", "b", "c", "c", "d", "e"]
    sizes = Counter(groups)
    saw_double_a = False
    for idx in st.bootstrap_indices(groups, n_samples=300, seed=0):
        drawn = Counter(groups[i] for i in idx)
        rows = Counter(idx.tolist())
        for g, n_rows in drawn.items():
            times = n_rows // sizes[g]
            assert n_rows == times * sizes[g]  # whole patients only
            for i, x in enumerate(groups):  # every row of a drawn patient appears as often as the patient
                if x == g:
                    assert rows[i] == times
        assert sum(drawn[g] // sizes[g] for g in drawn) == len(sizes)  # as many patients as there are
        if drawn.get("a", 0) == 6:  # patient with 3 rows drawn twice -> 6 rows
            saw_double_a = True
    assert saw_double_a


def test_bootstrap_indices_seeded_and_roughly_uniform():
    groups = np.repeat(np.arange(10), 2)
    a = st.bootstrap_indices(groups, 400, seed=5)
    b = st.bootstrap_indices(groups, 400, seed=5)
    c = st.bootstrap_indices(groups, 400, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    counts = np.bincount(np.concatenate(a), minlength=20)
    assert counts.sum() == 400 * 20
    assert np.all(np.abs(counts / 400 - 1.0) < 0.2)  # each row drawn about once per sample
    with pytest.raises(DataError, match="n_samples"):
        st.bootstrap_indices(groups, 0)


# ----------------------------------------------------------------------------------------- bootstrap_ci
def test_bootstrap_ci_of_a_mean_matches_normal_theory():
    rng = np.random.default_rng(0)
    n, mu, sigma = 2000, 3.0, 2.0
    x = rng.normal(mu, sigma, size=n)
    ci = st.bootstrap_ci(np.mean, x, n_samples=2000, seed=1)
    half = 1.96 * x.std(ddof=1) / np.sqrt(n)
    assert ci["point"] == pytest.approx(x.mean())
    assert ci["lower"] == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert ci["upper"] == pytest.approx(x.mean() + half, abs=0.15 * half)
    assert ci["std"] == pytest.approx(sigma / np.sqrt(n), rel=0.1)
    assert ci["n_nan"] == 0 and ci["n_samples"] == 2000


def test_bootstrap_ci_constant_has_zero_width():
    ci = st.bootstrap_ci(np.mean, np.full(30, 0.7), groups=np.arange(30) // 3, n_samples=200)
    assert ci["lower"] == ci["upper"] == ci["point"] == pytest.approx(0.7)


def test_group_bootstrap_equals_bootstrap_of_group_means():
    # every patient has 4 identical rows: resampling patients over rows must give exactly the interval of
    # resampling the patient means (same seed -> same draws), while a row-level bootstrap is too narrow.
    rng = np.random.default_rng(2)
    means = rng.normal(size=25)
    rows = np.repeat(means, 4)
    groups = np.repeat(np.arange(25), 4)
    by_patient = st.bootstrap_ci(np.mean, rows, groups=groups, n_samples=500, seed=9)
    reference = st.bootstrap_ci(np.mean, means, n_samples=500, seed=9)
    for k in ("point", "lower", "upper"):
        assert by_patient[k] == pytest.approx(reference[k], abs=1e-12)
    by_row = st.bootstrap_ci(np.mean, rows, n_samples=500, seed=9)
    assert (by_row["upper"] - by_row["lower"]) < 0.7 * (by_patient["upper"] - by_patient["lower"])


def test_bootstrap_ci_several_arrays_rows_and_nan_resamples():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.3, 0.9, 0.8])

    def auc_like(t, p):  # undefined (NaN) on resamples without both classes
        if t.min() == t.max():
            return float("nan")
        return float(np.mean(p[t == 1][:, None] > p[t == 0][None, :]))

    ci = st.bootstrap_ci(auc_like, y, s, n_samples=300, seed=0)
    assert ci["point"] == 1.0 and ci["lower"] == ci["upper"] == 1.0
    assert 0 < ci["n_nan"] < 300
    # row dicts work as data too
    rows = [{"v": float(i)} for i in range(6)]
    ci_rows = st.bootstrap_ci(lambda r: np.mean([x["v"] for x in r]), rows, groups=[0, 0, 1, 1, 2, 2], seed=4)
    assert ci_rows["point"] == pytest.approx(2.5) and ci_rows["lower"] <= 2.5 <= ci_rows["upper"]
    with pytest.raises(DataError, match="differ in number of rows"):
        st.bootstrap_ci(auc_like, y, s[:4])


# --------------------------------------------------------------------------------- paired_difference_ci
def test_paired_difference_ci():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=200)
    groups = np.arange(200) // 5
    a = y.copy()  # perfect model
    b = np.where(rng.random(200) < 0.3, 1 - y, y)  # about 70 % correct

    def acc(t, p):
        return float(np.mean(t == p))

    out = st.paired_difference_ci(acc, a, b, y, groups, n_samples=400, seed=0)
    assert out["a"] == 1.0 and out["diff"] == pytest.approx(1.0 - acc(y, b))
    assert 0 < out["lower"] < out["diff"] < out["upper"]
    assert out["frac_a_better"] == 1.0
    # the differences are computed on shared resamples: the same as bootstrapping the per-row difference
    row_diff = (a == y).astype(float) - (b == y)
    ref = st.bootstrap_samples(np.mean, row_diff, groups=groups, n_samples=400, seed=0)
    assert out["lower"] == pytest.approx(np.percentile(ref, 2.5))
    assert out["upper"] == pytest.approx(np.percentile(ref, 97.5))
    same = st.paired_difference_ci(acc, b, b, y, groups, n_samples=50)
    assert same["lower"] == same["upper"] == 0.0 and same["frac_tie"] == 1.0 and same["frac_a_better"] == 0.0
    lower_better = st.paired_difference_ci(acc, b, a, y, groups, n_samples=50, higher_is_better=False)
    assert lower_better["frac_a_better"] == 1.0


# ---------------------------------------------------------------------------------------------- ranks
def test_rank_models_average_ties_match_scipy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        vals = rng.integers(0, 4, size=7).astype(float)
        scores = {f"m{i}": v for i, v in enumerate(vals)}
        got = st.rank_models(scores)
        np.testing.assert_array_equal([got[f"m{i}"] for i in range(7)], rankdata(-vals, method="average"))
        got_low = st.rank_models(scores, higher_is_better=False)
        np.testing.assert_array_equal([got_low[f"m{i}"] for i in range(7)], rankdata(vals, method="average"))


def test_rank_models_nan_last():
    scores = {"a": 0.9, "b": float("nan"), "c": 0.5, "d": float("nan"), "e": 0.9}
    assert st.rank_models(scores) == {"a": 1.5, "e": 1.5, "c": 3.0, "b": 4.5, "d": 4.5}
    assert st.rank_models(scores, higher_is_better=False) == {"c": 1.0, "a": 2.5, "e": 2.5, "b": 4.5, "d": 4.5}
    # NaN stays last even against +inf on a lower-is-better metric (HD95 can be large, never NaN-better)
    assert st.rank_models({"x": float("inf"), "y": float("nan")}, higher_is_better=False) == {"x": 1.0, "y": 2.0}


def test_bootstrap_ranks_pooled_over_metrics_and_datasets():
    rng = np.random.default_rng(1)
    models = ["A", "B", "C"]
    scores = {
        ("dice", "d1"): {m: rng.random(30) + off for m, off in zip(models, (0.5, 0.2, 0.0))},
        ("dice", "d2"): {m: np.round(rng.random(30), 1) for m in models},  # ties
        ("hd95", "d1"): {m: rng.random(30) * 10 + off for m, off in zip(models, (0.0, 5.0, 5.0))},
    }
    hib = {("dice", "d1"): True, ("dice", "d2"): True, ("hd95", "d1"): False}
    out = st.bootstrap_ranks(scores, higher_is_better=hib)
    # reference: scipy ranks per sample, pooled by hand
    pooled = {m: [] for m in models}
    for key, per_model in scores.items():
        mat = np.vstack([per_model[m] for m in models])
        for s in range(mat.shape[1]):
            r = rankdata(-mat[:, s] if hib[key] else mat[:, s], method="average")
            for i, m in enumerate(models):
                pooled[m].append(r[i])
    for m in models:
        r = np.array(pooled[m])
        assert out[m]["n"] == 90
        assert out[m]["mean"] == pytest.approx(r.mean())
        assert out[m]["median"] == pytest.approx(np.median(r))
        assert out[m]["lower"] == pytest.approx(np.percentile(r, 2.5))
        assert out[m]["upper"] == pytest.approx(np.percentile(r, 97.5))
        assert sum(out[m]["freq"].values()) == pytest.approx(1.0)
        for rank, frac in out[m]["freq"].items():
            assert frac == pytest.approx(np.mean(r == rank))
    assert list(out) == sorted(models, key=lambda m: np.mean(pooled[m]))  # ordered by mean rank
    assert list(out)[0] == "A"


def test_bootstrap_ranks_input_errors():
    with pytest.raises(DataError, match="expected"):
        st.bootstrap_ranks({"k1": {"A": [1.0], "B": [2.0]}, "k2": {"A": [1.0], "C": [2.0]}})
    with pytest.raises(DataError, match="numbers of samples"):
        st.bootstrap_ranks({"k1": {"A": [1.0, 2.0], "B": [2.0]}})
