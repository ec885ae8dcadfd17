"""``meddino eval seg``: per fold, train a head, keep the best-on-validation copy, evaluate the test patients.

Training (seed 000 / seed 001):

- AdamW; heads at ``train.lr``, a trainable encoder at ``train.backbone_lr`` (seed 000: 1e-5).
- After every epoch, the validation patients give a mean foreground Dice (classes averaged per image, class
  absent in both prediction and ground truth not counted) and a validation loss (:func:`validate`: the
  head's own loss, EoMT's mask-classification loss included). A strictly better Dice saves a real copy of the
  weights on the CPU (:class:`meddino.tasks.loop.BestSnapshot`, not a reference to the live tensors; a tie
  keeps the earlier epoch); ``train.plateau_patience`` epochs without a better ``train.plateau_monitor``
  (``dice``, or ``val_loss`` as seed 000: "reduced by half after 10 epochs without an improvement in
  validation loss") scale the learning rates by ``train.plateau_factor`` (the semantics of
  ``torch.optim.lr_scheduler.ReduceLROnPlateau(mode, factor, threshold=0)``, kept in our own scale,
  :class:`meddino.tasks.loop.PlateauScale`, so that it composes with EoMT's warm-up); ``train.early_stop``
  epochs without a better Dice stop. Without validation images (few-shot, ``data.val_fraction=0``) every
  epoch runs at a constant lr and the last epoch is kept. A NaN or infinite training loss ends the run with
  :class:`meddino.errors.TrainingDiverged` (one line, exit code 2).
- Augmentation: horizontal flip, vertical flip, rotation, p 0.5 each (:func:`.data.augment`).
- Linear / U-Net / MONAI U-Net: per-pixel cross-entropy with ``ignore_index``. EoMT: the Mask2Former loss
  (:class:`.eomt.MaskClassificationLoss`) with deep supervision; two-stage warm-up: the heads train alone
  for ``eomt.head_warmup_steps`` (encoder lr 0), then the encoder lr ramps up linearly over
  ``eomt.backbone_warmup_steps``. Mask annealing runs on completed optimiser steps over its own length
  (:func:`anneal_end`: ``eomt.anneal_steps``, ``eomt.anneal_epochs`` or 5/6 of ``train.epochs``), and
  only epochs ending once it is over count for the best epoch and for early stopping: the kept model is one
  that runs without masks, as EoMT infers. A run too short to finish it is refused before any training
  (:func:`check_annealing`). ``eomt.mask_annealing=false`` keeps every mask on, in training and at inference.

Evaluation: the test patients' images (2-D) or volumes (slices predicted and stacked) at native resolution,
:func:`meddino.metrics.segmentation.per_class_seg_metrics` per image / volume (HD95 in pixels for 2-D
frames, in mm with the volume spacing), :func:`~meddino.metrics.segmentation.aggregate_seg` (classes per
patient, then patients), both under ``metrics.policy`` (``monai`` or ``seed000``, see docs/metrics.md), which
results.json records as ``metric_policy`` so that ``meddino report`` can refuse to rank runs scored
differently. ``data.protocol=cv`` pools all folds' test patients (each is tested exactly once);
``data.protocol=seed000`` tests every fold on the same fixed test set and reports mean +/- std over the folds
(:func:`run_eval_seg`); ``fewshot`` is :mod:`.fewshot`.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from meddino.data.seg_layouts import SegCase, SegData, read_case, scan
from meddino.devices import autocast, pick_device, seed_everything
from meddino.errors import ConfigError, DataError
from meddino.metrics.segmentation import aggregate_seg, foreground_dice, metric_policy, per_class_seg_metrics
from meddino.models import resolve_backbone
from meddino.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from meddino.runlog import Progress, RunDir, atomic_write, write_json
from meddino.tasks.loop import BestSnapshot, EarlyStopping, PlateauScale, backbone_warmup, check_finite
from meddino.tasks.seg.config import SegConfig
from meddino.tasks.seg.data import FrameDataset, load_seg_data, num_frames
from meddino.tasks.seg.eomt import DEFAULT_ANNEAL_FRACTION, anneal_windows, mask_annealing_probs, semantic_map_scores
from meddino.tasks.seg.folds import make_folds
from meddino.tasks.seg.heads import SegmentationModel, head_spec
from meddino.tasks.seg.predict import (
    model_meta,
    predict_frames,
    save_fold_model,
    volume_mask_name,
    write_png_mask,
    write_volume_mask,
)

ROW_FIELDS = ("image", "patient", "fold", "class", "dice", "jaccard", "hd95", "tp", "fp", "fn", "gt_present",
              "pred_present")


def _backbone(cfg: SegConfig) -> torch.nn.Module | None:
    return resolve_backbone(cfg.backbone) if head_spec(cfg.head).needs_backbone else None


def input_size(cfg: SegConfig, backbone: torch.nn.Module | None, multiple: int) -> tuple[int, int]:
    """The network input (h, w): ``data.image_size``, else the backbone's pretraining size (224 without
    one); it must be a multiple of the head's ``multiple``."""
    if cfg.data.image_size is not None:
        s = cfg.data.image_size
        size = (int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1]))
    elif backbone is not None:
        size = (int(backbone.img_size), int(backbone.img_size))
    else:
        size = (224, 224)
    if size[0] % multiple or size[1] % multiple:
        raise ConfigError(f"data.image_size {list(size)} must be a multiple of {multiple} for head={cfg.head}"
                          + (f" on {cfg.backbone}" if backbone is not None else ""))
    return size


