"""Bootstrap confidence intervals, paired model comparisons and rank stability (pure numpy).

Why group-level resampling: frames of one patient (or one video) are strongly correlated, so resampling
rows would pretend to have far more independent samples than there are and give intervals that are too
narrow. :func:`bootstrap_indices` draws whole groups with replacement and returns the row indices of the
drawn groups; a group drawn twice contributes its rows twice. Every function takes a ``seed`` and uses
``numpy.random.default_rng(seed)``, so the same ``(groups, n_samples, seed)`` gives the same resamples:
different models evaluated with the same seed are compared on identical resamples (paired), which is what
seed 000's ranking-stability analysis does (1,000 samples, fixed seed, rank all models on every metric and
dataset per sample, pool the ranks).

Intervals are percentile intervals (``alpha/2`` and ``1 - alpha/2`` quantiles of the resampled statistic,
linear interpolation). A resample on which the statistic is undefined (NaN, e.g. AUROC on a resample with
one class only) is left out and counted in ``n_nan``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from meddino.errors import DataError

__all__ = [
    "bootstrap_ci",
    "bootstrap_indices",
    "bootstrap_ranks",
    "bootstrap_samples",
    "paired_difference_ci",
    "rank_models",
]


def _group_codes(groups: Sequence[Hashable] | np.ndarray | None, n_rows: int | None = None) -> np.ndarray:
    if groups is None:
        if n_rows is None:
            raise DataError("bootstrap: groups or the number of rows is needed")
        return np.arange(n_rows)
    g = np.asarray(groups)
    if g.ndim != 1:
        raise DataError(f"bootstrap: groups must be one id per row, got shape {tuple(g.shape)}")
    if n_rows is not None and g.shape[0] != n_rows:
        raise DataError(f"bootstrap: {g.shape[0]} group ids for {n_rows} rows")
    return np.unique(g, return_inverse=True)[1].ravel()


def bootstrap_indices(
    groups: Sequence[Hashable] | np.ndarray, n_samples: int = 1000, seed: int = 0
) -> list[np.ndarray]:
    """``n_samples`` resamples of the groups with replacement, each as the row indices of the drawn groups.

    Each resample draws as many groups as there are (with replacement); rows of a group stay together and
    in their original order, groups in the order drawn.
    """
    if n_samples < 1:
        raise DataError(f"bootstrap: n_samples must be >= 1, got {n_samples}")
    codes = _group_codes(groups)
    n_groups = int(codes.max()) + 1 if codes.size else 0
    if n_groups == 0:
        raise DataError("bootstrap: no rows to resample")
    order = np.argsort(codes, kind="stable")  # rows sorted by group, original order inside a group
    counts = np.bincount(codes, minlength=n_groups)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_samples):
        drawn = rng.integers(0, n_groups, size=n_groups)
        lengths = counts[drawn]
        # position inside the sorted row list: start of the drawn group + offset within it
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out.append(order[np.repeat(starts[drawn], lengths) + offsets])
    return out


def _take(data: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of an array-like (numpy array, tensor) or a list (of row dicts, ids, numbers)."""
    if hasattr(data, "shape"):
        return data[idx]
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        if len(data) and isinstance(data[0], Mapping):
            return [data[i] for i in idx]
        return np.asarray(data)[idx]
    raise DataError(f"bootstrap: cannot index data of type {type(data).__name__}")


def _n_rows(arrays: Sequence[Any]) -> int:
    if not arrays:
        raise DataError("bootstrap: no data given")
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise DataError(f"bootstrap: inputs differ in number of rows: {sorted(lengths)}")
    return lengths.pop()


