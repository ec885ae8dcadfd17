"""Patient-level splits: k folds stratified by label where possible, and the leak check every evaluation runs.

Images of one patient are correlated (same anatomy, same scanner, often the same finding), so a patient in
both the training and the test side inflates every metric. All splitting here is done on patients, never on
images, and :func:`check_no_leak`, the one validator of every split a user gives (split or fold column,
video lists, a fixed test set), refuses any split in which a patient appears on two sides.

Folds come from scikit-learn's ``StratifiedGroupKFold`` (shuffled, seeded): every patient lands in exactly
one fold, and the label distribution of the folds is kept as close to the whole as the patient grouping
allows. Multi-label rows are stratified on their rarest positive label (or "none"), a common proxy that
keeps rare findings spread over the folds. When stratification is impossible (a class with fewer patients
than folds) the folds fall back to plain ``GroupKFold`` behaviour through the same call (scikit-learn only
warns), so the split always exists as long as there are at least ``k`` patients.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

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


def check_no_leak(sides: Mapping[str, Sequence | np.ndarray], where: str,
                  name_of: Callable[[str, int], str] | None = None) -> None:
    """THE patient-split validator: refuse a split in which one patient is on two sides.

    Every path that takes a user's split or folds calls it (classification and few-shot units, segmentation's
    ``data.split_column`` / ``data.fold_column``, phase's split column and video lists), and so must any
    fixed test set, so that the rule and its message are one. ``sides`` maps a side (``"train"``,
    ``"fold 2"``) to the patient of each of its entries; ``where`` names the split (its column or key and its
    file); ``name_of(side, j)``, if given, names entry ``j`` of a side (a CSV line, a video), so that the user
    can find the rows. Raises :class:`DataError`, e.g. ``patient P07 is in both train and test
    (data.split_column 'split' in m.csv: CSV line 4 in train, CSV line 9 in test)``, for the first such patient
    in the order of ``sides``. Vectorised: NIH ChestX-ray14 has 112k rows.
    """
    names = list(sides)
    ids = [np.asarray(sides[s]).astype(str).ravel() for s in names]
    sizes = np.array([a.size for a in ids], dtype=np.int64)
    if sizes.sum() == 0:
        return
    code = np.repeat(np.arange(len(names)), sizes)
    uniq, inverse = patient_index(np.concatenate(ids))
    lo = np.full(uniq.size, len(names), dtype=np.int64)
    hi = np.full(uniq.size, -1, dtype=np.int64)
    np.minimum.at(lo, inverse, code)
    np.maximum.at(hi, inverse, code)
    leaked = np.flatnonzero(lo != hi)  # patients in first-appearance order
    if leaked.size == 0:
        return
    entries = np.flatnonzero(inverse == leaked[0])
    first = entries[0]
    second = entries[code[entries] != code[first]][0]
    a, b = names[code[first]], names[code[second]]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    found = ""
    if name_of is not None:
        found = (f": {name_of(a, int(first - offsets[code[first]]))} in {a}, "
                 f"{name_of(b, int(second - offsets[code[second]]))} in {b}")
    more = f"; {leaked.size - 1} more patient(s) are on two sides too" if leaked.size > 1 else ""
    raise DataError(f"patient {uniq[leaked[0]]} is in both {a} and {b} ({where}{found}){more}")