def build_model(cfg: SegConfig, num_classes: int) -> tuple[SegmentationModel, tuple[int, int], tuple, tuple]:
    """(model, input size (h, w), mean, std) for the config."""
    backbone = _backbone(cfg)
    model = SegmentationModel(backbone, cfg.head, num_classes, freeze_backbone=cfg.freeze_backbone,
                              unet=cfg.unet, eomt=cfg.eomt, monai_channels=cfg.monai_channels)
    size = input_size(cfg, backbone, model.input_multiple)
    if backbone is not None:
        mean, std = tuple(backbone.mean), tuple(backbone.std)
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return model, size, mean, std


def check_model(cfg: SegConfig) -> None:
    """What :func:`build_model` would refuse, found without building a model: the backbone spec is resolved
    (a missing or unreadable checkpoint fails here), the head's registry entry runs its checks on that
    encoder, and the input size is checked against the head's multiple."""
    spec = head_spec(cfg.head)
    backbone = _backbone(cfg)
    options = spec.options(cfg)
    spec.validate(backbone, options)
    input_size(cfg, backbone, spec.input_multiple(backbone, options))


@torch.no_grad()
def validate(model: SegmentationModel, loader: torch.utils.data.DataLoader, num_classes: int, ignore_index: int,
             device: torch.device, amp: bool, criterion: Any = None, seed: int = 0) -> tuple[float, float]:
    """(mean foreground Dice, loss) on the validation patients, from one plain forward pass per batch.

    The loss is the training loss without augmentation: per-pixel cross-entropy over all non-ignored pixels
    (linear, U-Net, MONAI U-Net), or EoMT's mask-classification loss (``criterion``) of the final prediction,
    the one the model is used with (no masked attention, no deep-supervision terms), averaged over images.
    Its random points (EoMT on images larger than ``eomt.num_points``) come from an RNG forked and seeded with
    ``seed``, so every epoch scores the same points and training's random stream is not touched."""
    model.eval()
    scores: list[torch.Tensor] = []
    loss_sum, loss_weight = 0.0, 0
    forked = []
    if device.type == "cuda":
        forked = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with autocast(device, enabled=amp):
                out = model(x)
            if criterion is not None:
                loss_sum += float(criterion(out, y)["loss"]) * len(x)
                loss_weight += len(x)
                pred = semantic_map_scores(out["pred_masks"], out["pred_logits"], tuple(x.shape[-2:])).argmax(1)
            else:
                valid = int((y != ignore_index).sum())
                if valid:
                    loss_sum += float(F.cross_entropy(out.float(), y, ignore_index=ignore_index, reduction="sum"))
                    loss_weight += valid
                pred = out.argmax(1)
            scores.append(foreground_dice(y, pred, num_classes, ignore_index).cpu())
    vals = torch.cat(scores)
    vals = vals[~torch.isnan(vals)]
    dice = float(vals.mean()) if vals.numel() else 0.0
    return dice, (loss_sum / loss_weight if loss_weight else float("nan"))


