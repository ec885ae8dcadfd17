"""Patient-level splits: k folds stratified by label where possible, and the leak check every evaluation runs.

Images of one patient are correlated (same anatomy, same scanner, often the same finding), so a patient in
both the training and the test side inflates every metric. All splitting here is done on patients, never on
images, and :func:`check_no_leak` refuses any split in which a patient appears on two sides.

Folds come from scikit-learn's ``StratifiedGroupKFold`` (shuffled, seeded): every patient lands in exactly
one fold, and the label distribution of the folds is kept as close to the whole as the patient grouping
allows. Multi-label rows are stratified on their rarest positive label (or "none"), a common proxy that
keeps rare findings spread over the folds. When stratification is impossible (a class with fewer patients
than folds) the folds fall back to plain ``GroupKFold`` behaviour through the same call (scikit-learn only
warns), so the split always exists as long as there are at least ``k`` patients.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from meddino.errors import DataError

__all__ = ["check_no_leak", "patient_holdout", "patient_index", "patient_kfold", "patient_majority",
           "single_sample_classes", "stratification_key"]


def stratification_key(labels: np.ndarray) -> np.ndarray:
    """One stratum per row: the label for single-label data; for multi-hot ``[N, L]`` rows the index of the
    rarest positive label (``L`` for rows without any positive)."""
    y = np.asarray(labels)
    if y.ndim == 1:
        return y
    if y.ndim != 2:
        raise DataError(f"labels must be [N] or [N, L], got shape {tuple(y.shape)}")
    freq = y.sum(axis=0).astype(np.float64)
    rarity = np.where(y > 0, freq[None, :], np.inf)
    key = rarity.argmin(axis=1)
    key[~(y > 0).any(axis=1)] = y.shape[1]
    return key


def single_sample_classes(labels: np.ndarray, names: Sequence[str]) -> list[tuple[str, int]]:
    """(class name, its one row) for every class that has exactly one sample: a class column with a single
    positive for multi-hot ``[N, L]`` labels, a class index that occurs once for ``[N]`` labels. Such a class
    can be on one side of a split only: it is never both learnt and tested, its AUROC is undefined in every
    fold but one, and folds cannot be stratified on it."""
    y = np.asarray(labels)
    if y.ndim == 2:
        counts = (y > 0).sum(axis=0)
        return [(str(names[c]), int(np.flatnonzero(y[:, c] > 0)[0])) for c in np.flatnonzero(counts == 1)]
    values, counts = np.unique(y, return_counts=True)
    return [(str(names[int(v)]) if 0 <= int(v) < len(names) else str(v), int(np.flatnonzero(y == v)[0]))
            for v in values[counts == 1]]


def patient_index(patients: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique patients in order of first appearance, and each row's index into them (O(N log N))."""
    ids = np.asarray(patients).astype(str)
    uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    remap = np.empty_like(order)
    remap[order] = np.arange(order.size)
    return uniq[order], remap[inverse.ravel()]


def patient_majority(inverse: np.ndarray, n_patients: int, key: np.ndarray) -> np.ndarray:
    """Per patient, the most frequent ``key`` among its rows (ties: the smallest key), without a loop over
    patients (NIH ChestX-ray14 has 30k patients and 112k rows)."""
    values, codes = np.unique(np.asarray(key), return_inverse=True)
    counts = np.zeros((n_patients, values.size), dtype=np.int64)
    np.add.at(counts, (inverse, codes.ravel()), 1)
    return values[counts.argmax(axis=1)]  # argmax keeps the first (smallest) of equal counts


def _patient_strata(patients: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique patients (first-appearance order), their stratum (most frequent key of their rows), inverse."""
    uniq, inverse = patient_index(patients)
    strata = patient_majority(inverse, uniq.size, key)
    return uniq, strata.astype(str), inverse


def patient_kfold(
    patients: Sequence | np.ndarray, labels: np.ndarray | None = None, k: int = 5, seed: int = 0
) -> np.ndarray:
    """Fold index (0..k-1) per row; all rows of a patient share a fold; stratified by label when given.

    Deterministic for a given (patients, labels, k, seed). Raises :class:`DataError` with fewer than ``k``
    patients.
    """
    from sklearn.model_selection import StratifiedGroupKFold  # why: sklearn takes ~1.5 s; only k-fold needs it

    ids = np.asarray(patients).astype(str)
    if ids.ndim != 1:
        raise DataError("patients must be a 1-D sequence of ids")
    if k < 2:
        raise DataError(f"k must be at least 2, got {k}")
    uniq, strata, inverse = _patient_strata(ids, np.zeros(ids.size, int) if labels is None
                                            else stratification_key(np.asarray(labels)))
    if uniq.size < k:
        raise DataError(f"cannot make {k} patient-level folds from {uniq.size} patients")
    # Split the patients themselves (one row each), then broadcast the fold back to the images.
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold_of_patient = np.full(uniq.size, -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only n members"
        for f, (_, test) in enumerate(splitter.split(np.zeros(uniq.size), strata, groups=np.arange(uniq.size))):
            fold_of_patient[test] = f
    return fold_of_patient[inverse]


def patient_holdout(
    patients: Sequence | np.ndarray, labels: np.ndarray | None = None, fraction: float = 0.2, seed: int = 0
) -> np.ndarray:
    """Boolean mask of rows held out (e.g. a validation set carved from training data), patient-level and
    stratified: the held-out part is the first of ``round(1 / fraction)`` stratified patient folds."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"holdout fraction must be in (0, 1), got {fraction}")
    ids = np.asarray(patients).astype(str)
    n_patients = np.unique(ids).size
    if n_patients < 2:
        raise DataError(f"cannot hold out patients from a set of {n_patients} patient(s)")
    k = int(min(max(2, round(1.0 / fraction)), n_patients))
    return patient_kfold(ids, labels, k=k, seed=seed) == 0


def check_no_leak(sides: Mapping[str, Sequence | np.ndarray], where: str = "split") -> None:
    """Refuse a split where a patient appears on two sides (e.g. ``{"train": ids, "val": ids, "test": ids}``).

    Raises :class:`DataError` naming the first shared patient and the two sides.
    """
    seen: dict[str, str] = {}
    for side, ids in sides.items():
        for pid in dict.fromkeys(np.asarray(ids).astype(str).tolist()):
            other = seen.get(pid)
            if other is not None and other != side:
                raise DataError(f"{where}: patient {pid} appears in both {other} and {side} (patient-level leak)")
            seen[pid] = side
