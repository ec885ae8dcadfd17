"""Per-sample predictions of an evaluation run, in the form the report's bootstrap resamples.

Split from :mod:`meddino.report.collect` (which finds and normalises the run folders) because reading a
run's ``predictions/`` files is a separate job with its own per-task formats (docs/report.md lists the
columns read): segmentation and phase become per-unit metric values (:class:`UnitValues`), classification
the pooled labels and scores that are re-scored per resample (:class:`ClassificationRows`). Every loader
raises ValueError with the reason when a run's files cannot be used.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meddino.metrics.classification import aggregate_by_patient, classification_metrics
from meddino.metrics.phase import video_metrics
from meddino.metrics.segmentation import DEFAULT_METRIC_POLICY, aggregate_seg, metric_policy
from meddino.report.collect import EvalRun


def _float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@dataclass
class UnitValues:
    """Per-unit (patient / video) metric values: a resample's score is the mean over the drawn units.

    Used for segmentation (seed 000: classes averaged per patient, then patients averaged) and phase
    (per-video metrics, then averaged over videos). A unit drawn twice counts twice.
    """

    values: dict[str, dict[str, float]]  # metric -> unit -> value (NaN = undefined, skipped)

    def units(self) -> set[str]:
        out: set[str] = set()
        for per_unit in self.values.values():
            out |= set(per_unit)
        return out

    def prepare(self, units: list[str]) -> None:
        self._matrix = {m: np.array([v.get(u, np.nan) for u in units], dtype=np.float64)
                        for m, v in self.values.items()}

    def scores(self, drawn: np.ndarray) -> dict[str, float]:
        out = {}
        for m, arr in self._matrix.items():
            sample = arr[drawn]
            finite = sample[~np.isnan(sample)]
            out[m] = float(finite.mean()) if finite.size else float("nan")
        return out


@dataclass
class ClassificationRows:
    """Pooled classification predictions: scores are recomputed from the drawn units' rows."""

    unit_ids: np.ndarray  # one per row
    y: np.ndarray
    s: np.ndarray
    problem: str
    threshold: float = 0.5

    def units(self) -> set[str]:
        return {str(u) for u in self.unit_ids}

    def prepare(self, units: list[str]) -> None:
        pos = {u: i for i, u in enumerate(units)}
        code = np.array([pos.get(str(u), -1) for u in self.unit_ids])
        self._rows = [np.flatnonzero(code == i) for i in range(len(units))]

    def scores(self, drawn: np.ndarray) -> dict[str, float]:
        idx = np.concatenate([self._rows[i] for i in drawn]) if len(drawn) else np.array([], dtype=int)
        if idx.size == 0:
            return {}
        with np.errstate(all="ignore"):
            m = classification_metrics(self.y[idx], self.s[idx], self.problem, self.threshold)  # type: ignore[arg-type]
        return {k: float(v) for k, v in m.items() if k in ("auroc", "accuracy", "balanced_accuracy", "macro_f1")}


def load_segmentation(run: EvalRun) -> UnitValues:
    """``predictions/per_image_class.csv`` -> per-patient Dice / Jaccard / HD95 (seed 000 aggregation), under
    the run's metric policy (``seed000`` pools the ``tp``/``fp``/``fn`` columns per patient and class)."""
    path = run.path / "predictions" / "per_image_class.csv"
    if not path.is_file():
        raise ValueError("predictions/per_image_class.csv missing")
    raw = _read_csv(path)
    if not raw:
        raise ValueError("predictions/per_image_class.csv is empty")
    need = {"image", "patient", "class"}
    if not need <= set(raw[0]):
        raise ValueError(f"per_image_class.csv lacks column(s) {', '.join(sorted(need - set(raw[0])))}")
    metrics = [m for m in ("dice", "jaccard", "hd95") if m in raw[0]]
    if not metrics:
        raise ValueError("per_image_class.csv has none of the columns dice, jaccard, hd95")
    policy = run.metric_policy or DEFAULT_METRIC_POLICY
    counts = [c for c in ("tp", "fp", "fn") if c in raw[0]]
    if metric_policy(policy).overlap == "pooled" and len(counts) < 3 and {"dice", "jaccard"} & set(metrics):
        raise ValueError(f"per_image_class.csv lacks the tp, fp, fn columns that metric policy {policy} pools")
    rows = [{"image": r["image"], "patient": r["patient"], "class": r["class"],
             **{m: _float(r[m]) for m in metrics}, **{c: _float(r[c]) for c in counts}} for r in raw]
    agg = aggregate_seg(rows, by=("patient",), metrics=metrics, policy=policy)
    return UnitValues({m: {str(k): float(v) for k, v in agg[m]["values"].items()} for m in metrics})


