"""Patient-level folds of ``meddino eval seg``: the manifest's split or fold column, else k-fold CV.

Every patient is tested exactly once; each fold's training patients lose ``data.val_fraction`` of
themselves to a validation set for model selection. Kept apart from the layouts
(:mod:`meddino.data.seg_layouts`), which know files, and from the torch dataset (:mod:`.data`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from meddino.data.seg_layouts import SegData
from meddino.data.splits import check_no_leak, patient_kfold
from meddino.errors import ConfigError, DataError
from meddino.tasks.seg.config import SegDataConfig


@dataclass
class Fold:
    """One fold: the patients it trains on, selects the model on (val) and tests."""

    index: int
    train: list[str]
    val: list[str]
    test: list[str]


def patient_folds(patients: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """Patient-level k-fold test sets (seed 000: 5 folds, 80/20), from :func:`meddino.data.splits.patient_kfold`.

    Every patient is in exactly one test set; set sizes differ by at most one.
    """
    ids = sorted(set(patients))
    if len(ids) < k:
        raise DataError(f"{len(ids)} patient(s) cannot make {k} folds (lower data.folds)")
    fold = patient_kfold(ids, None, k, seed)
    return [[p for p, f in zip(ids, fold) if f == i] for i in range(k)]


def split_val(train: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out ``ceil(fraction * n)`` training patients for model selection (at least one patient stays
    for training; with a single training patient, validation uses the training patient itself)."""
    ids = sorted(train)
    if fraction <= 0 or len(ids) < 2:
        return ids, list(ids)
    n_val = min(max(1, math.ceil(fraction * len(ids))), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[j] for j in order[:n_val])
    return [p for p in ids if p not in set(val)], val


def _check_column(data: SegData, column: str, key: str, sides: Sequence[str], manifest: str | None) -> None:
    """No patient in two of the column's ``sides`` (splits, or ``fold<k>``), its rows named by image."""
    cases = {s.replace("fold", "fold "): [c for c in data.cases if c.split == s] for s in sides}
    check_no_leak({s: [c.patient for c in cs] for s, cs in cases.items()},
                  where=f"data.{key} '{column}' in {manifest}", name_of=lambda s, j: cases[s][j].id)


def make_folds(data: SegData, cfg: SegDataConfig, seed: int) -> list[Fold]:
    """Folds from the manifest's split or fold column if given (a patient on two sides of either is refused),
    else patient-level k-fold CV."""
    if cfg.split_column:
        _check_column(data, cfg.split_column, "split_column", ("train", "val", "test"), cfg.manifest)
        by = {s: sorted({c.patient for c in data.cases if c.split == s}) for s in ("train", "val", "test")}
        if not by["train"] or not by["test"]:
            raise DataError(f"data.split_column '{cfg.split_column}': needs train and test rows")
        val = by["val"]
        train = by["train"]
        if not val:
            train, val = split_val(train, cfg.val_fraction, seed)
        return [Fold(0, train, val, by["test"])]
    if cfg.fold_column:
        fold_ids = sorted({int(c.split[4:]) for c in data.cases})
        if len(fold_ids) < 2:
            raise DataError(f"data.fold_column '{cfg.fold_column}' in {cfg.manifest}: needs at least two folds")
        _check_column(data, cfg.fold_column, "fold_column", [f"fold{f}" for f in fold_ids], cfg.manifest)
        by_fold = {f: sorted({c.patient for c in data.cases if c.split == f"fold{f}"}) for f in fold_ids}
        test_sets = [by_fold[f] for f in fold_ids]
    else:
        test_sets = patient_folds(data.patients, cfg.folds, seed)
    folds = []
    for i, test in enumerate(test_sets):
        rest = [p for p in data.patients if p not in set(test)]
        train, val = split_val(rest, cfg.val_fraction, seed + i)
        folds.append(Fold(i, train, val, test))
    if cfg.run_folds is not None:
        bad = [f for f in cfg.run_folds if not 0 <= f < len(folds)]
        if bad:
            raise ConfigError(f"data.run_folds: fold {bad[0]} out of range 0..{len(folds) - 1}")
        folds = [f for f in folds if f.index in set(cfg.run_folds)]
    return folds
