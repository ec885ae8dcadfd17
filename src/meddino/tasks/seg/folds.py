"""Patient-level folds of ``meddino eval seg`` under ``data.protocol``.

- ``cv``: the manifest's split or fold column, else k-fold CV. Every patient is tested exactly once; each
  fold's training patients lose ``data.val_fraction`` of themselves to a validation set for model selection.
- ``seed000`` (seed 000's segmentation protocol): one fixed test set (:func:`fixed_test`), and ``data.folds``
  patient-level folds of the other patients, fold k validating on the k-th fifth and training on the rest
  (80/20); every fold tests the same patients.
- ``fewshot`` uses :func:`fixed_test` too; its draws are in :mod:`.fewshot`.

Every fold built here, whatever its source, goes through :func:`meddino.data.splits.check_no_leak`. Kept
apart from the layouts (:mod:`meddino.data.seg_layouts`), which know files, and from the torch dataset
(:mod:`.data`).
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


def hold_out(ids: Sequence[str], fraction: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(kept, held out): ``ceil(fraction * n)`` of the sorted patients, at least one, drawn by ``rng``'s
    permutation; at least one is kept. Needs two patients or more."""
    ids = sorted(ids)
    n_out = min(max(1, math.ceil(fraction * len(ids))), len(ids) - 1)
    out = set(ids[j] for j in rng.permutation(len(ids))[:n_out])
    return [p for p in ids if p not in out], sorted(out)


def split_val(train: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out ``ceil(fraction * n)`` training patients for model selection (at least one patient stays
    for training; with a single training patient, validation uses the training patient itself).
    ``fraction`` 0: no validation set (the fold keeps its last epoch)."""
    ids = sorted(train)
    if fraction <= 0:
        return ids, []
    if len(ids) < 2:
        return ids, list(ids)
    return hold_out(ids, fraction, np.random.default_rng(seed))


def fixed_test(data: SegData, cfg: SegDataConfig, seed: int) -> tuple[list[str], list[str]]:
    """(pool, test): the fixed test patients of ``data.protocol=seed000|fewshot`` and the others.

    With ``data.split_column`` the test rows are the test set and the train and val rows together the pool
    (the protocol draws its own validation folds); else ``ceil(data.test_fraction * patients)`` patients,
    at least one, drawn with ``seed`` (:func:`hold_out`), at least one left in the pool."""
    if cfg.split_column:
        _check_column(data, cfg.split_column, "split_column", ("train", "val", "test"), cfg.manifest)
        test = sorted({c.patient for c in data.cases if c.split == "test"})
        pool = sorted({c.patient for c in data.cases if c.split in ("train", "val")})
        where = f"data.split_column '{cfg.split_column}' in {cfg.manifest}"
        if not test or not pool:
            raise DataError(f"{where}: data.protocol={cfg.protocol} needs test rows (the fixed test set) and "
                            "train or val rows")
    else:
        ids = sorted(data.patients)
        if len(ids) < 2:
            raise DataError(f"{len(ids)} patient(s): data.protocol={cfg.protocol} needs at least two (test + train)")
        pool, test = hold_out(ids, cfg.test_fraction, np.random.default_rng([seed, 1]))
        where = f"data.test_fraction {cfg.test_fraction} of data.protocol={cfg.protocol}"
    check_no_leak({"train": pool, "test": test}, where=where)
    return pool, test


def _check_column(data: SegData, column: str, key: str, sides: Sequence[str], manifest: str | None) -> None:
    """No patient in two of the column's ``sides`` (splits, or ``fold<k>``), its rows named by image."""
    cases = {s.replace("fold", "fold "): [c for c in data.cases if c.split == s] for s in sides}
    check_no_leak({s: [c.patient for c in cs] for s, cs in cases.items()},
                  where=f"data.{key} '{column}' in {manifest}", name_of=lambda s, j: cases[s][j].id)


def seed000_folds(data: SegData, cfg: SegDataConfig, seed: int) -> list[Fold]:
    """Seed 000: the fixed test set (:func:`fixed_test`) and ``data.folds`` patient-level folds of the pool;
    fold k validates on the k-th of the pool's :func:`patient_folds` (disjoint, together the whole pool) and
    trains on the rest. ``data.val_fraction`` is not used."""
    pool, test = fixed_test(data, cfg, seed)
    if len(pool) < cfg.folds:
        raise DataError(f"{len(pool)} patient(s) left beside the {len(test)} test patient(s) cannot make "
                        f"{cfg.folds} folds (lower data.folds or data.test_fraction)")
    vals = patient_folds(pool, cfg.folds, seed)
    folds = [Fold(i, [p for p in pool if p not in set(val)], val, test) for i, val in enumerate(vals)]
    check_no_leak({f"val of fold {i}": v for i, v in enumerate(vals)}, where="data.protocol=seed000")
    return folds


def _check_folds(folds: Sequence[Fold], protocol: str) -> None:
    """No patient on two sides of any fold (:func:`check_no_leak`, whatever built the fold); a fold whose
    single training patient validates on itself (:func:`split_val`) is checked as train + test."""
    for f in folds:
        sides = {"train": f.train, "val": f.val, "test": f.test}
        if f.val == f.train:
            del sides["val"]
        check_no_leak(sides, where=f"fold {f.index} of data.protocol={protocol}")


def make_folds(data: SegData, cfg: SegDataConfig, seed: int) -> list[Fold]:
    """The folds of ``data.protocol`` (``fewshot`` has none: see :mod:`.fewshot`), ``data.run_folds`` kept."""
    if cfg.protocol == "fewshot":
        raise ConfigError("data.protocol=fewshot has draws, not folds")
    folds = seed000_folds(data, cfg, seed) if cfg.protocol == "seed000" else _cv_folds(data, cfg, seed)
    _check_folds(folds, cfg.protocol)
    if cfg.run_folds is not None:
        bad = [f for f in cfg.run_folds if not 0 <= f < len(folds)]
        if bad:
            raise ConfigError(f"data.run_folds: fold {bad[0]} out of range 0..{len(folds) - 1}")
        folds = [f for f in folds if f.index in set(cfg.run_folds)]
    return folds


def _cv_folds(data: SegData, cfg: SegDataConfig, seed: int) -> list[Fold]:
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
    return folds
