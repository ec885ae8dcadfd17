"""Runners of the classification verbs (declared in :mod:`.commands`): each reads and checks the manifest
and its split first, and imports the protocol (torch, timm, the backbone) only then, so that a bad input
fails in a second with one line."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from meddino.data import manifest_builders as mf
from meddino.data.manifest import read_manifest
from meddino.data.splits import patient_kfold, single_sample_classes
from meddino.errors import ConfigError, DataError
from meddino.runlog import atomic_write
from meddino.tasks.classify.units import describe_single_sample_classes, make_units, warn_single_sample_classes


def _validated(cfg: Any, need_units: bool, need_val: bool = False) -> Any:
    """Read and check the manifest (and its split) BEFORE torch and the backbone load, so a bad input fails
    in a second with one line. Returns the Manifest, or None when the run reads an embeddings cache."""
    if cfg.embeddings:
        return None

    if not cfg.data.manifest:
        raise ConfigError("data.manifest: give the manifest CSV (data.manifest=FILE) or embeddings=DIR")
    d = cfg.data
    m = read_manifest(d.manifest, label_columns=d.label_columns, image_column=d.image_column,
                      patient_column=d.patient_column, dataset_name=cfg.dataset_name,
                      positive_class=d.positive_class)
    if need_units:
        make_units(m, need_val=need_val, scheme=d.scheme, val_fraction=d.val_fraction, seed=cfg.seed)
        warn_single_sample_classes(m, f"manifest {m.source}" if m.source else "manifest")
    if not cfg.backbone:
        raise ConfigError("backbone: give a checkpoint path, random:<arch> or timm:<name> (backbone=...)")
    return m


def embed(cfg: Any) -> int:
    manifest = _validated(cfg, need_units=False)
    from meddino.tasks.classify.common import run_embed  # torch: only once the inputs are known good

    return run_embed(cfg, manifest)


def knn(cfg: Any) -> int:
    manifest = _validated(cfg, need_units=True)
    from meddino.tasks.classify.frozen import run_knn  # torch: only once the inputs are known good

    return run_knn(cfg, manifest)


def linear(cfg: Any) -> int:
    manifest = _validated(cfg, need_units=True, need_val=True)
    from meddino.tasks.classify.frozen import run_linear  # torch: only once the inputs are known good

    return run_linear(cfg, manifest)


def fewshot(cfg: Any) -> int:
    manifest = _validated(cfg, need_units=True)
    from meddino.tasks.classify.frozen import run_fewshot  # torch: only once the inputs are known good

    return run_fewshot(cfg, manifest)


def finetune(cfg: Any) -> int:
    manifest = _validated(cfg, need_units=True, need_val=True)
    from meddino.tasks.classify.finetune import run_finetune  # torch: only once the inputs are known good

    return run_finetune(cfg, manifest)


def run_split(cfg: Any) -> int:
    """Add (or replace) a ``fold`` column: patient-level folds stratified by the label(s)."""

    src = Path(cfg.manifest).expanduser()
    m = read_manifest(src, label_columns=cfg.label_columns, patient_column=cfg.patient_column, check_files=False)
    single = single_sample_classes(m.labels, m.names)
    if cfg.stratify and single:  # stratification over k folds needs each class in more than one
        raise DataError(f"{src}: cannot stratify {cfg.k} folds: {describe_single_sample_classes(single)}; "
                        "merge or drop them, or split without stratification (stratify=false)")
    folds = patient_kfold(m.patients, m.labels if cfg.stratify else None, k=cfg.k, seed=cfg.seed)
    with open(src, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h for h in (reader.fieldnames or []) if h != "fold"]
        rows = list(reader)
    out = Path(cfg.out).expanduser() if cfg.out else src.with_name(f"{src.stem}_folds{src.suffix}")
    if out.resolve().parent != src.resolve().parent:  # image paths are relative to the manifest's folder
        raise ConfigError(f"out: {out} must be in the folder of {src} (image paths are relative to the manifest)")
    with atomic_write(out, "w") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*header, "fold"], lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for row, f in zip(rows, folds, strict=True):
            writer.writerow({**row, "fold": int(f)})
    sizes = ", ".join(f"{f}: {(folds == f).sum()}" for f in range(cfg.k))
    print(f"wrote {out}: {cfg.k} patient-level folds (rows per fold {sizes})")
    return 0


def run_manifest(cfg: Any) -> int:

    if cfg.kind == "nih":
        out = mf.nih_chestxray14(cfg.src, cfg.out, images_dir=cfg.images, train_val_list=cfg.train_val_list,
                                 test_list=cfg.test_list, labels=cfg.labels or mf.NIH_LABELS,
                                 skip_missing=cfg.skip_missing)
    elif cfg.kind == "chexpert":
        out = mf.chexpert(cfg.src, cfg.out, root=cfg.images, labels=cfg.labels or mf.CHEXPERT_COMPETITION_LABELS,
                          uncertain=cfg.uncertain, frontal_only=cfg.frontal_only, split=cfg.split)
    else:
        out = mf.image_folder(cfg.src, cfg.out, patient_regex=cfg.patient_regex)
    with open(out) as fh:
        n = sum(1 for _ in fh) - 1
    print(f"wrote {out} ({n} rows)")
    return 0
