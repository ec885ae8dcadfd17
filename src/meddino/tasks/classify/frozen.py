"""Frozen-backbone protocols on cached features: weighted kNN, the linear-probe grid, few-shot linear probes.

Linear heads (seed 001 after DINOv2's linear evaluation):

- A *grid* of heads -- every input set x learning rate x weight decay -- is trained in ONE pass: the heads of
  an input set are one batched weight tensor ``[H, d, C]`` and all sets see the same mini-batches, so trying
  16 heads costs little more than one. Each head is an independent logistic regression (the summed loss
  separates per head, so one backward gives every head its own gradient) optimised with SGD + momentum,
  coupled weight decay (not on the bias) and a cosine learning-rate decay, as DINOv2's linear probe does.
- Selection on the validation set by AUROC (or accuracy / loss), ties broken by the lower validation loss;
  then the chosen head is retrained from scratch on train + val and evaluated on test (seed 001).
- Deliberate difference from DINOv2: inputs are standardised with the training set's mean and std per
  dimension (``normalize``), so one learning-rate grid fits ViTs and CNN baselines alike.

Losses: cross-entropy for multi-class, BCE with logits for binary (one logit) and multi-label (one per label).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from meddino.data.manifest import Manifest
from meddino.data.splits import patient_index, patient_majority
from meddino.errors import DataError
from meddino.metrics.classification import accuracy, auroc, predict_labels
from meddino.metrics.knn import knn_scores
from meddino.runlog import RunDir
from meddino.tasks.classify.common import get_cache, model_name
from meddino.tasks.classify.results import (
    evaluate,
    headline,
    metric_inputs,
    prediction_rows,
    summarize,
    write_predictions,
    write_results,
)
from meddino.tasks.classify.units import make_units

# --------------------------------------------------------------------------------------------- pure math


def head_targets(labels: np.ndarray | torch.Tensor, task: str) -> torch.Tensor:
    """Manifest labels -> loss targets: long [N] (multi-class), float [N, 1] (binary), float [N, L]."""
    y = torch.as_tensor(np.asarray(labels))
    if task == "multiclass":
        return y.long()
    if task == "binary":
        return y.float().view(-1, 1)
    return y.float()


def output_dim(task: str, num_names: int) -> int:
    return 1 if task == "binary" else num_names


def batched_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [B, d], weight [H, d, C], bias [H, C] -> logits [H, B, C] of H independent linear heads."""
    return torch.einsum("bd,hdc->hbc", x, weight) + bias[:, None, :]


def batched_loss(logits: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """Mean loss per head [H] (CE for multi-class, BCE with logits otherwise)."""
    h, b, c = logits.shape
    if task == "multiclass":
        ce = F.cross_entropy(logits.reshape(h * b, c), targets.repeat(h), reduction="none")
        return ce.view(h, b).mean(dim=1)
    bce = F.binary_cross_entropy_with_logits(logits, targets.expand(h, b, c), reduction="none")
    return bce.mean(dim=(1, 2))


def class_scores(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Logits [..., C] -> per-class probabilities: softmax, [1 - p, p] for binary, sigmoid per label."""
    if task == "multiclass":
        return logits.float().softmax(dim=-1)
    p = logits.float().sigmoid()
    if task == "binary":
        return torch.cat([1.0 - p, p], dim=-1)
    return p


def normalizer(train: torch.Tensor, mode: str) -> Any:
    """A function x -> normalised x, its statistics taken from ``train`` only (never val/test)."""
    if mode == "standard":
        mu = train.mean(dim=0, keepdim=True)
        sd = train.std(dim=0, unbiased=False, keepdim=True).clamp_min(1e-6)
        return lambda x: (x - mu) / sd
    if mode == "l2":  # unit norm, rescaled so a dimension has unit scale on average
        scale = math.sqrt(train.shape[1])
        return lambda x: F.normalize(x, dim=1) * scale
    return lambda x: x


def cosine_factor(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def fit_heads(
    inputs: list[torch.Tensor],
    targets: torch.Tensor,
    task: str,
    out_dim: int,
    lrs: list[float],
    weight_decays: list[float],
    epochs: int,
    batch_size: int,
    momentum: float = 0.9,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Train ``len(lrs)`` heads (head h: lr ``lrs[h]``, weight decay ``weight_decays[h]``) on EACH input set,
    all on the same mini-batches in one pass. Returns ``[(weight [H, d_s, C], bias [H, C])]`` per input set.

    Every head of an input set starts from the same initialisation (normal std 0.01, zero bias), so heads
    differ only by their hyper-parameters.
    """
    if len(lrs) != len(weight_decays):
        raise ValueError("lrs and weight_decays give one value per head")
    n = targets.shape[0]
    if any(x.shape[0] != n for x in inputs):
        raise ValueError("every input set needs one row per target")
    heads = len(lrs)
    device = targets.device
    gen = torch.Generator().manual_seed(int(seed))  # CPU generator: the same draws on every device
    params: list[tuple[torch.Tensor, torch.Tensor]] = []
    for x in inputs:
        w0 = (torch.randn(x.shape[1], out_dim, generator=gen) * 0.01).to(device=device, dtype=x.dtype)
        params.append((w0.expand(heads, -1, -1).clone().requires_grad_(True),
                       torch.zeros(heads, out_dim, device=device, dtype=x.dtype, requires_grad=True)))
    lr = torch.tensor(lrs, dtype=torch.float32, device=device)
    wd = torch.tensor(weight_decays, dtype=torch.float32, device=device)
    bufs = [(torch.zeros_like(w), torch.zeros_like(b)) for w, b in params]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size].to(device)
            t = targets[idx]
            loss = sum(batched_loss(batched_logits(x[idx], w, b), t, task).sum()
                       for x, (w, b) in zip(inputs, params, strict=True))
            grads = torch.autograd.grad(loss, [p for pair in params for p in pair])
            lr_t = lr * cosine_factor(step, total)
            with torch.no_grad():
                for s, ((w, b), (bw, bb)) in enumerate(zip(params, bufs, strict=True)):
                    gw, gb = grads[2 * s], grads[2 * s + 1]
                    bw.mul_(momentum).add_(gw + wd.view(-1, 1, 1) * w)
                    bb.mul_(momentum).add_(gb)
                    w.sub_(lr_t.view(-1, 1, 1) * bw)
                    b.sub_(lr_t.view(-1, 1) * bb)
            step += 1
    return [(w.detach(), b.detach()) for w, b in params]


def predict_heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, task: str) -> torch.Tensor:
    """Per-class probabilities [H, N, C'] of every head (C' = 2 for binary)."""
    with torch.no_grad():
        return class_scores(batched_logits(x, weight, bias), task)


