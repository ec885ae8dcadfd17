"""Frozen-backbone protocols on cached features: weighted kNN, the linear-probe grid, few-shot linear probes.

The linear heads themselves (the one-pass grid, its selection on validation, the retrained head) are in
:mod:`meddino.tasks.classify.linear_heads`; this module draws the few-shot training sets and runs the three
protocols over the evaluation units, writing ``results.json`` and the prediction files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddino.data.manifest import Manifest
from meddino.data.splits import patient_index, patient_majority
from meddino.errors import DataError
from meddino.metrics.knn import knn_scores
from meddino.runlog import RunDir
from meddino.tasks.classify.common import get_cache, model_name
from meddino.tasks.classify.linear_heads import fit_predict, linear_grid, output_dim
from meddino.tasks.classify.results import (
    evaluate,
    headline,
    prediction_rows,
    summarize,
    write_predictions,
    write_results,
)
from meddino.tasks.classify.units import make_units

# -------------------------------------------------------------------------------------------- few-shot
def patient_groups(patients: np.ndarray, labels: np.ndarray, task: str, names: list[str]) -> dict[str, list[str]]:
    """Candidate patients per class for few-shot draws.

    Single-label: a patient belongs to the class of the majority of its rows. Multi-label: a patient is a
    candidate for every label it is positive for on any row, and for ``"none"`` when it has no positive.
    """
    uniq, inverse = patient_index(patients)
    groups: dict[str, list[str]] = {}
    if labels.ndim == 1:
        majority = patient_majority(inverse, uniq.size, labels)
        for pid, c in zip(uniq.tolist(), majority.tolist(), strict=True):
            groups.setdefault(names[int(c)], []).append(pid)
        return groups
    positive = np.zeros((uniq.size, labels.shape[1]), dtype=np.int64)
    np.maximum.at(positive, inverse, labels.astype(np.int64))
    for g, pid in enumerate(uniq.tolist()):
        for name in [names[j] for j in np.flatnonzero(positive[g])] or ["none"]:
            groups.setdefault(name, []).append(pid)
    return groups


def fewshot_draw(patients: np.ndarray, labels: np.ndarray, task: str, names: list[str], shots: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, list[str]]] | None:
    """Row indices of ``shots`` distinct patients per class (all rows of each drawn patient), or None when a
    class has too few candidates. Classes with the fewest candidates draw first; a patient is drawn once."""
    groups = patient_groups(patients, labels, task, names)
    wanted = list(names) if labels.ndim == 1 else [*names, "none"]
    wanted = [g for g in wanted if g in groups or labels.ndim == 1]
    chosen: dict[str, list[str]] = {}
    taken: set[str] = set()
    for g in sorted(wanted, key=lambda g: len(groups.get(g, []))):
        candidates = [p for p in groups.get(g, []) if p not in taken]
        if len(candidates) < shots:
            return None
        pick = [candidates[i] for i in sorted(rng.choice(len(candidates), size=shots, replace=False))]
        chosen[g] = pick
        taken.update(pick)
    rows = np.flatnonzero(np.isin(patients, list(taken)))
    return rows, chosen


# -------------------------------------------------------------------------------------------- protocols
def _out_dir(cfg: Any) -> Path:
    return RunDir(cfg.out, cfg).path


def _context(cfg: Any, need_val: bool, manifest: Manifest | None) -> tuple[Path, Any, Manifest, list[Any], str]:
    out = _out_dir(cfg)
    cache = get_cache(cfg, out, manifest)
    m = cache.manifest
    units = make_units(m, need_val=need_val, scheme=cfg.data.scheme, val_fraction=cfg.data.val_fraction,
                       seed=cfg.seed)
    return out, cache, m, units, model_name(cfg, cache.meta)


def _unit_record(unit: Any, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": unit.name, "n_train": int(unit.train.size), "n_val": int(unit.val.size),
            "n_test": int(unit.test.size), "metrics_image": metrics["image"],
            "metrics_patient": metrics["patient"], **extra}


def run_knn(cfg: Any, manifest: Manifest | None = None) -> int:
    out, cache, m, units, model = _context(cfg, need_val=False, manifest=manifest)
    feats = cache.inputs(cfg.knn.features)
    labels = torch.as_tensor(m.labels)
    num_classes = len(m.names) if m.task != "multilabel" else None
    primary_k = cfg.knn.primary_k or (20 if 20 in cfg.knn.k else cfg.knn.k[-1])
    variants: dict[str, Any] = {}
    predictions: dict[str, str] = {}
    unit_records: list[dict[str, Any]] = []
    for k in cfg.knn.k:
        per_unit, rows = [], []
        for unit in units:
            train = np.concatenate([unit.train, unit.val])  # kNN chooses nothing on val: it is training data
            scores = knn_scores(feats[train], labels[train], feats[unit.test], k=k,
                                temperature=cfg.knn.temperature, num_classes=num_classes).numpy()
            metrics = evaluate(m.task, m.labels[unit.test], scores, m.patients[unit.test], cfg.threshold)
            per_unit.append(metrics)
            rows += prediction_rows(m, unit.test, scores, unit.name, f"k={k}", "knn", model)
            if k == primary_k:
                unit_records.append(_unit_record(unit, metrics))
        name = f"predictions/knn_k{k}.csv"
        write_predictions(out / name, rows)
        predictions[f"k={k}"] = name
        variants[f"k={k}"] = summarize(per_unit, m.names)
    summary = variants[f"k={primary_k}"]
    write_results(out, threshold=cfg.threshold, protocol="knn", model=model, backbone=cfg.backbone or cache.meta.get("backbone"), m=m,
                  level=cfg.level, summary=summary, units=unit_records,
                  hyperparameters={"k": primary_k, "ks": cfg.knn.k, "temperature": cfg.knn.temperature,
                                   "features": cfg.knn.features},
                  predictions=predictions, primary=f"k={primary_k}", extra={"variants": variants})
    print_summary("knn", out, summary, cfg.level, f"k={primary_k}")
    return 0


def run_linear(cfg: Any, manifest: Manifest | None = None) -> int:
    out, cache, m, units, model = _context(cfg, need_val=True, manifest=manifest)
    lc = cfg.linear
    sets = {name: cache.inputs(name) for name in dict.fromkeys(lc.features)}
    out_dim = output_dim(m.task, len(m.names))
    per_unit, rows, unit_records = [], [], []
    for i, unit in enumerate(units):
        if unit.val.size == 0:
            raise DataError(f"{unit.name}: the linear grid needs validation rows")
        choice = linear_grid({k: v[unit.train] for k, v in sets.items()}, m.labels[unit.train],
                             {k: v[unit.val] for k, v in sets.items()}, m.labels[unit.val], m.task, out_dim,
                             lc.lrs, lc.weight_decays, lc.epochs, lc.batch_size, lc.momentum, lc.select_metric,
                             lc.normalize, cfg.seed + i)
        fit_rows = np.concatenate([unit.train, unit.val]) if lc.retrain_on_trainval else unit.train
        x = sets[choice.features]
        scores = fit_predict(x[fit_rows], m.labels[fit_rows], x[unit.test], m.task, out_dim, choice.lr,
                             choice.weight_decay, lc.epochs, lc.batch_size, lc.momentum, lc.normalize,
                             cfg.seed + i)
        metrics = evaluate(m.task, m.labels[unit.test], scores, m.patients[unit.test], cfg.threshold)
        per_unit.append(metrics)
        chosen = {"features": choice.features, "lr": choice.lr, "weight_decay": choice.weight_decay,
                  f"val_{lc.select_metric}": choice.score}
        rows += prediction_rows(m, unit.test, scores, unit.name, choice.features, "linear", model)
        unit_records.append(_unit_record(unit, metrics, chosen=chosen, grid=choice.table))
    write_predictions(out / "predictions/linear.csv", rows)
    summary = summarize(per_unit, m.names)
    hp = {"grid": {"features": lc.features, "lrs": lc.lrs, "weight_decays": lc.weight_decays},
          "epochs": lc.epochs, "batch_size": lc.batch_size, "select_metric": lc.select_metric,
          "normalize": lc.normalize, "retrain_on_trainval": lc.retrain_on_trainval,
          "chosen": [u["chosen"] for u in unit_records]}
    write_results(out, threshold=cfg.threshold, protocol="linear", model=model, backbone=cfg.backbone or cache.meta.get("backbone"), m=m,
                  level=cfg.level, summary=summary, units=unit_records, hyperparameters=hp,
                  predictions={"linear": "predictions/linear.csv"}, primary="linear")
    print_summary("linear", out, summary, cfg.level, ", ".join(
        f"{c['features']} lr={c['lr']:g} wd={c['weight_decay']:g}" for c in hp["chosen"]))
    return 0


def run_fewshot(cfg: Any, manifest: Manifest | None = None) -> int:
    out, cache, m, units, model = _context(cfg, need_val=False, manifest=manifest)
    fc = cfg.fewshot
    x = cache.inputs(fc.features)
    out_dim = output_dim(m.task, len(m.names))
    variants: dict[str, Any] = {}
    predictions: dict[str, str] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    for shots in sorted(set(fc.shots)):
        key = f"n={shots}"
        per_draw, rows, recs = [], [], []
        for u, unit in enumerate(units):
            pool = unit.train  # validation and test patients are never drawn
            for draw in range(fc.draws):
                rng = np.random.default_rng([cfg.seed, shots, draw, u])
                got = fewshot_draw(m.patients[pool], m.labels[pool], m.task, m.names, shots, rng)
                if got is None:  # depends only on the class sizes: no draw of this N can succeed
                    skipped[key] = f"{unit.name}: a class has fewer than {shots} training patients"
                    break
                local, chosen = got
                train = pool[local]
                scores = fit_predict(x[train], m.labels[train], x[unit.test], m.task, out_dim, fc.lr,
                                     fc.weight_decay, fc.epochs, fc.batch_size, 0.9, fc.normalize,
                                     cfg.seed + 1000 * draw + u)
                metrics = evaluate(m.task, m.labels[unit.test], scores, m.patients[unit.test], cfg.threshold)
                per_draw.append(metrics)
                name = f"{unit.name}/draw{draw}"
                rows += prediction_rows(m, unit.test, scores, name, key, "fewshot", model, extra={"draw": draw})
                recs.append(_unit_record(unit, metrics, draw=draw, n_train_rows=int(train.size),
                                         patients=chosen) | {"name": name})
            if key in skipped:
                break
        if key in skipped:
            continue
        fname = f"predictions/fewshot_n{shots}.csv"
        write_predictions(out / fname, rows)
        predictions[key] = fname
        variants[key] = summarize(per_draw, m.names)
        records[key] = recs
    if not variants:
        raise DataError(f"few-shot: no N in {fc.shots} can be drawn ({'; '.join(skipped.values())})")
    done = [int(k[2:]) for k in variants]
    primary = fc.primary_shots if fc.primary_shots in done else max(done)
    key = f"n={primary}"
    write_results(out, threshold=cfg.threshold, protocol="fewshot", model=model, backbone=cfg.backbone or cache.meta.get("backbone"), m=m,
                  level=cfg.level, summary=variants[key], units=records[key],
                  hyperparameters={"shots": primary, "all_shots": done, "draws": fc.draws, "features": fc.features,
                                   "lr": fc.lr, "weight_decay": fc.weight_decay, "epochs": fc.epochs,
                                   "normalize": fc.normalize},
                  predictions=predictions, primary=key, extra={"variants": variants, "skipped": skipped})
    print_summary("fewshot", out, variants[key], cfg.level, key)
    return 0


def print_summary(protocol: str, out: Path, summary: dict[str, Any], level: str, what: str) -> None:
    """The one-line result of a protocol run (headline AUROC / accuracy at the reported level)."""
    used, metrics = headline(summary, level)
    parts = [f"{k} {metrics[k]['mean']:.4f} +/- {metrics[k]['std']:.4f}" for k in ("auroc", "accuracy")
             if metrics[k]["mean"] is not None and np.isfinite(metrics[k]["mean"])]
    print(f"{protocol} ({what}), {used} level: {'; '.join(parts) or 'undefined'} -> {out / 'results.json'}")