def _cases(data: SegData, patients: list[str]) -> list[SegCase]:
    keep = set(patients)
    return [c for c in data.cases if c.patient in keep]


def train_fold(cfg: SegConfig, data: SegData, fold: Any, run: Any, device: torch.device, fold_seed: int,
               train_cases: list[SegCase] | None = None, at: dict[str, int] | None = None,
               ) -> tuple[SegmentationModel, dict[str, Any], tuple[int, int], tuple, tuple]:
    """Train one fold's model (``train_cases``: these images instead of all of ``fold.train``'s, few-shot);
    ``at`` names the unit in the log and in a divergence message (default ``{"fold": fold.index}``).

    With validation images the best epoch is kept (val Dice, strictly better), the plateau watches
    ``train.plateau_monitor`` and early stopping counts epochs without a better Dice. Without any (few-shot,
    ``data.val_fraction=0``) nothing can be selected: every epoch runs, the lr stays, the last epoch is kept."""
    seed_everything(fold_seed)
    model, size, mean, std = build_model(cfg, data.num_classes)
    model.to(device)
    tc = cfg.train
    at = at or {"fold": fold.index}
    train_ds, val_ds, loader, val_loader = _fold_loaders(cfg, data, fold, size, mean, std, fold_seed, train_cases)
    opt = _optimizer(model, cfg)
    steps_per_epoch = epoch_steps(len(train_ds), tc)
    total_steps = max(1, tc.epochs * steps_per_epoch)
    amp = tc.amp and device.type == "cuda"
    spec = head_spec(cfg.head)
    criterion = None
    if spec.criterion is not None:
        criterion = spec.criterion(data.num_classes, data.ignore_index, spec.options(cfg)).to(device)
    plateau = PlateauScale(tc.plateau_patience, tc.plateau_factor, "min" if tc.plateau_monitor == "val_loss" else "max")
    end = anneal_end(cfg, steps_per_epoch, ", ".join(f"{k} {v}" for k, v in at.items()))
    windows = anneal_windows(model.head.num_blocks, end) if end is not None else None
    loop = _Loop(cfg, model, opt, loader, criterion, spec.mask_classification, plateau, device, amp,
                 data.ignore_index, at, steps_per_epoch, windows)
    # strictly higher val Dice than the best so far (-inf to start: epoch 0 always counts, its Dice is never
    # NaN); a tie keeps the earlier epoch; stop after train.early_stop epochs without improvement
    best = BestSnapshot("max", start=-math.inf)
    stop = EarlyStopping(tc.early_stop)
    has_val = len(val_ds) > 0
    val_loss_at_best = None
    step = 0
    t0 = time.perf_counter()
    label = " ".join(f"{k} {v}" for k, v in at.items())
    with Progress(total_steps, f"{label} train", unit="step") as bar:
        for epoch in range(tc.epochs):
            train_ds.set_epoch(epoch)
            model.train()
            losses, step = _train_epoch(loop, epoch, step, bar)
            lrs = {f"lr_{g['kind']}": g["lr"] for g in opt.param_groups}
            train_loss = float(np.mean(losses)) if losses else float("nan")
            masks = {f"mask_prob_{i}": q for i, q in enumerate(loop.mask_probs(step))} if loop.eomt else {}
            if not has_val:
                run.log(step, group=at, epoch=epoch, train_loss=train_loss, **lrs, **masks)
                continue
            val_dice, val_loss = validate(model, val_loader, data.num_classes, data.ignore_index, device, amp,
                                          criterion if spec.mask_classification else None, fold_seed)
            run.log(step, group=at, epoch=epoch, train_loss=train_loss, val_dice=val_dice, val_loss=val_loss, **lrs,
                    **masks)
            # while masks are still being annealed away, no epoch may be kept nor count towards early stopping
            annealed = end is None or step >= end
            improved = annealed and best.update(val_dice, epoch, model)
            if improved:
                val_loss_at_best = val_loss
            plateau.step(val_loss if tc.plateau_monitor == "val_loss" else val_dice)
            if annealed and stop.step(improved):
                break
    if has_val:
        best.restore(model)
    info = {"best_val_dice": best.value if has_val else None, "best_epoch": best.epoch if has_val else epoch,
            "val_loss_at_best": val_loss_at_best, "epochs_run": epoch + 1, "steps": step,
            "kept": "best validation Dice" if has_val else "last epoch (no validation images)",
            "train_seconds": round(time.perf_counter() - t0, 2)}
    if end is not None:
        info["anneal_end_step"] = end
    return model, info, size, mean, std


