"""Finding and reading run folders for ``meddino report``.

Every folder below ``RUNS_DIR`` is classified by the files it holds:

- ``results.json`` -> an evaluation run (``task`` = ``classification``, ``segmentation`` or ``phase``), with
  its per-sample predictions under ``predictions/`` (see docs/report.md for the columns read);
- ``viz.json`` -> a ``meddino viz pca`` run (its panel PNGs);
- ``profile.json`` -> a ``meddino profile`` run;
- ``metrics.jsonl`` without any of the above -> a pretraining run (training curves).

A folder that cannot be read (bad JSON, unknown task, missing keys) is skipped with one warning line: the
report is built from whatever else is there and never crashes on one bad folder. The readers return plain
Python / numpy data; the statistics live in :mod:`meddino.report.build`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from meddino.metrics.classification import aggregate_by_patient, classification_metrics
from meddino.metrics.phase import video_metrics
from meddino.metrics.segmentation import aggregate_seg
from meddino.runlog import read_metrics

EVAL_TASKS = ("classification", "segmentation", "phase")
#: sub-folders of a run that never hold another run (saves walking thousands of mask files)
_SKIP_DIRS = {"predictions", "checkpoints", "tensorboard", "model", "sweep", "masks", "cache", "__pycache__"}
#: metrics where a lower value is better; every other metric is higher-is-better
LOWER_IS_BETTER = {"hd95", "loss", "latency_ms"}
#: frozen-encoder protocols of the classification task (docs/classification.md)
_FROZEN_PROTOCOLS = {"knn", "linear", "fewshot", "linear_seg", "linear_probe"}

# teacher_backbone_00000200.safetensors, checkpoint_0001000.pt, ..._iter200, ...-it5000 (see docs/report.md)
_ITER_PATTERNS = (
    re.compile(r"(?:teacher_backbone|student_backbone|backbone|checkpoint)_(\d+)(?:\.[a-z]+)?$", re.I),
    re.compile(r"(?:^|[_\-.])(?:iter|iteration|it|step)[_\-]?(\d+)(?:\.[a-z]+)?$", re.I),
)


def higher_is_better(metric: str) -> bool:
    return metric.lower() not in LOWER_IS_BETTER


@dataclass
class EvalRun:
    """One evaluation run (one ``results.json``), normalised across tasks."""

    path: Path
    task: str
    model: str
    dataset: str
    protocol: str
    level: str
    metrics: dict[str, dict[str, Any]]  # metric -> {"mean", "std", "n", "values"?}
    encoder: str | None = None  # "frozen" | "full" | "lora" | "bitfit" | "trainable" | None (unknown)
    iteration: int | None = None  # pretraining iteration of the evaluated checkpoint, if known
    checkpoint: str | None = None  # the backbone spec the run evaluated
    pretrain_run: str | None = None  # the pretraining run the checkpoint belongs to (for curves over iterations)
    results: dict[str, Any] = field(default_factory=dict)
    mtime: float = 0.0

    @property
    def name(self) -> str:
        return display_name(self.model)


@dataclass
class PretrainRun:
    path: Path
    rows: list[dict[str, Any]]
    config: dict[str, Any] | None = None


@dataclass
class VizRun:
    path: Path
    panels: dict[str, Path]  # kind -> PNG
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProfileRun:
    path: Path
    data: dict[str, Any]


@dataclass
class Collection:
    evals: list[EvalRun] = field(default_factory=list)
    pretrain: list[PretrainRun] = field(default_factory=list)
    viz: list[VizRun] = field(default_factory=list)
    profiles: list[ProfileRun] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def warn(self, path: Path | str, reason: str) -> None:
        self.warnings.append(f"{path}: {reason}")

    def __len__(self) -> int:
        return len(self.evals) + len(self.pretrain) + len(self.viz) + len(self.profiles)


# ------------------------------------------------------------------------------------------------ names
def display_name(model: str) -> str:
    """A short label for a model spec: checkpoint paths become ``<run folder>/<file stem>``."""
    model = str(model)
    if "/" in model or "\\" in model:
        p = Path(model)
        if p.suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
            parent = p.parent.name
            if parent in ("checkpoints", "export", "exports") and p.parent.parent.name:
                parent = p.parent.parent.name
            return f"{parent}/{p.stem}" if parent else p.stem
    return model


def parse_iteration(results: dict[str, Any], spec: str | None) -> int | None:
    """Pretraining iteration of the evaluated checkpoint: ``pretrain_iteration`` (or ``iteration``) in
    results.json, else parsed from the checkpoint file name (``teacher_backbone_000200.safetensors``,
    ``checkpoint_0001000.pt``, ``..._iter200.safetensors``, ``...-step5000.pt``)."""
    for key in ("pretrain_iteration", "iteration"):
        value = results.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return int(value)
    if not spec:
        return None
    stem = Path(str(spec)).name
    stem = re.sub(r"\.(safetensors|pt|pth|bin|ckpt)$", "", stem, flags=re.I)
    for pattern in _ITER_PATTERNS:
        m = pattern.search(stem)
        if m:
            return int(m.group(1))
    return None


def _pretrain_run_of(results: dict[str, Any], spec: str | None) -> str | None:
    if isinstance(results.get("pretrain_run"), str):
        return results["pretrain_run"]
    if not spec or ":" in str(spec).split("/")[0]:  # random:..., timm:...
        return None
    p = Path(str(spec))
    parent = p.parent
    if parent.name in ("checkpoints", "export", "exports"):
        parent = parent.parent
    return str(parent) if str(parent) not in ("", ".") else None


def _encoder_mode(task: str, results: dict[str, Any], protocol: str) -> str | None:
    """Frozen vs trainable encoder, from what the task writes (see docs/report.md)."""
    for key in ("frozen_backbone", "frozen", "freeze_backbone"):
        if isinstance(results.get(key), bool):
            return "frozen" if results[key] else "trainable"
    mode = results.get("mode") or (results.get("hyperparameters") or {}).get("mode")
    if task == "classification":
        if isinstance(mode, str) and mode:
            return "full" if mode == "full" else mode
        if protocol in _FROZEN_PROTOCOLS:
            return "frozen"
    if task == "phase":
        stage1 = results.get("stage1")
        if isinstance(stage1, dict) and isinstance(stage1.get("enabled"), bool):
            return "trainable" if stage1["enabled"] else "frozen"
    return None


def _scalar_metrics(raw: Any) -> dict[str, dict[str, Any]]:
    """``{name: {"mean", "std", ...}}`` entries with a numeric mean (per-class dicts, counts dropped)."""
    out: dict[str, dict[str, Any]] = {}
    if not isinstance(raw, dict):
        return out
    for name, v in raw.items():
        if name == "n" or not isinstance(v, dict) or "mean" not in v:
            continue
        mean = v.get("mean")
        if mean is None or isinstance(mean, (int, float)) and not isinstance(mean, bool):
            entry = {"mean": float("nan") if mean is None else float(mean)}
            std = v.get("std")
            entry["std"] = float(std) if isinstance(std, (int, float)) else float("nan")
            entry["n"] = v.get("n")
            values = v.get("values")
            if isinstance(values, dict):
                values = list(values.values())
            if isinstance(values, list):
                entry["values"] = [float("nan") if x is None else float(x) for x in values
                                   if x is None or isinstance(x, (int, float))]
            out[str(name)] = entry
    return out


def read_eval_run(path: Path) -> EvalRun:
    """Normalise one ``results.json``; raises ValueError with the reason when it cannot be used."""
    try:
        results = json.loads((path / "results.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"results.json is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(results, dict):
        raise ValueError("results.json is not a JSON object")
    task = results.get("task")
    if task not in EVAL_TASKS:
        raise ValueError(f"results.json: unknown task {task!r} (expected one of {', '.join(EVAL_TASKS)})")
    metrics = _scalar_metrics(results.get("metrics"))
    if not metrics:
        raise ValueError("results.json: no 'metrics' with a numeric mean")
    spec = results.get("backbone") if isinstance(results.get("backbone"), str) else None
    model = results.get("model") or spec or path.name
    dataset = results.get("dataset") or results.get("layout") or "dataset"
    protocol = results.get("protocol") or task
    if task == "phase" and str(protocol).startswith("seed 000"):
        protocol = "mstcn"
    level = results.get("level") or {"phase": "video", "segmentation": "patient"}.get(task, "fold")
    return EvalRun(
        path=path,
        task=str(task),
        model=str(model),
        dataset=str(dataset),
        protocol=str(protocol),
        level=str(level),
        metrics=metrics,
        encoder=_encoder_mode(task, results, str(protocol)),
        iteration=parse_iteration(results, spec or (model if isinstance(model, str) else None)),
        checkpoint=spec,
        pretrain_run=_pretrain_run_of(results, spec),
        results=results,
        mtime=(path / "results.json").stat().st_mtime,
    )


def _read_viz(path: Path) -> VizRun:
    try:
        info = json.loads((path / "viz.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"viz.json is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(info, dict) or not isinstance(info.get("panels"), dict):
        raise ValueError("viz.json has no 'panels' mapping")
    panels = {}
    for kind, name in info["panels"].items():
        png = path / str(name)
        if png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n":
            panels[str(kind)] = png
    if not panels:
        raise ValueError("viz.json: none of its panel images is a readable PNG")
    return VizRun(path, panels, info)


def _read_profile(path: Path) -> ProfileRun:
    try:
        data = json.loads((path / "profile.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"profile.json is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("task") != "profile" or not isinstance(data.get("rows"), list):
        raise ValueError("profile.json: expected {'task': 'profile', 'rows': [...]}")
    return ProfileRun(path, data)


def _read_pretrain(path: Path) -> PretrainRun:
    rows = [r for r in read_metrics(path / "metrics.jsonl") if isinstance(r, dict) and "step" in r]
    if not rows:
        raise ValueError("metrics.jsonl has no readable rows")
    config = None
    if (path / "config.yaml").is_file():
        try:
            config = yaml.safe_load((path / "config.yaml").read_text())
        except Exception:  # noqa: BLE001 - a broken config only loses the run's description
            config = None
        if isinstance(config, dict) and "method" not in config:
            # an evaluation run logs metrics.jsonl too; without results.json it has not finished
            raise ValueError("metrics.jsonl but no results.json and not a pretraining config "
                             "(unfinished evaluation run?)")
    return PretrainRun(path, rows, config if isinstance(config, dict) else None)


def collect(root: Path, exclude: Path | None = None) -> Collection:
    """Walk ``root`` and read every run folder (see the module docstring)."""
    col = Collection()
    root = Path(root)
    exclude = exclude.resolve() if exclude is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS
                             and (exclude is None or (here / d).resolve() != exclude))
        files = set(filenames)
        try:
            if "results.json" in files:
                col.evals.append(read_eval_run(here))
            elif "viz.json" in files:
                col.viz.append(_read_viz(here))
            elif "profile.json" in files:
                col.profiles.append(_read_profile(here))
            elif "metrics.jsonl" in files:
                col.pretrain.append(_read_pretrain(here))
        except (ValueError, OSError) as exc:
            col.warn(here, f"skipped: {exc}")
    return col


# -------------------------------------------------------------------------------- per-sample predictions
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
    """``predictions/per_image_class.csv`` -> per-patient Dice / Jaccard / HD95 (seed 000 aggregation)."""
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
    rows = [{"image": r["image"], "patient": r["patient"], "class": r["class"],
             **{m: _float(r[m]) for m in metrics}} for r in raw]
    agg = aggregate_seg(rows, by=("patient",), metrics=metrics)
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