def load_phase(run: EvalRun) -> UnitValues:
    """``predictions/*.csv`` (video, true, pred per frame) -> per-video metrics; falls back on the
    ``per_video`` table of results.json when no prediction file is there."""
    pred_dir = run.path / "predictions"
    files = sorted(pred_dir.glob("*.csv")) if pred_dir.is_dir() else []
    per_video: dict[str, dict[str, float]] = {}
    for f in files:
        raw = _read_csv(f)
        if not raw or not {"video", "true", "pred"} <= set(raw[0]):
            continue
        seqs: dict[str, tuple[list[int], list[int]]] = {}
        order: dict[str, list[float]] = {}
        for r in raw:
            t, p = seqs.setdefault(r["video"], ([], []))
            t.append(int(float(r["true"])))
            p.append(int(float(r["pred"])))
            order.setdefault(r["video"], []).append(_float(r.get("frame", len(t) - 1)))
        for v, (t, p) in seqs.items():
            o = np.argsort(np.asarray(order[v]), kind="stable")  # frames in time order
            per_video[v] = video_metrics(np.asarray(t)[o], np.asarray(p)[o])
    if not per_video and isinstance(run.results.get("per_video"), dict):
        per_video = {str(v): {k: _float(x) for k, x in m.items()} for v, m in run.results["per_video"].items()
                     if isinstance(m, dict)}
    if not per_video:
        raise ValueError("no per-frame predictions (predictions/*.csv with video,true,pred) nor per_video")
    metrics = sorted({m for v in per_video.values() for m in v})
    return UnitValues({m: {v: float(per_video[v].get(m, np.nan)) for v in per_video} for m in metrics})


def load_classification(run: EvalRun) -> ClassificationRows:
    """The primary variant's ``predictions/*.csv`` -> labels and scores, aggregated per patient when the run
    reports patient-level metrics (mean of the patient's scores, as the classification task does)."""
    res = run.results
    preds = res.get("predictions") if isinstance(res.get("predictions"), dict) else {}
    rel = preds.get(res.get("primary_variant")) if preds else None
    if rel is None and len(preds) == 1:
        rel = next(iter(preds.values()))
    path = run.path / str(rel) if rel else None
    if path is None or not path.is_file():
        files = sorted((run.path / "predictions").glob("*.csv")) if (run.path / "predictions").is_dir() else []
        if len(files) != 1:
            raise ValueError("cannot tell which predictions/*.csv is the reported variant")
        path = files[0]
    raw = _read_csv(path)
    if not raw:
        raise ValueError(f"{path.name} is empty")
    cols = list(raw[0])
    classes = [str(c) for c in res.get("classes") or [c[len("true_"):] for c in cols if c.startswith("true_")]]
    missing = [c for n in classes for c in (f"true_{n}", f"score_{n}") if c not in cols]
    if not classes or missing or "patient" not in cols:
        raise ValueError(f"{path.name}: needs patient, true_<class> and score_<class> columns"
                         + (f" (missing {', '.join(missing[:3])})" if missing else ""))
    problem = res.get("problem") or ("binary" if len(classes) == 2 else "multiclass")
    true = np.array([[_float(r[f"true_{n}"]) for n in classes] for r in raw])
    score = np.array([[_float(r[f"score_{n}"]) for n in classes] for r in raw])
    patients = np.array([r["patient"] for r in raw])
    if problem == "binary":
        y, s = true[:, -1].astype(np.int64), score[:, -1]
    elif problem == "multiclass":
        y, s = true.argmax(1), score
    elif problem == "multilabel":
        y, s = true.astype(np.int64), score
    else:
        raise ValueError(f"unknown classification problem {problem!r}")
    units = patients
    if run.level == "patient":
        units, y, s = aggregate_by_patient(patients, y, s, reduce="mean")
    thr = res.get("threshold", (res.get("hyperparameters") or {}).get("threshold", 0.5))
    return ClassificationRows(np.asarray([str(u) for u in units]), y, s, str(problem),
                              float(thr) if isinstance(thr, (int, float)) else 0.5)


def load_predictions(run: EvalRun) -> UnitValues | ClassificationRows:
    """The per-sample data of a run in the form the bootstrap needs; ValueError when unusable."""
    if run.task == "segmentation":
        return load_segmentation(run)
    if run.task == "phase":
        return load_phase(run)
    return load_classification(run)
