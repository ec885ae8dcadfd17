"""Adapters that write :mod:`.manifest` CSVs from the public layouts of known datasets.

:func:`nih_chestxray14` (NIH ChestX-ray14), :func:`chexpert` (CheXpert-style CSVs) and :func:`image_folder`
(class-per-folder trees) each turn a dataset as downloaded into a manifest that :func:`.manifest.read_manifest`
accepts. Apart from :mod:`.manifest` because each knows one dataset's conventions (label names, uncertain
labels, patient ids in paths), while the manifest format and its validation are the same for every dataset.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from meddino.data.io import IMAGE_EXTENSIONS, VOLUME_EXTENSIONS, is_dicom_file, is_image_file, is_volume_file
from meddino.data.manifest import SPLIT_ALIASES, canonical_number, read_csv_rows, write_manifest
from meddino.data.splits import check_no_leak
from meddino.errors import ConfigError, DataError

__all__ = ["CHEXPERT_COMPETITION_LABELS", "NIH_LABELS", "chexpert", "image_folder", "nih_chestxray14"]

NIH_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)
#: The five CheXpert competition findings (Irvin et al. 2019), the usual default label set.
CHEXPERT_COMPETITION_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


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


def _check_split(rows: list[dict[str, object]], where: str, name_of) -> None:
    """The split a user's lists or folders give is checked here (:func:`check_no_leak`), naming them, rather than
    at every evaluation of the manifest, which could only name the manifest."""
    sides = {s: [r for r in rows if r.get("split") == s] for s in ("train", "val", "test")}
    check_no_leak({s: [r["patient"] for r in rs] for s, rs in sides.items()}, where=where,
                  name_of=lambda s, j: name_of(sides[s][j]["image"]))


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
    header, rows = read_csv_rows(require(src, "NIH Data_Entry CSV"))
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
    if tv or te:
        _check_split(out_rows, f"train_val_list {tv_path} / test_list {te_path}", lambda p: Path(p).name)
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
    header, rows = read_csv_rows(require(src, "CheXpert CSV"))
    if "Path" not in header:
        raise DataError(f"CheXpert CSV {src}: column 'Path' not found")
    for lab in labels:
        if lab not in header:
            raise DataError(f"CheXpert CSV {src}: label column '{lab}' not found")
    if uncertain not in ("ones", "zeros", "ignore"):
        raise ConfigError(f"uncertain: expected ones, zeros or ignore, got {uncertain!r}")
    if split is not None and SPLIT_ALIASES.get(split.lower()) is None:
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
        values = _chexpert_values(r, labels, uncertain, src)
        if values is None:
            continue
        row: dict[str, object] = {"image": path, "patient": m.group(1), **values}
        if split is not None:
            row["split"] = SPLIT_ALIASES[split.lower()]
        out_rows.append(row)
    if not out_rows:
        raise DataError(f"CheXpert CSV {src}: no rows left")
    cols = ["image", *labels, "patient"] + (["split"] if split else [])
    return write_manifest(out, out_rows, cols)


def _chexpert_values(r: dict[str, str], labels: Sequence[str], uncertain: str, src: Path) -> dict[str, int] | None:
    """One CSV row's 0/1 value per label; None when an uncertain (-1) label drops the row (``ignore``)."""
    values: dict[str, int] = {}
    for lab in labels:
        raw = canonical_number(r[lab])
        if raw in ("", "0"):
            v = 0
        elif raw == "1":
            v = 1
        elif raw == "-1":
            if uncertain == "ignore":
                return None
            v = int(uncertain == "ones")
        else:
            raise DataError(f"CheXpert CSV {src}: column '{lab}' value {r[lab]!r} is not 1, 0, -1 or blank")
        values[lab] = v
    return values


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
    split_layout = bool(subdirs) and all(d.name.lower() in SPLIT_ALIASES for d in subdirs)
    tops = [(d, SPLIT_ALIASES[d.name.lower()]) for d in subdirs] if split_layout else [(base, None)]
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
    if split_layout:
        how = f"patient_regex {patient_regex!r}" if pattern else "the file name"
        _check_split(rows, f"split folders of {base}, patient = {how}",
                     lambda p: Path(p).relative_to(base).as_posix())
    cols = ["image", label_column, "patient"] + (["split"] if split_layout else [])
    return write_manifest(out, rows, cols)
