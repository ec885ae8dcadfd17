"""Labelled manifests for image-level tasks: the CSV format, its validation, and writing it.

A manifest is a CSV with one row per image (or per 3D volume):

- ``image``: path relative to the CSV's folder (absolute paths are kept as they are); a 2D image any
  :func:`meddino.data.io.read_image` reads, or a volume (.nii/.nii.gz/.nrrd/.mha/...) with one label per volume;
- the label: one column (``label`` by default) with class names or integers -> a single-label task, the
  classes being the sorted distinct values (integers sorted numerically); two classes make a binary task
  whose positive class is the second one (or ``positive_class``). Several 0/1 columns -> a multi-label task;
- ``patient``: the patient id, the unit of every split;
- optionally ``split`` (train / val / test) or ``fold`` (an integer, for k-fold cross-validation).

:func:`read_manifest` validates everything a run needs before any work starts and reports the first problem
as one line (:class:`~meddino.errors.DataError`): a missing image file (named), an absent label column, a
single class, a bad split value. Adapters that write manifests from the public layouts of NIH ChestX-ray14,
CheXpert and class-per-folder trees are in :mod:`meddino.data.manifest_builders`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from meddino.data.io import is_volume_file
from meddino.errors import ConfigError, DataError
from meddino.runlog import atomic_write

__all__ = [
    "SPLITS",
    "SPLIT_ALIASES",
    "Manifest",
    "canonical_number",
    "read_csv_rows",
    "read_manifest",
    "write_manifest",
]

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test", "testing": "test"}
Task = Literal["binary", "multiclass", "multilabel"]


@dataclass
class Manifest:
    """A validated manifest, columns as arrays (row order of the CSV)."""

    images: list[str]  # as written in the CSV
    paths: list[Path]  # resolved file paths
    patients: np.ndarray  # str [N]
    labels: np.ndarray  # int64 [N] class indices, or int64 [N, L] multi-hot
    task: Task
    names: list[str]  # class names (single-label) or label columns (multi-label)
    label_columns: list[str]
    split: np.ndarray | None = None  # str [N] in SPLITS
    fold: np.ndarray | None = None  # int64 [N]
    dataset: str = "dataset"
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_outputs(self) -> int:
        """Logits a head needs: 1 for binary (BCE), C for multi-class, L for multi-label."""
        return 1 if self.task == "binary" else len(self.names)

    def is_volume(self) -> np.ndarray:
        return np.array([is_volume_file(p) for p in self.paths], dtype=bool)

    def one_hot(self) -> np.ndarray:
        """[N, C] 0/1 targets: one-hot for single-label tasks, the multi-hot rows for multi-label ones."""
        if self.labels.ndim == 2:
            return self.labels.astype(np.int64)
        out = np.zeros((len(self), len(self.names)), dtype=np.int64)
        out[np.arange(len(self)), self.labels] = 1
        return out

    def subset(self, index: np.ndarray | Sequence[int]) -> Manifest:
        idx = np.asarray(index, dtype=np.int64)
        return replace(
            self,
            images=[self.images[i] for i in idx],
            paths=[self.paths[i] for i in idx],
            patients=self.patients[idx],
            labels=self.labels[idx],
            split=None if self.split is None else self.split[idx],
            fold=None if self.fold is None else self.fold[idx],
        )


# ---------------------------------------------------------------------------------------------- reading
def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a CSV, keys and cells stripped, a UTF-8 BOM ignored; DataError if unreadable."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
            header = [h.strip() for h in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"unreadable manifest {path}: {exc}") from None
    return header, rows


def _class_order(values: list[str]) -> list[str]:
    uniq = sorted(set(values))
    try:
        return sorted(uniq, key=lambda v: float(v))
    except ValueError:
        return uniq


def canonical_number(v: str) -> str:
    """'1', '1.0' and '01' are the same class in a numeric label column."""
    try:
        f = float(v)
    except ValueError:
        return v
    return str(int(f)) if f.is_integer() else v


def read_manifest(
    path: str | Path,
    label_columns: Sequence[str] = ("label",),
    image_column: str = "image",
    patient_column: str = "patient",
    dataset_name: str | None = None,
    positive_class: str | None = None,
    check_files: bool = True,
) -> Manifest:
    """Read and validate a manifest CSV (see the module docstring); every problem is one-line DataError.

    The checks run in this order, and the first failure is the one reported: the file and its columns, the
    image paths (and files), the patients, the labels, then the optional ``split`` and ``fold`` columns.
    """
    src = Path(path).expanduser()
    if not src.is_file():
        raise DataError(f"manifest not found: {src}")
    src = src.resolve()
    header, rows = read_csv_rows(src)
    where = f"manifest {src}"
    if not rows:
        raise DataError(f"{where}: no rows")
    label_columns = list(label_columns)
    if not label_columns:
        raise ConfigError("data.label_columns: give at least one label column")
    for col, key in [(image_column, "image"), (patient_column, "patient"), *[(c, "label") for c in label_columns]]:
        if col not in header:
            raise DataError(f"{where}: {key} column '{col}' not found (columns: {', '.join(header)})")

    images, paths = _image_paths(rows, image_column, src.parent, where, check_files)
    patients = _patients(rows, patient_column, where)
    if len(label_columns) == 1:
        task, names, labels = _single_label(rows, label_columns[0], positive_class, where)
    else:
        task, names, labels = _multi_label(rows, label_columns, where)
    split, fold = _split_and_fold(header, rows, where)
    return Manifest(images=images, paths=paths, patients=patients, labels=labels, task=task, names=names,
                    label_columns=label_columns, split=split, fold=fold,
                    dataset=dataset_name or src.stem, source=src)


def _image_paths(rows: list[dict[str, str]], image_column: str, root: Path, where: str,
                 check_files: bool) -> tuple[list[str], list[Path]]:
    """The ``image`` values as written and as paths (relative ones resolved against ``root``)."""
    images = [r[image_column] for r in rows]
    for i, im in enumerate(images):
        if not im:
            raise DataError(f"{where}: row {i + 2} has an empty '{image_column}'")
    paths = [Path(im) if os.path.isabs(im) else root / im for im in images]
    if check_files:
        missing = [p for p in paths if not p.exists()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"{where}: image not found: {missing[0]}{more}")
    return images, paths


def _patients(rows: list[dict[str, str]], patient_column: str, where: str) -> np.ndarray:
    patients = np.array([r[patient_column] for r in rows], dtype=object)
    for i, pid in enumerate(patients):
        if not pid:
            raise DataError(f"{where}: row {i + 2} has an empty '{patient_column}'")
    return patients.astype(str)


def _single_label(rows: list[dict[str, str]], col: str, positive_class: str | None,
                  where: str) -> tuple[Task, list[str], np.ndarray]:
    """One label column -> binary (positive class last) or multi-class indices into the sorted classes."""
    values = [canonical_number(r[col]) for r in rows]
    for i, v in enumerate(values):
        if v == "":
            raise DataError(f"{where}: row {i + 2} has an empty label in column '{col}'")
    names = _class_order(values)
    if len(names) < 2:
        raise DataError(f"{where}: label column '{col}' holds one class only ({names[0]!r}); need at least 2")
    task: Task = "binary" if len(names) == 2 else "multiclass"
    if positive_class is not None:
        if task != "binary":
            raise ConfigError(f"data.positive_class is for binary tasks; '{col}' has {len(names)} classes")
        pos = canonical_number(str(positive_class))
        if pos not in names:
            raise ConfigError(f"data.positive_class: {positive_class!r} is not a class of '{col}' ({names})")
        names = [n for n in names if n != pos] + [pos]
    index = {n: i for i, n in enumerate(names)}
    labels = np.array([index[v] for v in values], dtype=np.int64)
    return task, names, labels


def _multi_label(rows: list[dict[str, str]], label_columns: list[str],
                 where: str) -> tuple[Task, list[str], np.ndarray]:
    """Several 0/1 columns -> multi-hot rows; ``names`` is ``label_columns`` itself."""
    labels = np.zeros((len(rows), len(label_columns)), dtype=np.int64)
    for j, col in enumerate(label_columns):
        for i, r in enumerate(rows):
            v = canonical_number(r[col])
            if v not in ("0", "1"):
                raise DataError(f"{where}: row {i + 2}, column '{col}': multi-label values must be 0 or 1, "
                                f"got {r[col]!r}")
            labels[i, j] = int(v)
        if labels[:, j].min() == labels[:, j].max():
            raise DataError(f"{where}: label column '{col}' holds one class only ({labels[0, j]}); "
                            "drop it from data.label_columns")
    return "multilabel", label_columns, labels


def _split_and_fold(header: list[str], rows: list[dict[str, str]],
                    where: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The optional ``split`` (aliases -> train/val/test) and ``fold`` (integers) columns, else None."""
    split = fold = None
    if "split" in header:
        raw = [r["split"].lower() for r in rows]
        bad = [v for v in raw if v not in SPLIT_ALIASES]
        if bad:
            raise DataError(f"{where}: split values must be train/val/test, got {bad[0]!r}")
        split = np.array([SPLIT_ALIASES[v] for v in raw], dtype=object).astype(str)
    if "fold" in header:
        try:
            fold = np.array([int(float(r["fold"])) for r in rows], dtype=np.int64)
        except ValueError:
            bad = next(r["fold"] for r in rows if not _is_int(r["fold"]))
            raise DataError(f"{where}: fold values must be integers, got {bad!r}") from None
    return split, fold


def _is_int(v: str) -> bool:
    try:
        return float(v).is_integer()
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------- writing
def write_manifest(path: str | Path, rows: Sequence[dict[str, object]], columns: Sequence[str]) -> Path:
    """Write rows (``image`` given as a path; made relative to the CSV folder when possible) atomically."""
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.parent.resolve()
    with atomic_write(out, "w") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            row = dict(row)
            img = Path(str(row["image"])).expanduser().resolve()
            try:
                row["image"] = os.path.relpath(img, base)
            except ValueError:  # another drive on Windows
                row["image"] = str(img)
            writer.writerow({c: row.get(c, "") for c in columns})
    return out