def epoch_steps(n_frames: int, tc: Any) -> int:
    """Optimiser steps per epoch for ``n_frames`` training frames: the batches of :func:`_fold_loaders`'
    loader (the last partial batch dropped when there is more than one), capped by
    ``train.max_steps_per_epoch``."""
    batches = n_frames // tc.batch_size if n_frames > tc.batch_size else 1
    return batches if tc.max_steps_per_epoch is None else min(batches, tc.max_steps_per_epoch)


def anneal_end(cfg: SegConfig, steps_per_epoch: int, where: str) -> int | None:
    """The completed optimiser step at which EoMT's mask annealing ends (None: no annealing, this head or
    ``eomt.mask_annealing=false``); a run of ``train.epochs`` that ends before it is a ConfigError naming
    ``where`` (``fold 0``, ``few-shot N=4 draw 1``).

    Its length is its own (``eomt.anneal_steps``, ``eomt.anneal_epochs`` x steps per epoch, else official
    EoMT's 5/6 of the planned steps), so it does not move with early stopping, which it holds off instead.
    """
    e, epochs = cfg.eomt, cfg.train.epochs
    if not (head_spec(cfg.head).mask_classification and e.mask_annealing):
        return None
    run_steps = epochs * steps_per_epoch
    if e.anneal_steps is not None:
        end, how = e.anneal_steps, f"eomt.anneal_steps={e.anneal_steps}"
    elif e.anneal_epochs is not None:
        end = max(1, round(e.anneal_epochs * steps_per_epoch))
        how = f"eomt.anneal_epochs={e.anneal_epochs:g} x {steps_per_epoch} per epoch"
    else:
        return max(1, round(DEFAULT_ANNEAL_FRACTION * run_steps))
    if end > run_steps:
        raise ConfigError(f"{where}: EoMT mask annealing needs {end} optimiser steps ({how}), the run has "
                          f"{run_steps} (train.epochs={epochs} x {steps_per_epoch} per epoch); raise "
                          "train.epochs or shorten the annealing, else the kept model would still be masked")
    return end


def check_annealing(cfg: SegConfig, data: SegData, folds: list[Any]) -> None:
    """:func:`anneal_end` for every fold, before the first one trains (a fold's steps per epoch follow
    its training frames)."""
    for fold in folds:
        n = num_frames(_cases(data, fold.train))
        if n:  # no training frames: the fold's DataError says so when it starts
            anneal_end(cfg, epoch_steps(n, cfg.train), f"fold {fold.index}")


def _fold_loaders(cfg: SegConfig, data: SegData, fold: Any, size: tuple[int, int], mean: tuple, std: tuple,
                  fold_seed: int, train_cases: list[SegCase] | None = None,
                  ) -> tuple[FrameDataset, FrameDataset, torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """The fold's training (augmented, shuffled by a generator seeded with the fold seed) and validation data."""
    tc = cfg.train
    cases = _cases(data, fold.train) if train_cases is None else train_cases
    train_ds = FrameDataset(data, cases, size, mean, std, train=tc.augment, seed=fold_seed,
                            rotation_degrees=tc.rotation_degrees)
    val_ds = FrameDataset(data, _cases(data, fold.val), size, mean, std, train=False)
    if len(train_ds) == 0:
        raise DataError(f"fold {fold.index}: no training images")  # (few-shot draws are never empty)
    gen = torch.Generator().manual_seed(fold_seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=tc.batch_size, shuffle=True, generator=gen,
                                         num_workers=tc.num_workers, drop_last=len(train_ds) > tc.batch_size,
                                         persistent_workers=False)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=tc.batch_size, shuffle=False,
                                             num_workers=tc.num_workers)
    return train_ds, val_ds, loader, val_loader


