"""Labelled manifests for image-level tasks, and adapters that write them from known dataset layouts.

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
single class, a bad split value. Adapters (:func:`nih_chestxray14`, :func:`chexpert`, :func:`image_folder`)
write manifests from the public layouts of NIH ChestX-ray14, CheXpert and class-per-folder trees.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from meddino.data.io import IMAGE_EXTENSIONS, VOLUME_EXTENSIONS, is_dicom_file, is_image_file, is_volume_file
from meddino.errors import ConfigError, DataError
from meddino.runlog import atomic_write

__all__ = [
    "CHEXPERT_COMPETITION_LABELS",
    "NIH_LABELS",
    "SPLITS",
    "Manifest",
    "chexpert",
    "image_folder",
    "nih_chestxray14",
    "read_manifest",
    "write_manifest",
]

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test", "testing": "test"}
NIH_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)
#: The five CheXpert competition findings (Irvin et al. 2019), the usual default label set.
CHEXPERT_COMPETITION_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
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
def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
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


def _canonical_number(v: str) -> str:
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
    """Read and validate a manifest CSV (see the module docstring); every problem is one-line DataError."""
    src = Path(path).expanduser()
    if not src.is_file():
        raise DataError(f"manifest not found: {src}")
    src = src.resolve()
    header, rows = _read_csv(src)
    where = f"manifest {src}"
    if not rows:
        raise DataError(f"{where}: no rows")
    label_columns = list(label_columns)
    if not label_columns:
        raise ConfigError("data.label_columns: give at least one label column")
    for col, key in [(image_column, "image"), (patient_column, "patient"), *[(c, "label") for c in label_columns]]:
        if col not in header:
            raise DataError(f"{where}: {key} column '{col}' not found (columns: {', '.join(header)})")

    images = [r[image_column] for r in rows]
    for i, im in enumerate(images):
        if not im:
            raise DataError(f"{where}: row {i + 2} has an empty '{image_column}'")
    root = src.parent
    paths = [Path(im) if os.path.isabs(im) else root / im for im in images]
    if check_files:
        missing = [p for p in paths if not p.exists()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"{where}: image not found: {missing[0]}{more}")

    patients = np.array([r[patient_column] for r in rows], dtype=object)
    for i, pid in enumerate(patients):
        if not pid:
            raise DataError(f"{where}: row {i + 2} has an empty '{patient_column}'")
    patients = patients.astype(str)

    if len(label_columns) == 1:
        col = label_columns[0]
        values = [_canonical_number(r[col]) for r in rows]
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
            pos = _canonical_number(str(positive_class))
            if pos not in names:
                raise ConfigError(f"data.positive_class: {positive_class!r} is not a class of '{col}' ({names})")
            names = [n for n in names if n != pos] + [pos]
        index = {n: i for i, n in enumerate(names)}
        labels = np.array([index[v] for v in values], dtype=np.int64)
    else:
        task = "multilabel"
        names = label_columns
        labels = np.zeros((len(rows), len(label_columns)), dtype=np.int64)
        for j, col in enumerate(label_columns):
            for i, r in enumerate(rows):
                v = _canonical_number(r[col])
                if v not in ("0", "1"):
                    raise DataError(f"{where}: row {i + 2}, column '{col}': multi-label values must be 0 or 1, "
                                    f"got {r[col]!r}")
                labels[i, j] = int(v)
            if labels[:, j].min() == labels[:, j].max():
                raise DataError(f"{where}: label column '{col}' holds one class only ({labels[0, j]}); "
                                "drop it from data.label_columns")

    split = fold = None
    if "split" in header:
        raw = [r["split"].lower() for r in rows]
        bad = [v for v in raw if v not in _SPLIT_ALIASES]
        if bad:
            raise DataError(f"{where}: split values must be train/val/test, got {bad[0]!r}")
        split = np.array([_SPLIT_ALIASES[v] for v in raw], dtype=object).astype(str)
    if "fold" in header:
        try:
            fold = np.array([int(float(r["fold"])) for r in rows], dtype=np.int64)
        except ValueError:
            bad = next(r["fold"] for r in rows if not _is_int(r["fold"]))
            raise DataError(f"{where}: fold values must be integers, got {bad!r}") from None
    return Manifest(images=images, paths=paths, patients=patients, labels=labels, task=task, names=names,
                    label_columns=label_columns, split=split, fold=fold,
                    dataset=dataset_name or src.stem, source=src)


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


def _index_files(root: Path, names: set[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if f in names and f not in found:
                found[f] = Path(dirpath) / f
    return found


def _read_list(path: Path | None) -> set[str]:
    if path is None:
        return set()
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"image list not found: {p}")
    return {line.strip() for line in p.read_text().splitlines() if line.strip()}


def nih_chestxray14(
    data_entry: str | Path,
    out: str | Path,
    images_dir: str | Path | None = None,
    train_val_list: str | Path | None = None,
    test_list: str | Path | None = None,
    labels: Sequence[str] = NIH_LABELS,
    skip_missing: bool = False,
) -> Path:
    """NIH ChestX-ray14 -> multi-label manifest (14 findings, 0/1), ``patient`` = ``Patient ID``.

    ``Finding Labels`` is ``"A|B"`` or ``"No Finding"`` (all zeros). Images are looked up by file name anywhere
    under ``images_dir`` (default: the CSV's folder; the release spreads them over ``images_0NN/images``).
    With the official ``train_val_list.txt`` / ``test_list.txt`` (default: beside the CSV when present) a
    ``split`` column says train / test; a validation set is carved from train by patient at evaluation time
    or with ``meddino data split``. ``skip_missing`` drops rows whose image is absent (a partial download).
    """
    src = Path(data_entry).expanduser()
    header, rows = _read_csv(require(src, "NIH Data_Entry CSV"))
    for col in ("Image Index", "Finding Labels", "Patient ID"):
        if col not in header:
            raise DataError(f"NIH CSV {src}: column '{col}' not found")
    root = Path(images_dir).expanduser() if images_dir else src.parent
    tv_path = Path(train_val_list) if train_val_list else (src.parent / "train_val_list.txt")
    te_path = Path(test_list) if test_list else (src.parent / "test_list.txt")
    tv = _read_list(tv_path) if (train_val_list or tv_path.is_file()) else set()
    te = _read_list(te_path) if (test_list or te_path.is_file()) else set()
    index = _index_files(root, {r["Image Index"] for r in rows})
    known = set(labels)
    out_rows = []
    for r in rows:
        name = r["Image Index"]
        path = index.get(name)
        if path is None:
            if skip_missing:
                continue
            raise DataError(f"NIH image not found under {root}: {name} (skip_missing=true drops such rows)")
        found = {f.strip() for f in r["Finding Labels"].split("|") if f.strip() and f.strip() != "No Finding"}
        row: dict[str, object] = {"image": path, "patient": r["Patient ID"].strip()}
        row.update({lab: int(lab in found) for lab in labels})
        unknown = found - known - set(NIH_LABELS)
        if unknown:
            raise DataError(f"NIH CSV {src}: unknown finding {sorted(unknown)[0]!r} for {name}")
        if tv or te:
            row["split"] = "test" if name in te else "train" if name in tv else ""
            if not row["split"]:
                continue  # not in either official list: not part of the benchmark
        out_rows.append(row)
    if not out_rows:
        raise DataError(f"NIH CSV {src}: no usable rows (no images found under {root})")
    cols = ["image", *labels, "patient"] + (["split"] if (tv or te) else [])
    return write_manifest(out, out_rows, cols)


def require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


_CHEXPERT_PATIENT = re.compile(r"(patient\d+)")


def chexpert(
    csv_path: str | Path,
    out: str | Path,
    root: str | Path | None = None,
    labels: Sequence[str] = CHEXPERT_COMPETITION_LABELS,
    uncertain: Literal["ones", "zeros", "ignore"] = "ones",
    frontal_only: bool = False,
    split: str | None = None,
) -> Path:
    """CheXpert-style CSV (``Path`` + finding columns holding 1 / 0 / -1 / blank) -> multi-label manifest.

    Blank means "not mentioned" and becomes 0 (the usual convention). Uncertain (-1) follows ``uncertain``:
    ``ones`` (U-Ones) -> 1, ``zeros`` (U-Zeros) -> 0, ``ignore`` -> the image is left out (the label is unknown,
    and metrics on such rows would not be exact). The patient comes from the ``patientNNNNN`` part of the path.
    ``root`` is where the ``Path`` values resolve (default: the CSV folder's parent, then the CSV folder).
    ``split`` (train / val / test) is written to every row when given.
    """
    src = Path(csv_path).expanduser()
    header, rows = _read_csv(require(src, "CheXpert CSV"))
    if "Path" not in header:
        raise DataError(f"CheXpert CSV {src}: column 'Path' not found")
    for lab in labels:
        if lab not in header:
            raise DataError(f"CheXpert CSV {src}: label column '{lab}' not found")
    if uncertain not in ("ones", "zeros", "ignore"):
        raise ConfigError(f"uncertain: expected ones, zeros or ignore, got {uncertain!r}")
    if split is not None and _SPLIT_ALIASES.get(split.lower()) is None:
        raise ConfigError(f"split: expected train, val or test, got {split!r}")
    roots = [Path(root).expanduser()] if root else [src.parent.parent, src.parent]
    out_rows = []
    for r in rows:
        rel = r["Path"]
        if frontal_only and r.get("Frontal/Lateral", "Frontal") != "Frontal":
            continue
        path = next((base / rel for base in roots if (base / rel).exists()), roots[0] / rel)
        m = _CHEXPERT_PATIENT.search(rel)
        if m is None:
            raise DataError(f"CheXpert CSV {src}: no patientNNNNN in path {rel!r}")
        row: dict[str, object] = {"image": path, "patient": m.group(1)}
        drop = False
        for lab in labels:
            raw = _canonical_number(r[lab])
            if raw in ("", "0"):
                v = 0
            elif raw == "1":
                v = 1
            elif raw == "-1":
                if uncertain == "ignore":
                    drop = True
                    break
                v = int(uncertain == "ones")
            else:
                raise DataError(f"CheXpert CSV {src}: column '{lab}' value {r[lab]!r} is not 1, 0, -1 or blank")
            row[lab] = v
        if drop:
            continue
        if split is not None:
            row["split"] = _SPLIT_ALIASES[split.lower()]
        out_rows.append(row)
    if not out_rows:
        raise DataError(f"CheXpert CSV {src}: no rows left")
    cols = ["image", *labels, "patient"] + (["split"] if split else [])
    return write_manifest(out, out_rows, cols)


def _is_sample(path: Path) -> bool:
    return is_image_file(path) or is_volume_file(path) or path.suffix.lower() in (".dcm", ".dicom") or (
        path.suffix == "" and is_dicom_file(path))


def image_folder(
    root: str | Path, out: str | Path, patient_regex: str | None = None, label_column: str = "label"
) -> Path:
    """``ROOT/<class>/<file>`` (or ``ROOT/<split>/<class>/<file>`` with split folders train/val/test) ->
    single-label manifest. Files are 2D images, DICOM, or 3D volumes (one label per volume).

    ``patient`` is the file name without extension, or the first group (else the whole match) of
    ``patient_regex`` searched in the path relative to ROOT (e.g. ``"(P\\d+)_"``).
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"image folder not found: {base}")
    pattern = re.compile(patient_regex) if patient_regex else None
    subdirs = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    split_layout = bool(subdirs) and all(d.name.lower() in _SPLIT_ALIASES for d in subdirs)
    tops = [(d, _SPLIT_ALIASES[d.name.lower()]) for d in subdirs] if split_layout else [(base, None)]
    rows: list[dict[str, object]] = []
    for top, split in tops:
        for class_dir in sorted(d for d in top.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for path in sorted(class_dir.rglob("*")):
                if not path.is_file() or path.name.startswith(".") or not _is_sample(path):
                    continue
                rel = path.relative_to(base).as_posix()
                if pattern is not None:
                    m = pattern.search(rel)
                    if m is None:
                        raise DataError(f"patient_regex {patient_regex!r} does not match {rel}")
                    pid = m.group(1) if m.groups() else m.group(0)
                else:
                    name = path.name
                    for ext in sorted(VOLUME_EXTENSIONS, key=len, reverse=True):
                        if name.lower().endswith(ext):
                            name = name[: -len(ext)]
                            break
                    else:
                        name = path.stem
                    pid = name
                row: dict[str, object] = {"image": path, label_column: class_dir.name, "patient": pid}
                if split:
                    row["split"] = split
                rows.append(row)
    if not rows:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS)[:6])
        raise DataError(f"image folder {base}: no images found in class sub-folders (expected ROOT/<class>/*{exts}...)")
    cols = ["image", label_column, "patient"] + (["split"] if split_layout else [])
    return write_manifest(out, rows, cols)
