"""The uniform output of every classification protocol: ``predictions/*.csv`` and ``results.json``.

Scores are always per-class probabilities in ``[0, 1]``: softmax for multi-class, ``[1 - p, p]`` for binary
(p = sigmoid of the single logit, or the kNN vote), sigmoid per label for multi-label. The format is
described in docs/classification.md; the report reads it.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddino import __version__
from meddino.data.manifest import Manifest
from meddino.errors import DataError
from meddino.metrics.classification import aggregate_by_patient, classification_metrics, summarize_folds
from meddino.runlog import atomic_write, write_json

SCALAR_METRICS = ("auroc", "accuracy", "balanced_accuracy", "macro_f1")


def metric_inputs(task: str, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Manifest labels + per-class probabilities -> what :mod:`meddino.metrics.classification` expects."""
    if task == "binary":
        return labels.astype(np.int64), scores[:, 1]
    return labels, scores


def evaluate(task: str, labels: np.ndarray, scores: np.ndarray, patients: np.ndarray,
             threshold: float = 0.5) -> dict[str, dict[str, Any] | None]:
    """Image-level and patient-level metrics of one test set. Patient level is None when a single-label
    patient has images with different labels (then only image level is defined)."""
    y, s = metric_inputs(task, labels, scores)
    out: dict[str, dict[str, Any] | None] = {"image": classification_metrics(y, s, task, threshold)}
    try:
        _, py, ps = aggregate_by_patient(patients, y, s, reduce="mean")
    except DataError:
        out["patient"] = None
    else:
        out["patient"] = classification_metrics(py, ps, task, threshold)
    return out


def summarize(unit_metrics: Sequence[dict[str, dict[str, Any] | None]], names: Sequence[str]) -> dict[str, Any]:
    """Per-level ``{metric: {mean, std, values, n}}`` over units (folds / draws), plus per-class AUROC means."""
    out: dict[str, Any] = {}
    for level in ("image", "patient"):
        rows = [u[level] for u in unit_metrics]
        if any(r is None for r in rows):
            out[level] = None
            continue
        summary = summarize_folds([{k: r[k] for k in (*SCALAR_METRICS, "n")} for r in rows])  # type: ignore[index]
        per_class = np.array([r["auroc_per_class"] for r in rows], dtype=np.float64)  # type: ignore[index]
        with np.errstate(all="ignore"):
            means = [None if np.all(np.isnan(c)) else float(np.nanmean(c)) for c in per_class.T]
        # binary: one AUROC, that of the positive (second) class
        keys = [str(names[-1])] if len(means) == 1 and len(names) == 2 else [str(n) for n in names]
        summary["auroc_per_class"] = dict(zip(keys, means, strict=True))
        out[level] = summary
    return out


def headline(summary: dict[str, Any], level: str) -> tuple[str, dict[str, Any]]:
    """The level actually reported (patient falls back to image when undefined) and its metrics."""
    if level == "patient" and summary.get("patient") is not None:
        return "patient", summary["patient"]
    return "image", summary["image"]


def prediction_rows(m: Manifest, index: np.ndarray, scores: np.ndarray, unit: str, variant: str, protocol: str,
                    model: str, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One dict per test sample (see docs/classification.md for the columns)."""
    onehot = m.one_hot()
    rows = []
    for r, i in enumerate(index):
        row: dict[str, Any] = {
            "image": m.images[i],
            "patient": m.patients[i],
            "unit": unit,
            "split": "test",
            "fold": "" if m.fold is None else int(m.fold[i]),
            "variant": variant,
            "protocol": protocol,
            "model": model,
            "label": "|".join(n for n, v in zip(m.names, onehot[i], strict=True) if v) if m.task == "multilabel"
            else m.names[int(m.labels[i])],
        }
        if extra:
            row.update(extra)
        for j, name in enumerate(m.names):
            row[f"true_{name}"] = int(onehot[i, j])
        for j, name in enumerate(m.names):
            row[f"score_{name}"] = f"{float(scores[r, j]):.6g}"
        rows.append(row)
    return rows


def write_predictions(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    if not rows:
        raise DataError(f"no predictions to write to {path}")
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    with atomic_write(path, "w") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _clean(obj: Any) -> Any:
    """NaN/inf -> None so results.json is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_results(out: Path, *, protocol: str, model: str, backbone: str | None, m: Manifest, level: str,
                  summary: dict[str, Any], units: list[dict[str, Any]], hyperparameters: dict[str, Any],
                  predictions: dict[str, str], primary: str, threshold: float = 0.5,
                  extra: dict[str, Any] | None = None) -> Path:
    """``results.json``: the summary every protocol writes (keys documented in docs/classification.md)."""
    used_level, metrics = headline(summary, level)
    payload: dict[str, Any] = {
        "task": "classification",
        "protocol": protocol,
        "model": model,
        "backbone": backbone,
        "dataset": m.dataset,
        "level": used_level,
        "problem": m.task,
        "classes": list(m.names),
        "primary_variant": primary,
        "threshold": threshold,
        "metrics": metrics,
        "metrics_image": summary["image"],
        "metrics_patient": summary["patient"],
        "units": units,
        "hyperparameters": hyperparameters,
        "predictions": predictions,
        "n_samples": len(m),
        "n_patients": int(np.unique(m.patients).size),
        "meddino_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        payload.update(extra)
    path = out / "results.json"
    write_json(path, _clean(payload))
    return path
