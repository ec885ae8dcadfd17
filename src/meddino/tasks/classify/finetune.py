"""Trainable protocols: full fine-tuning (layer-wise lr decay), LoRA (peft) and BitFit, with a lr x batch sweep.

- ``full``: every parameter trains except the backbone's mask token (it only replaces masked patches in the
  masked-image SSL objectives, so classification gives it no gradient: it is frozen); AdamW with layer-wise lr
  decay (lr x ``layer_decay`` ^ (depth + 1 - layer), layer 0 = patch embedding and prefix tokens, block i =
  layer i + 1, final norm and head = depth + 1), as in BEiT/DINOv2 fine-tuning. CNN baselines have no block
  index: all their layers get the base lr.
- ``lora``: peft LoRA adapters (``LoraConfig(r, lora_alpha, target_modules)``; seed 001: r 48, alpha 16 on
  ``qkv``, ``fc1``, ``fc2``) injected into the backbone's timm module (``backbone.vit``, or ``backbone.model``
  for a CNN); only the adapters and the head train. DINOv3 (timm's ``Eva``) needs one more step, see
  :func:`route_qkv_through_module`: its attention otherwise bypasses the ``qkv`` adapters.
- ``bitfit``: only the bias terms of the backbone and the head train (Ben Zaken et al. 2022).

The gradient check (every mode, :func:`check_gradients`): after the first optimiser step every trainable
tensor must have received a non-zero gradient, or the run stops with :class:`~meddino.errors.NoGradient`
(one line naming the tensors, exit code 2) instead of reporting a mode whose tensors never train. Two
tensors legitimately get a zero gradient in the first backward, and only there: LoRA's ``A`` matrices (their
``B`` starts at zero, so dL/dA = 0 until the first step has moved ``B``), and the weights of a residual
branch that stochastic depth happened to drop for the whole batch. So a tensor without a gradient in the
first backward is checked again, right after the first step, by one forward/backward of the same batch in
eval mode (no drop path, no dropout; ``torch.autograd.grad``, so the optimiser's gradients, the random
state and the batch-norm statistics are untouched). A tensor that has no gradient there either does not
reach the loss, and the run stops.

Seed 002's protocol is the ``seed002_binary_cv`` recipe: head Linear -> ReLU -> Linear on the CLS token, BCE,
5-fold CV with the manifest's fixed folds, the lowest-validation-loss weights kept as a real copy (a cloned
state dict, not a reference to the live tensors -- the bug of the public code), and the lr x batch sweep;
its code's optimiser, ``torch.optim.Adam`` with no weight decay and no gradient clipping (``optimizer: adam``,
``weight_decay: 0``, ``grad_clip: null``), and its training augmentation (rotation 10, flip, resized crop
0.9-1.1, shear 10, translate 0.1: ``finetune.augment``, :mod:`meddino.data.geometric`).
The sweep's configuration is chosen on validation (mean best val loss over the folds by default), never on
test; every configuration's test metrics are still written under ``sweep/``.
Augmentation (horizontal flip with probability ``hflip``, then ``finetune.augment``'s geometric ops) runs on
training images only, seeded per (unit seed, epoch, image).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meddino.data.geometric import GeometricAugment
from meddino.data.manifest import Manifest
from meddino.devices import autocast, pick_device
from meddino.errors import ConfigError, DataError, NoGradient
from meddino.runlog import Progress, RunDir
from meddino.tasks.classify.common import load_backbone, load_manifest, model_name
from meddino.tasks.classify.embed import ImageDataset, check_img_size
from meddino.tasks.classify.frozen import print_summary
from meddino.tasks.classify.linear_heads import class_scores, head_targets, output_dim
from meddino.tasks.classify.results import (
    evaluate,
    prediction_rows,
    summarize,
    write_predictions,
    write_results,
)
from meddino.tasks.classify.units import make_units
from meddino.tasks.loop import BestSnapshot, EarlyStopping, check_finite

_NO_DECAY_TOKENS = ("cls_token", "pos_embed", "reg_token", "mask_token", "register_tokens")


class Classifier(nn.Module):
    """Backbone + head on the CLS token (``linear``, or ``mlp`` = Linear -> ReLU -> Linear as in seed 002)."""

    def __init__(self, backbone: nn.Module, num_outputs: int, head: str = "linear", hidden: int = 256):
        super().__init__()
        self.backbone = backbone
        dim = int(backbone.embed_dim)
        if head == "linear":
            self.head: nn.Module = nn.Linear(dim, num_outputs)
        elif head == "mlp":
            self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_outputs))
        else:
            raise ConfigError(f"finetune.head: expected linear or mlp, got {head!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """CE for multi-class; BCE with logits for binary (one logit) and multi-label."""
    logits = logits.float()
    if task == "multiclass":
        return F.cross_entropy(logits, targets)
    return F.binary_cross_entropy_with_logits(logits, targets)


# ------------------------------------------------------------------------------------------ trainability
def _timm_module(backbone: nn.Module) -> nn.Module:
    for attr in ("vit", "model"):
        mod = getattr(backbone, attr, None)
        if isinstance(mod, nn.Module):
            return mod
    return backbone


# a SwiGLU MLP (the DINOv3 "plus" / 7B models in timm) splits the first MLP layer into a gate and a value
SWIGLU_FC1 = ("fc1_g", "fc1_x")


def lora_modules(module: nn.Module, targets: list[str]) -> list[str]:
    """The module names LoRA adapts for ``targets`` (peft's rule: a Linear whose name ends with the target).

    ``fc1`` on a SwiGLU MLP, which has no ``fc1`` but ``fc1_g`` and ``fc1_x``, means those two: the seed's
    ``[qkv, fc1, fc2]`` would otherwise adapt only qkv and fc2 of those models, without a word. A target that
    matches no Linear layer is a :class:`ConfigError` naming the layers there are (peft only refuses a list
    that matches nothing at all).
    """
    linear = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    ends = sorted({name.rsplit(".", 1)[-1] for name in linear})
    resolved: list[str] = []
    for t in targets:
        names = [t]
        if t == "fc1" and "fc1" not in ends and all(g in ends for g in SWIGLU_FC1):
            names = list(SWIGLU_FC1)
        for name in names:
            if not any(n == name or n.endswith("." + name) for n in linear):
                raise ConfigError(f"finetune.lora_targets: '{t}' matches no Linear layer of the backbone "
                                  f"(its Linear layers end in: {', '.join(ends)})")
        resolved += [n for n in names if n not in resolved]
    return resolved


def apply_lora(model: Classifier, r: int, alpha: float, targets: list[str], dropout: float = 0.0) -> list[str]:
    """Inject LoRA adapters into the backbone's timm module; freeze everything but adapters and head.
    Returns the target names used (:func:`lora_modules`)."""
    from peft import LoraConfig, inject_adapter_in_model  # heavy (pulls in transformers); only LoRA needs it

    target = _timm_module(model.backbone)
    targets = lora_modules(target, list(targets))
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    try:
        inject_adapter_in_model(config, target)
    except ValueError as exc:
        raise ConfigError(f"finetune.lora_targets={targets}: {str(exc).splitlines()[0][:200]}") from None
    route_qkv_through_module(target)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("head."))
    return targets


def route_qkv_through_module(target: nn.Module) -> int:
    """Make every timm ``Eva`` attention (DINOv3) whose ``qkv`` holds a LoRA adapter call that module.

    With a qkv bias (the DINOv3 ``_qkvb`` models), timm's ``EvaAttention.forward`` computes
    ``F.linear(x, self.qkv.weight, cat(q_bias, k_bias, v_bias))``: it reads the weight and never calls
    ``self.qkv``, so peft's wrapper around ``qkv`` -- the adapter -- is skipped: its A and B get no gradient
    and change nothing. timm's own ``qkv_bias_separate`` option computes ``self.qkv(x) + bias`` instead: the
    same function (the bias is added after the matmul instead of inside it, equal up to float rounding) that
    goes through the module call, hence through the adapter. This sets it on those attentions (ViTs of v1/v2
    and Eva without a qkv bias already call ``self.qkv``) and returns how many it changed; with ``B`` = 0 at
    init the model computes what it did before the adapters.
    """
    changed = 0
    for module in target.modules():
        qkv = getattr(module, "qkv", None)
        if (hasattr(module, "qkv_bias_separate") and getattr(module, "q_bias", None) is not None
                and hasattr(qkv, "lora_A") and not module.qkv_bias_separate):
            module.qkv_bias_separate = True
            changed += 1
    return changed


def apply_bitfit(model: Classifier) -> None:
    """Only bias terms (backbone and head) and the head's weights train."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias") or name.startswith("head."))


def configure(model: Classifier, mode: str, fc: Any) -> None:
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if hasattr(model.backbone, "mask_token"):  # only used by masked-image SSL objectives
            model.backbone.mask_token.requires_grad_(False)
    elif mode == "lora":
        model.lora_modules = apply_lora(model, fc.lora_r, fc.lora_alpha, fc.lora_targets, fc.lora_dropout)
    elif mode == "bitfit":
        apply_bitfit(model)
    else:
        raise ConfigError(f"finetune.mode: expected full, lora or bitfit, got {mode!r}")


def layer_id(name: str, depth: int) -> int:
    """Layer index for layer-wise lr decay (see module docstring); ``name`` is a Classifier parameter name."""
    if name.startswith("head."):
        return depth + 1
    n = name.removeprefix("backbone.")
    if n.startswith("vit.blocks."):
        return int(n.split(".")[2]) + 1
    if n.startswith(("vit.norm.", "vit.fc_norm.", "vit.head")):
        return depth + 1
    if n.startswith("vit."):
        return 0
    return depth + 1  # CNN layers and anything else: base lr


def param_groups(model: Classifier, lr: float, weight_decay: float, layer_decay: float = 1.0,
                 head_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: per-layer lr (decay) and no weight decay on biases, norms
    and tokens. Each group carries ``lr_scale`` relative to ``lr``."""
    depth = int(getattr(model.backbone, "depth", 0))
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        no_decay = p.ndim <= 1 or any(t in name for t in _NO_DECAY_TOKENS)
        scale = layer_decay ** (depth + 1 - lid)
        if name.startswith("head."):
            scale *= head_lr_scale
        key = (lid if not name.startswith("head.") else depth + 2, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * scale, "lr_scale": scale,
                           "weight_decay": 0.0 if no_decay else weight_decay, "names": []}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def make_optimizer(groups: list[dict[str, Any]], lr: float, name: str = "adamw") -> torch.optim.Optimizer:
    """The optimiser over :func:`param_groups`: ``adamw`` (decoupled weight decay) or ``adam`` (seed 002's
    ``torch.optim.Adam``; a group's weight decay is then an L2 term in the gradient, 0 in its recipe)."""
    params = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ConfigError(f"finetune.optimizer: expected adamw or adam, got {name!r}")


def train_augment(fc: Any) -> GeometricAugment:
    """The training images' augmentation of a ``finetune`` config: ``hflip`` and ``augment``."""
    a = fc.augment
    return GeometricAugment(rotation=a.rotation, hflip=fc.hflip,
                            crop_scale=tuple(a.crop_scale) if a.crop_scale else None,
                            crop_ratio=tuple(a.crop_ratio), shear=a.shear, translate=a.translate)


def _without_grad(named: list[tuple[str, torch.Tensor]], grads: list[torch.Tensor | None]) -> list[str]:
    return [name for (name, _), g in zip(named, grads, strict=True) if g is None or not bool(g.ne(0).any())]


def check_gradients(model: nn.Module, named: list[tuple[str, torch.Tensor]], x: torch.Tensor, y: torch.Tensor,
                    task: str, device: torch.device, mode: str) -> dict[str, int]:
    """The gradient check (module docstring), called after the first backward and optimiser step with that
    step's batch: the trainable ``named`` tensors whose ``.grad`` is None or zero are re-checked by one
    eval-mode forward/backward of the same batch; any still without a gradient -> :class:`NoGradient`.

    Returns ``{"trainable_tensors", "tensors_with_grad", "with_grad_first_backward"}``, the last = tensors
    with a non-zero gradient in the first backward itself, before the re-check."""
    first = set(_without_grad(named, [p.grad for _, p in named]))
    missed = [(n, p) for n, p in named if n in first]
    still: list[str] = []
    if missed:
        was_training = model.training
        model.eval()
        try:
            with autocast(device):
                logits = model(x)
            loss = loss_fn(logits, y, task)
            grads = torch.autograd.grad(loss, [p for _, p in missed], allow_unused=True)
        finally:
            model.train(was_training)
        still = _without_grad(missed, list(grads))
    if still:
        shown = ", ".join(still[:4]) + (f" and {len(still) - 4} more" if len(still) > 4 else "")
        raise NoGradient(f"eval finetune (mode={mode}): {len(still)} of {len(named)} trainable tensors received "
                         f"no gradient in the first step, so they would never train: {shown}")
    return {"trainable_tensors": len(named), "tensors_with_grad": len(named) - len(still),
            "with_grad_first_backward": len(named) - len(missed)}


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up then cosine decay to 0 (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------- training
def _loader(ds: ImageDataset, batch_size: int, shuffle: bool, seed: int, workers: int) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                       num_workers=workers, persistent_workers=False)


@torch.no_grad()
def predict(model: nn.Module, loader: torch.utils.data.DataLoader, targets: torch.Tensor, task: str,
            device: torch.device) -> tuple[float, np.ndarray]:
    """(mean loss, per-class probabilities [N, C']) over a loader, in eval mode."""
    model.eval()
    total, count, outs = 0.0, 0, []
    for x, idx in loader:
        with autocast(device):
            logits = model(x.to(device)).float()
        y = targets[idx].to(device)
        total += float(loss_fn(logits, y, task)) * x.shape[0]
        count += x.shape[0]
        outs.append(class_scores(logits, task).cpu())
    return total / max(count, 1), torch.cat(outs).numpy()


def train_model(model: Classifier, train_ds: ImageDataset, y_train: torch.Tensor, val_ds: ImageDataset,
                y_val: torch.Tensor, task: str, fc: Any, lr: float, batch_size: int, device: torch.device,
                seed: int, log: Any = None) -> dict[str, Any]:
    """Train, validate every epoch, keep the lowest-val-loss weights as a real copy and load them at the end.

    After the first step, :func:`check_gradients` stops the run if a trainable tensor got no gradient."""
    model.to(device)
    groups = param_groups(model, lr, fc.weight_decay, fc.layer_decay if fc.mode == "full" else 1.0,
                          fc.head_lr_scale)
    if not groups:
        raise ConfigError(f"finetune.mode={fc.mode}: no trainable parameters")
    opt = make_optimizer(groups, lr, fc.optimizer)
    train_loader = _loader(train_ds, batch_size, True, seed, fc.num_workers)
    val_loader = _loader(val_ds, max(batch_size, 32), False, seed, fc.num_workers)
    steps_per_epoch = len(train_loader)
    total = fc.epochs * steps_per_epoch
    warmup = int(round(fc.warmup_epochs * steps_per_epoch))
    named = [(n, p) for g in groups for n, p in zip(g["names"], g["params"], strict=True)]
    trainable = [p for _, p in named]
    grad_check: dict[str, int] = {}
    # lowest val loss, strictly lower than the best so far (a tie keeps the earlier epoch); the copy stays on
    # the training device as before; patience None = no early stopping
    best = BestSnapshot("min", start=math.inf, cpu=False)
    stop = EarlyStopping(fc.patience)
    history = []
    step = 0
    torch.manual_seed(seed)
    with Progress(total, "finetune", unit="step") as bar:
        for epoch in range(fc.epochs):
            if hasattr(train_ds, "set_epoch"):  # fresh augmentation draws every epoch, the same in every run
                train_ds.set_epoch(epoch)
            model.train()
            running, seen = 0.0, 0
            for x, idx in train_loader:
                factor = lr_factor(step, total, warmup, fc.schedule)
                for g in opt.param_groups:
                    g["lr"] = lr * g["lr_scale"] * factor
                xb, yb = x.to(device, non_blocking=True), y_train[idx].to(device)
                with autocast(device):
                    logits = model(xb)
                loss = loss_fn(logits, yb, task)
                value = check_finite(loss, "eval finetune", lr=f"{lr:g}", batch_size=batch_size, epoch=epoch,
                                     step=step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if fc.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, fc.grad_clip)
                opt.step()
                if step == 0:
                    grad_check = check_gradients(model, named, xb, yb, task, device, fc.mode)
                running += value * x.shape[0]
                seen += x.shape[0]
                step += 1
                bar.advance(1, loss=value)
            val_loss, _ = predict(model, val_loader, y_val, task, device)
            history.append({"epoch": epoch, "train_loss": running / max(seen, 1), "val_loss": val_loss})
            if log is not None:
                log(epoch=epoch, train_loss=running / max(seen, 1), val_loss=val_loss)
            if stop.step(best.update(val_loss, epoch, model)):  # a REAL copy of the weights, not references
                break
    best.restore(model)
    return {"best_val_loss": best.value, "best_epoch": best.epoch if best.epoch is not None else -1,
            "history": history, "gradient_check": grad_check}


def build_model(cfg: Any, m: Manifest, device: torch.device) -> Classifier:
    backbone = load_backbone(cfg, drop_path_rate=cfg.finetune.drop_path)
    check_img_size(backbone, cfg.data.img_size)
    model = Classifier(backbone, output_dim(m.task, len(m.names)), cfg.finetune.head, cfg.finetune.head_hidden)
    configure(model, cfg.finetune.mode, cfg.finetune)
    return model.to(device)


def _sweep(fc: Any) -> Iterator[tuple[float, int]]:
    yield from itertools.product(fc.lrs, fc.batch_sizes)


def run_finetune(cfg: Any, manifest: Manifest | None = None) -> int:
    run = RunDir(cfg.out, cfg)
    out = run.path
    fc = cfg.finetune
    m = manifest if manifest is not None else load_manifest(cfg)
    if m.is_volume().any():
        raise DataError(f"manifest {m.source}: fine-tuning on 3D volumes is not supported; "
                        "use the frozen protocols (embed, knn, linear, fewshot)")
    units = make_units(m, need_val=True, scheme=cfg.data.scheme, val_fraction=cfg.data.val_fraction, seed=cfg.seed)
    device = pick_device(cfg.device)
    model_display = model_name(cfg)
    targets = head_targets(m.labels, m.task)
    mean, std, n_trainable, n_total, n_tensors, adapted = _probe(cfg, m)
    log_for = _step_logger(run)
    configs = [_sweep_config(cfg, m, units, targets, c, lr, bs, (mean, std), device, log_for, model_display)
               for c, (lr, bs) in enumerate(_sweep(fc))]
    if fc.sweep_select == "val_loss":
        best = min(range(len(configs)), key=lambda i: configs[i]["mean_val_loss"])
    else:
        best = max(range(len(configs)), key=lambda i: np.nan_to_num(configs[i]["mean_val_auroc"], nan=-1.0))
    chosen = configs[best]
    _write_outputs(cfg, m, out, configs, chosen, (n_trainable, n_total, n_tensors), model_display, adapted)
    run.close()
    print_summary(f"finetune-{fc.mode}", out, chosen["summary"], cfg.level,
                  f"lr={chosen['lr']:g} bs={chosen['batch_size']}, {n_trainable} trainable params")
    return 0


def _probe(cfg: Any, m: Manifest) -> tuple[tuple[float, ...], tuple[float, ...], int, int, int, list[str] | None]:
    """The backbone's normalisation, the trainable / total parameter counts, the number of trainable
    tensors and the LoRA target names used (None without LoRA), from a model built on CPU."""
    probe = build_model(cfg, m, torch.device("cpu"))
    mean, std = tuple(probe.backbone.mean), tuple(probe.backbone.std)
    n_trainable = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in probe.parameters())
    n_tensors = sum(1 for p in probe.parameters() if p.requires_grad)
    return mean, std, n_trainable, n_total, n_tensors, getattr(probe, "lora_modules", None)


def _step_logger(run: RunDir) -> Callable[..., Callable[..., None]]:
    """``for_unit(config, lr, batch_size, unit)`` -> a ``log(**values)`` for :func:`train_model`; one step
    counter runs through every configuration and unit of the sweep."""
    step = 0

    def for_unit(c: int, lr: float, bs: int, unit: str) -> Callable[..., None]:
        def log(**values: Any) -> None:
            nonlocal step
            run.log(step, group={"config": c, "unit": unit}, lr=lr, batch_size=bs, **values)
            step += 1

        return log

    return for_unit


def _sweep_config(cfg: Any, m: Manifest, units: list[Any], targets: torch.Tensor, c: int, lr: float, bs: int,
                  norm: tuple[tuple[float, ...], tuple[float, ...]], device: torch.device,
                  log_for: Callable[..., Callable[..., None]], model_display: str) -> dict[str, Any]:
    """One (lr, batch size) of the sweep trained and evaluated on every unit."""
    per_unit, rows, records, val_losses, val_aurocs = [], [], [], [], []
    for i, unit in enumerate(units):
        metrics, val_auroc, info, unit_rows = _fit_unit(cfg, m, unit, cfg.seed + i, targets, lr, bs, norm, device,
                                                        log_for(c, lr, bs, unit.name), model_display)
        per_unit.append(metrics)
        val_losses.append(info["best_val_loss"])
        val_aurocs.append(val_auroc)
        rows += unit_rows
        records.append({"name": unit.name, "n_train": int(unit.train.size), "n_val": int(unit.val.size),
                        "n_test": int(unit.test.size), "best_epoch": info["best_epoch"],
                        "best_val_loss": info["best_val_loss"], "val_auroc": val_auroc,
                        "history": info["history"], "gradient_check": info["gradient_check"],
                        "metrics_image": metrics["image"],
                        "metrics_patient": metrics["patient"]})
    return {"lr": lr, "batch_size": bs, "mean_val_loss": float(np.mean(val_losses)),
            "mean_val_auroc": float(np.nanmean(val_aurocs)) if np.isfinite(val_aurocs).any() else
            float("nan"), "summary": summarize(per_unit, m.names), "units": records, "rows": rows}


def unit_datasets(cfg: Any, m: Manifest, unit: Any, norm: tuple[tuple[float, ...], tuple[float, ...]],
                  seed: int) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """(train, val, test) images of one unit; only the training images are augmented (:func:`train_augment`,
    seeded by ``seed``)."""
    mean, std = norm
    size = cfg.data.img_size
    train_ds = ImageDataset([m.paths[j] for j in unit.train], size, mean, std,
                            augment=train_augment(cfg.finetune), seed=seed)
    val_ds = ImageDataset([m.paths[j] for j in unit.val], size, mean, std)
    test_ds = ImageDataset([m.paths[j] for j in unit.test], size, mean, std)
    return train_ds, val_ds, test_ds


def _fit_unit(cfg: Any, m: Manifest, unit: Any, seed: int, targets: torch.Tensor, lr: float, bs: int,
              norm: tuple[tuple[float, ...], tuple[float, ...]], device: torch.device, log: Callable[..., None],
              model_display: str) -> tuple[dict[str, Any], Any, dict[str, Any], list[dict[str, Any]]]:
    """Train a fresh model on one unit -> (test metrics, validation AUROC, training info, prediction rows)."""
    fc = cfg.finetune
    torch.manual_seed(seed)
    model = build_model(cfg, m, device)
    train_ds, val_ds, test_ds = unit_datasets(cfg, m, unit, norm, seed)
    info = train_model(model, train_ds, targets[unit.train], val_ds, targets[unit.val], m.task, fc, lr, bs,
                       device, seed, log)
    val_loader = _loader(val_ds, max(bs, 32), False, seed, fc.num_workers)
    _, val_scores = predict(model, val_loader, targets[unit.val], m.task, device)
    val_metrics = evaluate(m.task, m.labels[unit.val], val_scores, m.patients[unit.val], cfg.threshold)
    test_loader = _loader(test_ds, max(bs, 32), False, seed, fc.num_workers)
    _, scores = predict(model, test_loader, targets[unit.test], m.task, device)
    metrics = evaluate(m.task, m.labels[unit.test], scores, m.patients[unit.test], cfg.threshold)
    rows = prediction_rows(m, unit.test, scores, unit.name, f"lr={lr:g},bs={bs}", "finetune",
                           model_display, extra={"mode": fc.mode})
    return metrics, val_metrics["image"]["auroc"], info, rows  # type: ignore[index]


def _write_outputs(cfg: Any, m: Manifest, out: Path, configs: list[dict[str, Any]], chosen: dict[str, Any],
                   counts: tuple[int, int, int], model_display: str, lora_modules: list[str] | None = None) -> None:
    """The chosen configuration's predictions and results.json, and every configuration's under ``sweep/``.

    ``counts`` = (trainable parameters, total parameters, trainable tensors); ``tensors_with_grad`` is the
    fewest over every configuration and unit trained (the gradient check passed, so it equals
    ``trainable_tensors``)."""
    fc = cfg.finetune
    n_trainable, n_total, n_tensors = counts
    with_grad = min(u["gradient_check"]["tensors_with_grad"] for c in configs for u in c["units"])
    write_predictions(out / "predictions/finetune.csv", chosen["rows"])
    sweep = []
    for c in configs:
        name = f"sweep/predictions_lr{c['lr']:g}_bs{c['batch_size']}.csv"
        write_predictions(out / name, c["rows"])
        sweep.append({"lr": c["lr"], "batch_size": c["batch_size"], "mean_val_loss": c["mean_val_loss"],
                      "mean_val_auroc": c["mean_val_auroc"], "metrics_image": c["summary"]["image"],
                      "metrics_patient": c["summary"]["patient"], "predictions": name})
    hp = {"mode": fc.mode, "lr": chosen["lr"], "batch_size": chosen["batch_size"], "epochs": fc.epochs,
          "head": fc.head, "optimizer": fc.optimizer, "weight_decay": fc.weight_decay, "grad_clip": fc.grad_clip,
          "hflip": fc.hflip, "augment": fc.augment.model_dump(), "sweep_select": fc.sweep_select,
          "img_size": cfg.data.img_size, "trainable_params": n_trainable, "total_params": n_total}
    if fc.mode == "full":
        hp["layer_decay"] = fc.layer_decay
    if fc.mode == "lora":
        hp.update(lora_r=fc.lora_r, lora_alpha=fc.lora_alpha, lora_targets=fc.lora_targets,
                  lora_modules=lora_modules)
    write_results(out, threshold=cfg.threshold, protocol="finetune", model=model_display, backbone=cfg.backbone, m=m, level=cfg.level,
                  summary=chosen["summary"], units=chosen["units"], hyperparameters=hp,
                  predictions={"finetune": "predictions/finetune.csv"}, primary=f"lr={chosen['lr']:g},bs={chosen['batch_size']}",
                  extra={"mode": fc.mode, "trainable_params": n_trainable, "trainable_tensors": n_tensors,
                         "tensors_with_grad": with_grad, "sweep": sweep})


__all__ = [
    "Classifier",
    "apply_bitfit",
    "apply_lora",
    "check_gradients",
    "configure",
    "layer_id",
    "loss_fn",
    "lora_modules",
    "lr_factor",
    "make_optimizer",
    "param_groups",
    "predict",
    "route_qkv_through_module",
    "run_finetune",
    "train_augment",
    "train_model",
    "unit_datasets",
]