def _optimizer(model: SegmentationModel, cfg: SegConfig) -> torch.optim.AdamW:
    """AdamW: the heads at ``train.lr``, a trainable encoder at ``train.backbone_lr``; each group keeps its
    ``base_lr`` (the plateau scale and EoMT's warm-up multiply it) and its ``kind`` (head / backbone)."""
    tc = cfg.train
    head_params, enc_params = model.trainable_groups()
    groups = [{"params": head_params, "lr": tc.lr, "base_lr": tc.lr, "kind": "head"}]
    if enc_params:
        groups.append({"params": enc_params, "lr": tc.backbone_lr, "base_lr": tc.backbone_lr, "kind": "backbone"})
    return torch.optim.AdamW(groups, weight_decay=tc.weight_decay)


@dataclass
class _Loop:
    """What every training step of a fold uses (set up once by :func:`train_fold`)."""

    cfg: SegConfig
    model: SegmentationModel
    opt: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    criterion: Any  # EoMT's mask-classification loss; None for the per-pixel cross-entropy heads
    eomt: bool
    plateau: PlateauScale
    device: torch.device
    amp: bool
    ignore_index: int
    at: dict[str, int]  # the unit being trained ({"fold": k}, or few-shot's {"shots": n, "draw": d})
    steps_per_epoch: int
    anneal: list[tuple[int, int]] | None  # EoMT: each masked block's annealing window; None: masks stay on

    def mask_probs(self, step: int) -> list[float]:
        """EoMT's per-block mask probabilities for the step after ``step`` completed ones."""
        if self.anneal is None:
            return [1.0] * self.model.head.num_blocks
        return mask_annealing_probs(step, self.anneal, self.cfg.eomt.anneal_power)


