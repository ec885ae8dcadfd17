"""Classification metrics: AUROC, accuracy, balanced accuracy, macro-F1, patient aggregation, fold summaries.

Pure numpy functions (arrays in, Python floats / dicts out, no I/O), so evaluation, the report and the
bootstrap call the same code. Definitions, and where they are checked:

- **AUROC** is computed with the rank (Mann-Whitney U) formula, ties sharing the average rank:
  ``AUC = (sum of ranks of positives - P (P + 1) / 2) / (P N)``. This equals the trapezoidal area under the
  ROC curve that ``sklearn.metrics.roc_auc_score`` computes (the test reference) and needs one sort per
  column, which keeps 1,000 bootstrap resamples cheap.

  * ``task="binary"``: ``y_true`` in {0, 1}, scores ``[N]`` or ``[N, 2]`` (column 1 is the positive class).
  * ``task="multiclass"``: one-vs-rest per class, macro average; scores ``[N, C]`` must be probabilities
    (rows summing to 1, as scikit-learn also requires), because the one-vs-rest AUC of column ``c`` changes
    with a softmax: logits and probabilities give different numbers.
  * ``task="multilabel"``: ``y_true`` ``[N, L]`` in {0, 1}, AUC per label column, macro average.

  A class / label column whose ground truth holds a single class has no AUC (scikit-learn returns NaN for
  it with a warning, so its macro average is NaN; older versions raise). Here it is NaN in the per-class
  values, listed in ``auroc_skipped``, and the macro average is taken over the defined columns only; if
  none is defined the macro value is NaN.
- **Predicted labels** from scores (:func:`predict_labels`): binary ``score >= threshold`` (column 1 of
  ``[N, 2]`` scores), multi-class ``argmax``, multi-label ``score >= threshold`` per label.
- **accuracy**: fraction of correct labels. For multi-label indicator arrays it is the per-label accuracy
  averaged over labels (``1 - Hamming loss``), not the strict subset accuracy.
- **balanced_accuracy**: mean recall over the classes present in ``y_true`` (scikit-learn's
  ``balanced_accuracy_score``). Multi-label: the binary balanced accuracy of each label column, averaged over
  the label columns.
- **macro_f1**: F1 per class averaged over the classes present in ``y_true`` or ``y_pred``, F1 = 0 where
  ``2 TP + FP + FN = 0`` (``zero_division=0``); this is
  ``sklearn.metrics.f1_score(average="macro", zero_division=0)``. Binary tasks therefore average the F1 of
  both classes. Multi-label: the positive-class F1 of every label column averaged over all ``L`` columns
  (scikit-learn's multi-label macro, so a label never present nor predicted counts as 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from meddino.errors import ConfigError, DataError

Task = Literal["binary", "multiclass", "multilabel"]
TASKS: tuple[str, ...] = ("binary", "multiclass", "multilabel")

__all__ = [
    "TASKS",
    "accuracy",
    "aggregate_by_patient",
    "auroc",
    "auroc_per_class",
    "balanced_accuracy",
    "classification_metrics",
    "macro_f1",
    "predict_labels",
    "summarize_folds",
]


# --------------------------------------------------------------------------------------------- helpers
def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, tied values sharing the mean of their ranks (scipy ``rankdata``)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_value = np.empty(xs.shape[0], dtype=bool)
    new_value[:1] = True
    new_value[1:] = xs[1:] != xs[:-1]
    group = np.cumsum(new_value) - 1
    bounds = np.flatnonzero(np.append(new_value, True))  # start of each tie group, then len(x)
    mean_rank = (bounds[:-1] + 1 + bounds[1:]) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(x.shape[0], dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def _binary_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUC of scores ``s`` for positives ``y == 1``; NaN when one class is missing."""
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _as_binary_labels(y: np.ndarray, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype == bool:
        return y
    if y.size and not np.isin(y, (0, 1)).all():
        bad = y[~np.isin(y, (0, 1))].ravel()[0]
        raise DataError(f"{what}: labels must be 0 or 1, found {bad!r}")
    return y.astype(bool)


def _as_class_labels(y: np.ndarray, what: str, num_classes: int | None = None) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{what}: expected a 1-D array of class indices, got shape {tuple(y.shape)}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise DataError(f"{what}: class labels must be integers")
        y = y.astype(np.int64)
    if y.size and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        bad = y[(y < 0) | (y >= (num_classes if num_classes is not None else np.inf))][0]
        raise DataError(f"{what}: class label {int(bad)} out of range [0, {num_classes})")
    return y


def _finite_scores(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    if not np.isfinite(s).all():
        raise DataError("y_score: scores contain NaN or inf")
    return s


# ----------------------------------------------------------------------------------------------- AUROC
def auroc_per_class(y_true: np.ndarray, y_score: np.ndarray, task: Task) -> np.ndarray:
    """AUROC per class (multi-class, one-vs-rest) or per label (multi-label); ``[1]`` for binary.

    Columns whose ground truth contains a single class are NaN (undefined, see the module docstring).
    """
    _check_task(task)
    s = _finite_scores(y_score)
    if task == "binary":
        y = _as_binary_labels(y_true, "y_true")
        if y.ndim != 1:
            raise DataError(f"y_true: binary labels must be 1-D, got shape {tuple(y.shape)}")
        if s.ndim == 2 and s.shape[1] == 2:
            s = s[:, 1]
        if s.ndim != 1 or s.shape[0] != y.shape[0]:
            raise DataError(f"y_score: expected shape ({y.shape[0]},) or ({y.shape[0]}, 2), got {tuple(s.shape)}")
        return np.array([_binary_auc(y, s)])
    if task == "multiclass":
        if s.ndim != 2:
            raise DataError(f"y_score: multiclass scores must be [N, C], got shape {tuple(s.shape)}")
        y = _as_class_labels(y_true, "y_true", num_classes=s.shape[1])
        if s.shape[0] != y.shape[0]:
            raise DataError(f"y_score: {s.shape[0]} rows but y_true has {y.shape[0]}")
        if not np.allclose(s.sum(axis=1), 1.0, atol=1e-3):
            raise DataError("y_score: multiclass AUROC needs probabilities (rows summing to 1); apply softmax first")
        return np.array([_binary_auc(y == c, s[:, c]) for c in range(s.shape[1])])
    # multilabel
    y = _as_binary_labels(y_true, "y_true")
    if y.ndim != 2 or s.shape != y.shape:
        raise DataError(
            "multilabel AUROC needs y_true and y_score of the same shape [N, L], "
            f"got {tuple(y.shape)} and {tuple(s.shape)}"
        )
    return np.array([_binary_auc(y[:, j], s[:, j]) for j in range(y.shape[1])])


def auroc(y_true: np.ndarray, y_score: np.ndarray, task: Task) -> float:
    """Macro AUROC over the classes / labels where it is defined (NaN if none); see :func:`auroc_per_class`."""
    per = auroc_per_class(y_true, y_score, task)
    defined = per[~np.isnan(per)]
    return float(defined.mean()) if defined.size else float("nan")


# ------------------------------------------------------------------------------------ label-based metrics
def predict_labels(y_score: np.ndarray, task: Task, threshold: float = 0.5) -> np.ndarray:
    """Scores -> labels: binary/multi-label ``score >= threshold``; multi-class ``argmax``."""
    _check_task(task)
    s = _finite_scores(y_score)
    if task == "binary":
        if s.ndim == 2 and s.shape[1] == 2:
            s = s[:, 1]
        if s.ndim != 1:
            raise DataError(f"y_score: binary scores must be [N] or [N, 2], got shape {tuple(s.shape)}")
        return (s >= threshold).astype(np.int64)
    if task == "multiclass":
        if s.ndim != 2:
            raise DataError(f"y_score: multiclass scores must be [N, C], got shape {tuple(s.shape)}")
        return s.argmax(axis=1)
    if s.ndim != 2:
        raise DataError(f"y_score: multilabel scores must be [N, L], got shape {tuple(s.shape)}")
    return (s >= threshold).astype(np.int64)


def _pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape:
        raise DataError(f"y_true and y_pred differ in shape: {tuple(t.shape)} vs {tuple(p.shape)}")
    if t.ndim == 2:
        return _as_binary_labels(t, "y_true"), _as_binary_labels(p, "y_pred")
    return _as_class_labels(t, "y_true"), _as_class_labels(p, "y_pred")


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of correct labels; for ``[N, L]`` indicator arrays the mean per-label accuracy."""
    t, p = _pair(y_true, y_pred)
    return float((t == p).mean()) if t.size else float("nan")


def _balanced_1d(t: np.ndarray, p: np.ndarray) -> float:
    recalls = [float((p[t == c] == c).mean()) for c in np.unique(t)]
    return float(np.mean(recalls)) if recalls else float("nan")


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over classes present in ``y_true``; multi-label: per-label value averaged over labels."""
    t, p = _pair(y_true, y_pred)
    if t.ndim == 2:
        return float(np.mean([_balanced_1d(t[:, j], p[:, j]) for j in range(t.shape[1])]))
    return _balanced_1d(t, p)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros(tp.shape, dtype=np.float64), where=denom > 0)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro F1 as scikit-learn's ``f1_score(average="macro", zero_division=0)`` (see module docstring)."""
    t, p = _pair(y_true, y_pred)
    if t.ndim == 2:
        tp = (t & p).sum(axis=0)
        fp = (~t & p).sum(axis=0)
        fn = (t & ~p).sum(axis=0)
        return float(_f1(tp, fp, fn).mean()) if t.shape[1] else float("nan")
    classes = np.union1d(t, p)
    if classes.size == 0:
        return float("nan")
    tp = np.array([np.sum((t == c) & (p == c)) for c in classes])
    fp = np.array([np.sum((t != c) & (p == c)) for c in classes])
    fn = np.array([np.sum((t == c) & (p != c)) for c in classes])
    return float(_f1(tp, fp, fn).mean())


def classification_metrics(
    y_true: np.ndarray, y_score: np.ndarray, task: Task, threshold: float = 0.5
) -> dict[str, float | list[float] | list[int]]:
    """All classification metrics of one evaluation as a JSON-ready dict.

    Keys: ``auroc`` (macro over defined columns), ``auroc_per_class`` (NaN where undefined), ``auroc_skipped``
    (indices of undefined columns), ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``n`` (rows).
    """
    per = auroc_per_class(y_true, y_score, task)
    defined = per[~np.isnan(per)]
    y_pred = predict_labels(y_score, task, threshold)
    y = np.asarray(y_true)
    if task == "binary":
        y = _as_binary_labels(y, "y_true").astype(np.int64)
    return {
        "auroc": float(defined.mean()) if defined.size else float("nan"),
        "auroc_per_class": [float(v) for v in per],
        "auroc_skipped": [int(i) for i in np.flatnonzero(np.isnan(per))],
        "accuracy": accuracy(y, y_pred),
        "balanced_accuracy": balanced_accuracy(y, y_pred),
        "macro_f1": macro_f1(y, y_pred),
        "n": int(y.shape[0]),
    }


# ------------------------------------------------------------------------------ patients and folds
def aggregate_by_patient(
    patient_ids: Sequence | np.ndarray,
    y_true: np.ndarray,
    y_score: np.ndarray,
    reduce: Literal["mean", "max"] = "mean",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per patient: scores reduced over the patient's rows (``mean`` or ``max``).

    Single-label tasks (``y_true`` 1-D): every row of a patient must carry the same label, else
    :class:`DataError` naming the patient. Multi-label (``y_true`` ``[N, L]``): the patient's label is the
    per-column maximum (a finding seen on any image of the patient is a finding of the patient).
    Patients come out in order of first appearance. Mean of probabilities stays a probability.
    """
    if reduce not in ("mean", "max"):
        raise ConfigError(f"reduce: expected 'mean' or 'max', got {reduce!r}")
    ids = np.asarray(patient_ids)
    t = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    n = ids.shape[0]
    if ids.ndim != 1 or t.shape[0] != n or s.shape[0] != n:
        raise DataError(
            f"patient_ids, y_true and y_score need the same number of rows: {n}, {t.shape[0]}, {s.shape[0]}"
        )
    patients, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # first-appearance order
    patients = patients[order]
    remap = np.empty_like(order)
    remap[order] = np.arange(order.size)
    inverse = remap[inverse.ravel()]

    out_t, out_s = [], []
    for g, pid in enumerate(patients):
        rows = inverse == g
        tg, sg = t[rows], s[rows]
        if t.ndim == 1:
            if not (tg == tg[0]).all():
                raise DataError(f"patient {pid}: rows carry different labels {sorted(set(tg.tolist()))}")
            out_t.append(tg[0])
        else:
            out_t.append(tg.max(axis=0))
        out_s.append(sg.mean(axis=0) if reduce == "mean" else sg.max(axis=0))
    return patients, np.asarray(out_t, dtype=t.dtype), np.asarray(out_s)


def summarize_folds(fold_metrics: Sequence[Mapping[str, object]]) -> dict[str, dict[str, object]]:
    """``{metric: {"mean", "std", "values", "n"}}`` over folds, for every scalar numeric metric.

    ``std`` is the sample standard deviation (``ddof=1``, what "mean +/- std over folds" reports in the seed
    papers) when at least two folds have a finite value, else 0.0. NaN values (an undefined metric in one
    fold) stay in ``values`` but are left out of mean/std; ``n`` counts the finite values. Non-scalar entries
    (per-class lists) are skipped. A metric missing in some fold is an error naming it.
    """
    if not fold_metrics:
        raise DataError("summarize_folds: no folds given")
    keys = [k for k, v in fold_metrics[0].items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)]
    out: dict[str, dict[str, object]] = {}
    for key in keys:
        values = []
        for i, fold in enumerate(fold_metrics):
            if key not in fold:
                raise DataError(f"summarize_folds: metric {key!r} missing in fold {i}")
            values.append(float(fold[key]))  # type: ignore[arg-type]
        arr = np.asarray(values)
        finite = arr[np.isfinite(arr)]
        mean = float(finite.mean()) if finite.size else float("nan")
        std = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
        out[key] = {"mean": mean, "std": std, "values": values, "n": int(finite.size)}
    return out
