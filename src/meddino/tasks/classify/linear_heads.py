"""Linear heads on cached features: the one-pass linear-probe grid, its selection, the retrained head.

Split from :mod:`meddino.tasks.classify.frozen` (which runs the protocols over the evaluation units) because
this is the pure tensor math of the heads, also used by fine-tuning (targets, output size, class scores) and
timed on its own by ``benchmarks/linear_grid.py``.

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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from meddino.metrics.classification import accuracy, auroc, predict_labels
from meddino.tasks.classify.results import metric_inputs


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