def _train_epoch(loop: _Loop, epoch: int, step: int, bar: Progress) -> tuple[list[float], int]:
    """One epoch of at most ``steps_per_epoch`` steps -> (the steps' losses, the step count after it)."""
    cfg, model, opt, device = loop.cfg, loop.model, loop.opt, loop.device
    losses = []
    for i, (x, y) in enumerate(loop.loader):
        if i >= loop.steps_per_epoch:
            break
        for g in opt.param_groups:
            factor = loop.plateau.scale
            if loop.eomt and g["kind"] == "backbone":
                factor *= backbone_warmup(step, cfg.eomt.head_warmup_steps, cfg.eomt.backbone_warmup_steps)
            g["lr"] = g["base_lr"] * factor
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, enabled=loop.amp):
            if loop.eomt:
                out = model(x, attn_probs=loop.mask_probs(step), deep_supervision=True)
            else:
                out = model(x)
        if loop.eomt:
            parts = loop.criterion(out, y)
            loss = parts["loss"]
        else:
            loss = F.cross_entropy(out.float(), y, ignore_index=loop.ignore_index)
        losses.append(check_finite(loss, "eval seg", **loop.at, epoch=epoch, step=step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.advance(1, loss=losses[-1])
    return losses, step


def evaluate_fold(model: SegmentationModel, data: SegData, cases: list[SegCase], fold: int, size: tuple[int, int],
                  mean: tuple, std: tuple, device: torch.device, batch_size: int, amp: bool,
                  mask_dir: Path | None, policy: str = "monai") -> list[dict[str, Any]]:
    """Per-image (per-volume), per-class metric rows of the test cases."""
    rows: list[dict[str, Any]] = []
    with Progress(len(cases), f"fold {fold} test", unit="case") as bar:
        for case in cases:
            loaded = read_case(data, case)
            pred = predict_frames(model, loaded.image, size, mean, std, device, batch_size, amp)
            volume = case.kind == "volume"
            p, g = (pred, loaded.mask) if volume else (pred[0], loaded.mask[0])
            metrics = per_class_seg_metrics(g, p, data.num_classes, ignore_index=data.ignore_index,
                                            spacing=loaded.spacing if volume else None, policy=policy)
            for r in metrics:
                rows.append({"image": case.id, "patient": case.patient, "fold": fold,
                             "class": data.classes[int(r["class"])], **{k: r[k] for k in ROW_FIELDS[4:]}})
            if mask_dir is not None:
                safe = case.id.replace("/", "__")
                if volume:
                    write_volume_mask(mask_dir / volume_mask_name(case.image), p, case.image)
                else:
                    write_png_mask(mask_dir / (safe.rsplit(".", 1)[0] + ".png"), p)
            bar.advance(1)
    return rows


def _summary(agg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for m, v in agg.items():
        out[m] = {"mean": v["mean"], "std": v["std"], "n": v["n"],
                  "values": {str(k): val for k, val in v["values"].items()},
                  "per_class": {str(k): val for k, val in v["per_class"].items()}}
    return out


def over_units(per_unit: dict[str, dict[str, dict[str, Any]]], policy: str) -> dict[str, Any]:
    """Mean +/- std over units (seed 000's folds, few-shot draws) of each unit's test metrics.

    ``per_unit``: unit name -> :func:`_summary` of that unit's test rows. Per metric: ``mean`` and ``std``
    (the metric policy's ``ddof``: 0 under ``seed000``, as numpy's default; 1 under ``monai``; 0.0 for one
    unit) of the units' finite means, ``n`` (units counted), ``values`` (unit -> its mean) and ``per_class``
    (class -> mean over units of the unit's per-class value)."""
    ddof = metric_policy(policy).std_ddof
    out: dict[str, Any] = {}
    for m in next(iter(per_unit.values())):
        values = {u: agg[m]["mean"] for u, agg in per_unit.items()}
        finite = np.asarray([v for v in values.values() if v is not None and np.isfinite(v)], dtype=np.float64)
        classes = dict.fromkeys(c for agg in per_unit.values() for c in agg[m]["per_class"])
        per_class = {}
        for c in classes:
            vals = np.asarray([agg[m]["per_class"].get(c, np.nan) for agg in per_unit.values()], dtype=np.float64)
            per_class[c] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        out[m] = {"mean": float(finite.mean()) if finite.size else float("nan"),
                  "std": float(finite.std(ddof=ddof)) if finite.size > 1 else 0.0,
                  "n": int(finite.size), "values": values, "per_class": per_class}
    return out


def results_header(cfg: SegConfig, data: SegData, meta: dict[str, Any] | None, std_over: str) -> dict[str, Any]:
    """The keys every ``eval seg`` results.json starts with, whatever ``data.protocol``."""
    spec = head_spec(cfg.head)
    return {
        "task": "segmentation",
        "protocol": cfg.head,
        "data_protocol": cfg.data.protocol,
        "model": cfg.model_name or (cfg.backbone if spec.needs_backbone else f"{cfg.head} (from scratch)"),
        "dataset": cfg.dataset_name or data.name,
        "level": "patient",
        "std_over": std_over,
        "metric_policy": cfg.metrics.policy,
        "hd95_unit": "mm" if data.volumetric else "pixel",
        "classes": data.classes,
        "frozen_backbone": cfg.freeze_backbone if spec.needs_backbone else None,
        "input_size": list(meta["input_size"]) if meta else None,
        "params_total": meta.get("params_total") if meta else None,
        "params_trainable": meta.get("params_trainable") if meta else None,
    }


def make_meta(cfg: SegConfig, data: SegData, model: SegmentationModel, size: tuple[int, int], mean: tuple,
              std: tuple) -> dict[str, Any]:
    """model.json's description of the network (and its parameter counts)."""
    spec = head_spec(cfg.head)
    eomt = spec.record(model.head, model.options) if spec.record is not None else None
    meta = model_meta(model, data.classes, size, mean, std, data.ignore_index, data.name,
                      window=cfg.data.window, eomt=eomt, monai_channels=cfg.monai_channels)
    meta["params_total"] = sum(p.numel() for p in model.parameters())
    meta["params_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return meta


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_write(path, "w") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(ROW_FIELDS))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in r.items()})


def run_eval_seg(cfg: SegConfig) -> int:
    """``meddino eval seg`` under ``data.protocol``: ``cv`` and ``seed000`` here, ``fewshot`` in :mod:`.fewshot`.

    ``cv``: each patient is tested once; results.json's metrics pool all folds' test patients (mean +/- std
    over patients). ``seed000``: every fold's model tests the same fixed test patients; results.json's
    metrics are mean +/- std over the folds of each fold's test metrics (classes per patient, then patients),
    as seed 000 reports them; each fold's full metrics are under ``folds``."""
    if cfg.data.protocol == "fewshot":
        from meddino.tasks.seg.fewshot import run_fewshot_seg

        return run_fewshot_seg(cfg)
    device = pick_device(cfg.train.device)
    data = load_seg_data(cfg.data, check=False)  # cases and classes only
    check_model(cfg)  # backbone, head and input size are checked before the slow mask scan
    folds = make_folds(data, cfg.data, cfg.seed)  # and so are the split and folds (no patient on two sides)
    check_annealing(cfg, data, folds)  # and whether every fold's run is long enough to finish EoMT's annealing
    scan(data)
    run = RunDir(cfg.out, cfg)
    amp = cfg.train.amp and device.type == "cuda"
    policy = cfg.metrics.policy
    all_rows: list[dict[str, Any]] = []
    fold_results = []
    per_fold: dict[str, dict[str, Any]] = {}
    meta: dict[str, Any] | None = None
    for fold in folds:
        model, info, size, mean, std = train_fold(cfg, data, fold, run, device, cfg.seed + 1000 * fold.index)
        if meta is None:
            meta = make_meta(cfg, data, model, size, mean, std)
        save_fold_model(run.path / "model", model, meta, fold.index, info)
        mask_dir = run.path / "predictions" / "masks" / f"fold{fold.index}" if cfg.save_predictions else None
        test_cases = _cases(data, fold.test)
        rows = evaluate_fold(model, data, test_cases, fold.index, size, mean, std, device,
                             cfg.train.batch_size, amp, mask_dir, policy)
        all_rows.extend(rows)
        agg = _summary(aggregate_seg(rows, policy=policy))
        per_fold[f"fold{fold.index}"] = agg
        fold_results.append({"fold": fold.index, "train": fold.train, "val": fold.val, "test": fold.test, **info,
                             "metrics": agg})
        run.log(info["steps"], group={"fold": fold.index}, **{f"test_{m}": v["mean"] for m, v in agg.items()})
    if not all_rows:
        raise DataError("no test rows were produced (every test image had only ignored pixels?)")
    write_rows(run.path / "predictions" / "per_image_class.csv", all_rows)
    fixed = cfg.data.protocol == "seed000"
    agg = over_units(per_fold, policy) if fixed else _summary(aggregate_seg(all_rows, policy=policy))
    results = {
        **results_header(cfg, data, meta, "folds" if fixed else "patients"),
        "metrics": agg,
        "n_patients": len({r["patient"] for r in all_rows}),
        "n_images": len({r["image"] for r in all_rows}),
        **({"test_patients": folds[0].test} if fixed else {}),
        "folds": fold_results,
    }
    write_json(run.path / "results.json", results)
    run.close()
    d, h = agg["dice"], agg["hd95"]
    over = (f"{len(folds)} fold(s) on the same {results['n_patients']} test patients" if fixed
            else f"{results['n_patients']} patients, {len(folds)} fold(s)")
    print(f"{results['model']} {cfg.head} on {results['dataset']}: Dice {d['mean']:.4f} +/- {d['std']:.4f}, "
          f"Jaccard {agg['jaccard']['mean']:.4f}, HD95 {h['mean']:.2f} {results['hd95_unit']} "
          f"({over}, metric policy {policy}) -> {run.path / 'results.json'}")
    return 0