def bootstrap_samples(
    values_fn: Callable[..., float],
    *arrays: Any,
    groups: Sequence[Hashable] | np.ndarray | None = None,
    n_samples: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """``values_fn(*arrays)`` recomputed on every group resample -> array ``[n_samples]`` (may hold NaN).

    ``arrays`` are numpy arrays or lists (e.g. of row dicts) with one entry per row; ``groups=None`` makes
    every row its own group.
    """
    n = _n_rows(arrays)
    codes = _group_codes(groups, n)
    return np.array(
        [float(values_fn(*(_take(a, idx) for a in arrays))) for idx in bootstrap_indices(codes, n_samples, seed)]
    )


def percentile_interval(samples: Any, alpha: float = 0.05) -> tuple[float, float, int]:
    """(lower, upper, number of NaN samples): the percentile interval over the finite samples."""
    if not 0 < alpha < 1:
        raise DataError(f"bootstrap: alpha must be in (0, 1), got {alpha}")
    samples = np.asarray(samples, dtype=np.float64)
    finite = samples[~np.isnan(samples)]
    if finite.size == 0:
        return float("nan"), float("nan"), int(samples.size)
    lo, hi = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi), int(samples.size - finite.size)


def bootstrap_ci(
    values_fn: Callable[..., float],
    *arrays: Any,
    groups: Sequence[Hashable] | np.ndarray | None = None,
    n_samples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float | int]:
    """Point estimate and percentile bootstrap interval of ``values_fn(*arrays)``.

    Returns ``{"point", "lower", "upper", "std", "n_samples", "n_nan"}``; ``point`` is the statistic on all
    rows, ``std`` the bootstrap standard error (over the finite resamples).
    """
    _n_rows(arrays)  # check the inputs before computing anything on them
    point = float(values_fn(*arrays))
    samples = bootstrap_samples(values_fn, *arrays, groups=groups, n_samples=n_samples, seed=seed)
    lo, hi, n_nan = percentile_interval(samples, alpha)
    finite = samples[~np.isnan(samples)]
    return {
        "point": point,
        "lower": lo,
        "upper": hi,
        "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
        "n_samples": int(n_samples),
        "n_nan": n_nan,
    }


def paired_difference_ci(
    metric_fn: Callable[[Any, Any], float],
    preds_a: Any,
    preds_b: Any,
    y_true: Any,
    groups: Sequence[Hashable] | np.ndarray | None = None,
    n_samples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    higher_is_better: bool = True,
) -> dict[str, float | int]:
    """Interval of ``metric_fn(y_true, preds_a) - metric_fn(y_true, preds_b)`` on shared resamples.

    The same group resamples are applied to both models (a paired bootstrap), so the variation common to
    both (which patients were drawn) cancels in the difference. ``frac_a_better`` is the fraction of the
    resamples with a defined difference where A beats B (difference > 0, or < 0 when
    ``higher_is_better=False``), ``frac_tie`` where they are equal.
    """
    n = _n_rows([preds_a, preds_b, y_true])
    codes = _group_codes(groups, n)
    point_a = float(metric_fn(y_true, preds_a))
    point_b = float(metric_fn(y_true, preds_b))
    samples_a, samples_b = [], []
    for idx in bootstrap_indices(codes, n_samples, seed):
        t = _take(y_true, idx)
        samples_a.append(float(metric_fn(t, _take(preds_a, idx))))
        samples_b.append(float(metric_fn(t, _take(preds_b, idx))))
    return paired_from_samples(np.asarray(samples_a), np.asarray(samples_b), point_a, point_b,
                               higher_is_better, alpha)


