"""Evaluation units: the (train, val, test) row sets one protocol runs on, from a split or a fold column.

- ``split`` column: one unit; ``train`` / ``val`` / ``test`` rows as given. If the protocol needs a validation
  set and the manifest has none, a stratified patient-level share (``val_fraction``) of the training patients
  is held out.
- ``fold`` column (k-fold cross-validation with fixed folds): k units; fold f is the test set, fold f+1
  (cyclically) the validation set when one is needed (with fewer than 3 folds it is carved from the training
  folds instead), the rest is training data.

The column a scheme uses is checked for patient-level leaks (:func:`meddino.data.splits.check_no_leak`: a
patient in two splits or two folds) before any unit is made; units are unions of its sides plus a
patient-level validation carve-out, so no unit can then share a patient between its sides.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from meddino.data.manifest import Manifest
from meddino.data.splits import check_no_leak, patient_holdout, single_sample_classes
from meddino.errors import DataError


@dataclass(frozen=True)
class Unit:
    name: str  # "test" (split scheme) or "fold<k>"
    train: np.ndarray  # row indices
    val: np.ndarray
    test: np.ndarray


def make_units(
    m: Manifest, need_val: bool, scheme: str = "auto", val_fraction: float = 0.2, seed: int = 0
) -> list[Unit]:
    where = f"manifest {m.source}" if m.source else "manifest"
    use_folds = scheme == "folds" or (scheme == "auto" and m.fold is not None)
    if use_folds and m.fold is None:
        raise DataError(f"{where}: data.scheme=folds needs a 'fold' column (make one with `meddino data split`)")
    if not use_folds and m.split is None:
        raise DataError(f"{where}: needs a 'split' (train/val/test) or 'fold' column "
                        "(make folds with `meddino data split`)")
    rows = np.arange(len(m))
    units: list[Unit] = []
    if use_folds:
        assert m.fold is not None
        folds = sorted(set(m.fold.tolist()))
        if len(folds) < 2:
            raise DataError(f"{where}: the fold column has {len(folds)} fold(s); need at least 2")
        _check_column(m, "fold", {f"fold {f}": rows[m.fold == f] for f in folds}, where)
        for i, f in enumerate(folds):
            test = rows[m.fold == f]
            val = rows[m.fold == folds[(i + 1) % len(folds)]] if need_val and len(folds) >= 3 else rows[:0]
            train = rows[(m.fold != f) & ~np.isin(rows, val)]
            units.append(_finish(m, f"fold{f}", train, val, test, need_val, val_fraction, seed, where))
    else:
        assert m.split is not None
        sides = {s: rows[m.split == s] for s in ("train", "val", "test")}
        _check_column(m, "split", sides, where)
        for s in ("train", "test"):
            if sides[s].size == 0:
                raise DataError(f"{where}: split '{s}' is empty")
        units.append(_finish(m, "test", sides["train"], sides["val"], sides["test"], need_val, val_fraction,
                             seed, where))
    return units


def warn_single_sample_classes(m: Manifest, where: str) -> None:
    """One warning line per run when a class has a single sample (see :func:`single_sample_classes`)."""
    single = single_sample_classes(m.labels, m.names)
    if single:
        print(f"meddino: warning: {where}: {describe_single_sample_classes(single)}; each is tested in one unit "
              "at most and never learnt there, and its AUROC is undefined elsewhere", file=sys.stderr)


def describe_single_sample_classes(single: list[tuple[str, int]], show: int = 3) -> str:
    """"N class(es) with a single sample: 'name' (CSV line L), ..." for :func:`single_sample_classes`'s list."""
    listed = ", ".join(f"'{name}' (CSV line {row + 2})" for name, row in single[:show])
    more = f" and {len(single) - show} more" if len(single) > show else ""
    return f"{len(single)} class(es) with a single sample: {listed}{more}"


def _check_column(m: Manifest, column: str, sides: dict[str, np.ndarray], where: str) -> None:
    """No patient on two sides of the ``split`` or ``fold`` column (rows named by CSV line)."""
    check_no_leak({s: m.patients[r] for s, r in sides.items()}, where=f"column '{column}' in {where}",
                  name_of=lambda s, j: f"CSV line {int(sides[s][j]) + 2}")


def _finish(m: Manifest, name: str, train: np.ndarray, val: np.ndarray, test: np.ndarray, need_val: bool,
            val_fraction: float, seed: int, where: str) -> Unit:
    if need_val and val.size == 0:
        held = patient_holdout(m.patients[train], m.labels[train], fraction=val_fraction, seed=seed)
        train, val = train[~held], train[held]
    if train.size == 0:
        raise DataError(f"{where}: no training rows in {name}")
    return Unit(name, train, val, test)