def score_heads(scores: torch.Tensor, logits_loss: torch.Tensor, labels: np.ndarray, task: str,
                metric: str) -> np.ndarray:
    """Selection value per head (higher is better): AUROC, accuracy, or minus the loss."""
    out = np.empty(scores.shape[0])
    for h in range(scores.shape[0]):
        s = scores[h].numpy()
        if metric == "loss":
            out[h] = -float(logits_loss[h])
            continue
        y, sm = metric_inputs(task, labels, s)
        if metric == "auroc":
            out[h] = auroc(y, sm, task)
        else:
            out[h] = accuracy(y, predict_labels(sm, task))
    return out


@dataclass
class GridChoice:
    """The head picked on validation, and the whole table of validation results."""

    features: str
    lr: float
    weight_decay: float
    score: float
    table: list[dict[str, Any]] = field(default_factory=list)


def linear_grid(
    train: dict[str, torch.Tensor],
    y_train: np.ndarray,
    val: dict[str, torch.Tensor],
    y_val: np.ndarray,
    task: str,
    out_dim: int,
    lrs: list[float],
    weight_decays: list[float],
    epochs: int = 100,
    batch_size: int = 256,
    momentum: float = 0.9,
    select_metric: str = "auroc",
    normalize: str = "standard",
    seed: int = 0,
) -> GridChoice:
    """Train every (input set, lr, wd) head together, score them on validation, return the best."""
    names = list(train)
    combos = [(lr, wd) for lr in lrs for wd in weight_decays]
    norms = {k: normalizer(train[k], normalize) for k in names}
    tr = [norms[k](train[k]) for k in names]
    heads = fit_heads(tr, head_targets(y_train, task), task, out_dim, [c[0] for c in combos],
                      [c[1] for c in combos], epochs, batch_size, momentum, seed)
    t_val = head_targets(y_val, task)
    table: list[dict[str, Any]] = []
    for k, (w, b) in zip(names, heads, strict=True):
        xv = norms[k](val[k])
        with torch.no_grad():
            logits = batched_logits(xv, w, b)
            losses = batched_loss(logits, t_val, task)
        scores = class_scores(logits, task)
        values = score_heads(scores, losses, y_val, task, select_metric)
        for h, (lr, wd) in enumerate(combos):
            table.append({"features": k, "lr": lr, "weight_decay": wd, f"val_{select_metric}": float(values[h]),
                          "val_loss": float(losses[h])})
    key = f"val_{select_metric}"

    def rank(row: dict[str, Any]) -> tuple[float, float]:
        v = row[key]
        return (-(v if np.isfinite(v) else -np.inf), row["val_loss"])

    best = min(table, key=rank)  # min() keeps the first of equal ranks: deterministic
    return GridChoice(best["features"], best["lr"], best["weight_decay"], best[key], table)


def fit_predict(x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor, task: str, out_dim: int,
                lr: float, weight_decay: float, epochs: int, batch_size: int, momentum: float = 0.9,
                normalize: str = "standard", seed: int = 0) -> np.ndarray:
    """One head trained on (x_train, y_train) -> per-class probabilities of x_test [N, C']."""
    norm = normalizer(x_train, normalize)
    ((w, b),) = fit_heads([norm(x_train)], head_targets(y_train, task), task, out_dim, [lr], [weight_decay],
                          epochs, batch_size, momentum, seed)
    return predict_heads(norm(x_test), w, b, task)[0].numpy()


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
    return RunDir(cfg.out, cfg, tensorboard=False).path


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
    _print_summary("knn", out, summary, cfg.level, f"k={primary_k}")
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
    _print_summary("linear", out, summary, cfg.level, ", ".join(
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
    _print_summary("fewshot", out, variants[key], cfg.level, key)
    return 0


def _print_summary(protocol: str, out: Path, summary: dict[str, Any], level: str, what: str) -> None:
    used, metrics = headline(summary, level)
    parts = [f"{k} {metrics[k]['mean']:.4f} +/- {metrics[k]['std']:.4f}" for k in ("auroc", "accuracy")
             if metrics[k]["mean"] is not None and np.isfinite(metrics[k]["mean"])]
    print(f"{protocol} ({what}), {used} level: {'; '.join(parts) or 'undefined'} -> {out / 'results.json'}")