def paired_from_samples(
    a: np.ndarray, b: np.ndarray, point_a: float, point_b: float, higher_is_better: bool = True, alpha: float = 0.05
) -> dict[str, float | int]:
    """Paired difference A - B from two models' metric values on the SAME resamples: point difference,
    percentile interval, and the fractions of defined resamples where A beats / ties B."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi, n_nan = percentile_interval(d, alpha)
    finite = d[~np.isnan(d)]
    better = finite > 0 if higher_is_better else finite < 0
    return {
        "a": point_a,
        "b": point_b,
        "diff": point_a - point_b,
        "lower": lo,
        "upper": hi,
        "frac_a_better": float(better.mean()) if finite.size else float("nan"),
        "frac_tie": float((finite == 0).mean()) if finite.size else float("nan"),
        "n_samples": int(d.size),
        "n_nan": n_nan,
    }


def _average_ranks_desc(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """1 = best; ties share their average rank; NaN ranks after every number (NaNs tie among themselves)."""
    v = np.asarray(values, dtype=np.float64)
    key = -v if higher_is_better else v.copy()
    key[np.isnan(key)] = 0.0  # placeholder: NaN rows are ordered by the `nan` flag, never tied with numbers
    nan = np.isnan(v)
    order = np.lexsort((key, nan))  # NaN last, then by key
    ks, ns = key[order], nan[order]
    new = np.ones(v.size, dtype=bool)
    new[1:] = (ks[1:] != ks[:-1]) | (ns[1:] != ns[:-1])
    group = np.cumsum(new) - 1
    bounds = np.flatnonzero(np.append(new, True))
    mean_rank = (bounds[:-1] + 1 + bounds[1:]) / 2.0
    ranks = np.empty(v.size)
    ranks[order] = mean_rank[group]
    return ranks


def rank_models(scores: Mapping[str, float], higher_is_better: bool = True) -> dict[str, float]:
    """Rank models by one score: 1 = best, ties get the average rank, NaN scores rank last."""
    names = list(scores)
    ranks = _average_ranks_desc(np.array([scores[m] for m in names], dtype=np.float64), higher_is_better)
    return {m: float(r) for m, r in zip(names, ranks)}


def bootstrap_ranks(
    sample_scores: Mapping[Hashable, Mapping[str, Sequence[float] | np.ndarray]],
    higher_is_better: bool | Mapping[Hashable, bool] = True,
    alpha: float = 0.05,
) -> dict[str, dict[str, Any]]:
    """Rank stability (seed 000): rank all models per bootstrap sample per (metric, dataset), pool the ranks.

    ``sample_scores[key][model]`` is the model's score on each of the ``n_samples`` resamples for one
    ``key`` (e.g. ``("dice", "cholecseg8k")``), all models computed on the same resamples (same groups and
    seed, see :func:`bootstrap_samples`). ``higher_is_better`` is one bool or one per key (``False`` for
    HD95). Every key must hold the same models with the same number of samples.

    Returns per model, ordered by mean rank (best first): ``freq`` (rank -> fraction of the pooled ranks,
    ranks are x.5 for ties), ``mean``, ``median``, ``lower`` / ``upper`` (``alpha/2`` and ``1 - alpha/2``
    percentiles of the pooled ranks) and ``n`` (number of pooled ranks).
    """
    if not sample_scores:
        raise DataError("bootstrap_ranks: no scores given")
    models: list[str] | None = None
    pooled: dict[str, list[np.ndarray]] = {}
    for key, per_model in sample_scores.items():
        names = list(per_model)
        if models is None:
            models = names
            pooled = {m: [] for m in models}
        elif set(names) != set(models):
            raise DataError(f"bootstrap_ranks: {key!r} has models {sorted(names)}, expected {sorted(models)}")
        columns = [np.asarray(per_model[m], dtype=np.float64).reshape(-1) for m in models]
        if len({c.size for c in columns}) != 1:
            raise DataError(f"bootstrap_ranks: models of {key!r} have different numbers of samples")
        mat = np.vstack(columns)  # [models, samples]
        if isinstance(higher_is_better, Mapping):
            if key not in higher_is_better:
                raise DataError(f"bootstrap_ranks: higher_is_better has no entry for {key!r}")
            hib = bool(higher_is_better[key])
        else:
            hib = bool(higher_is_better)
        ranks = np.column_stack([_average_ranks_desc(mat[:, s], hib) for s in range(mat.shape[1])])
        for i, m in enumerate(models):
            pooled[m].append(ranks[i])
    assert models is not None
    out: dict[str, dict[str, Any]] = {}
    for m in models:
        r = np.concatenate(pooled[m])
        values, counts = np.unique(r, return_counts=True)
        lo, hi = np.percentile(r, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        out[m] = {
            "freq": {float(v): float(c / r.size) for v, c in zip(values, counts)},
            "mean": float(r.mean()),
            "median": float(np.median(r)),
            "lower": float(lo),
            "upper": float(hi),
            "n": int(r.size),
        }
    return dict(sorted(out.items(), key=lambda kv: kv[1]["mean"]))
