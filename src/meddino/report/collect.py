"""Finding and reading run folders for ``meddino report``.

Every folder below ``RUNS_DIR`` is classified by the files it holds:

- ``results.json`` -> an evaluation run (``task`` = ``classification``, ``segmentation`` or ``phase``), with
  its per-sample predictions under ``predictions/`` (see docs/report.md for the columns read);
- ``viz.json`` -> a ``meddino viz pca`` run (its panel PNGs);
- ``profile.json`` -> a ``meddino profile`` run;
- ``metrics.jsonl`` without any of the above -> a pretraining run (training curves).

A folder that cannot be read (bad JSON, unknown task, missing keys) is skipped with one warning line: the
report is built from whatever else is there and never crashes on one bad folder. The readers return plain
Python data; the per-sample prediction files of an evaluation run are read by
:mod:`meddino.report.predictions`, the statistics live in :mod:`meddino.report.build`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meddino.metrics.segmentation import DEFAULT_METRIC_POLICY, METRIC_POLICIES
from meddino.runlog import read_metrics

EVAL_TASKS = ("classification", "segmentation", "phase")
#: sub-folders of a run that never hold another run (saves walking thousands of mask files)
_SKIP_DIRS = {"predictions", "checkpoints", "tensorboard", "mlruns", "wandb", "model", "sweep", "masks", "cache",
              "__pycache__"}
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
    metric_policy: str | None = None  # segmentation: the definitions its metrics were computed with
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


def _metric_policy(task: str, results: dict[str, Any]) -> str | None:
    """A segmentation run's ``metric_policy``; one written before policies existed was scored with the
    definitions that are now ``monai``. None for the other tasks."""
    if task != "segmentation":
        return None
    policy = results.get("metric_policy", DEFAULT_METRIC_POLICY)
    if policy not in METRIC_POLICIES:
        raise ValueError(f"results.json: unknown metric_policy {policy!r} (known: {', '.join(METRIC_POLICIES)})")
    return str(policy)


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
    if task == "segmentation" and results.get("data_protocol") not in (None, "cv"):
        protocol = f"{protocol}-{results['data_protocol']}"  # eomt-seed000, unet-fewshot: not duplicates of cv
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
        metric_policy=_metric_policy(task, results),
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


def read_run_config(folder: Path) -> dict[str, Any] | None:
    """A run folder's config.yaml as a dict; None when it is missing or unreadable (a broken config only
    loses the run's description)."""
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text())
    except Exception:  # noqa: BLE001 - missing, unreadable or not YAML: all the same here
        return None
    return config if isinstance(config, dict) else None


def _read_pretrain(path: Path) -> PretrainRun:
    rows = [r for r in read_metrics(path / "metrics.jsonl") if isinstance(r, dict) and "step" in r]
    if not rows:
        raise ValueError("metrics.jsonl has no readable rows")
    config = read_run_config(path)
    if config is not None and "method" not in config:
        # an evaluation run logs metrics.jsonl too; without results.json it has not finished
        raise ValueError("metrics.jsonl but no results.json and not a pretraining config "
                         "(unfinished evaluation run?)")
    return PretrainRun(path, rows, config)


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
