"""``meddino eval seg``: per fold, train a head, keep the best-on-validation copy, evaluate the test patients.

Training (seed 000 / seed 001):

- AdamW; heads at ``train.lr``, a trainable encoder at ``train.backbone_lr`` (seed 000: 1e-5).
- After every epoch, the mean foreground Dice on the validation patients (classes averaged per image,
  class absent in both prediction and ground truth not counted) decides: a strictly better value saves a
  real copy of the weights on the CPU (:class:`meddino.tasks.loop.BestSnapshot`, not a reference to the
  live tensors; a tie keeps the earlier epoch); ``train.plateau_patience`` epochs without improvement halve
  the learning rates (the semantics of ``torch.optim.lr_scheduler.ReduceLROnPlateau(mode="max", factor=0.5,
  threshold=0)``, kept in our own scale, :class:`meddino.tasks.loop.PlateauScale`, so that it composes with
  EoMT's warm-up); ``train.early_stop`` epochs without improvement stop. A NaN or infinite training loss
  ends the run with :class:`meddino.errors.TrainingDiverged` (one line, exit code 2).
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
patient, then patients) over all folds' test patients -- each patient is tested exactly once -- both under
``metrics.policy`` (``monai`` or ``seed000``, see docs/metrics.md), which results.json records as
``metric_policy`` so that ``meddino report`` can refuse to rank runs scored differently.
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
from meddino.metrics.segmentation import aggregate_seg, foreground_dice, per_class_seg_metrics
from meddino.models import resolve_backbone
from meddino.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from meddino.runlog import Progress, RunDir, atomic_write, write_json
from meddino.tasks.loop import BestSnapshot, EarlyStopping, PlateauScale, backbone_warmup, check_finite
from meddino.tasks.seg.config import SegConfig
from meddino.tasks.seg.data import FrameDataset, load_seg_data, num_frames
from meddino.tasks.seg.eomt import DEFAULT_ANNEAL_FRACTION, anneal_windows, mask_annealing_probs
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
             device: torch.device, amp: bool) -> float:
    model.eval()
    scores = []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast(device, enabled=amp):
            pred = model.class_scores(x).argmax(1)
        scores.append(foreground_dice(y, pred, num_classes, ignore_index).cpu())
    vals = torch.cat(scores)
    vals = vals[~torch.isnan(vals)]
    return float(vals.mean()) if vals.numel() else 0.0


def _cases(data: SegData, patients: list[str]) -> list[SegCase]:
    keep = set(patients)
    return [c for c in data.cases if c.patient in keep]


def train_fold(cfg: SegConfig, data: SegData, fold: Any, run: Any, device: torch.device, fold_seed: int
               ) -> tuple[SegmentationModel, dict[str, Any], tuple[int, int], tuple, tuple]:
    seed_everything(fold_seed)
    model, size, mean, std = build_model(cfg, data.num_classes)
    model.to(device)
    tc = cfg.train
    train_ds, val_ds, loader, val_loader = _fold_loaders(cfg, data, fold, size, mean, std, fold_seed)
    opt = _optimizer(model, cfg)
    steps_per_epoch = epoch_steps(len(train_ds), tc)
    total_steps = max(1, tc.epochs * steps_per_epoch)
    amp = tc.amp and device.type == "cuda"
    spec = head_spec(cfg.head)
    criterion = None
    if spec.criterion is not None:
        criterion = spec.criterion(data.num_classes, data.ignore_index, spec.options(cfg)).to(device)
    plateau = PlateauScale(tc.plateau_patience, tc.plateau_factor)
    end = anneal_end(cfg, steps_per_epoch, fold.index)
    windows = anneal_windows(model.head.num_blocks, end) if end is not None else None
    loop = _Loop(cfg, model, opt, loader, criterion, spec.mask_classification, plateau, device, amp,
                 data.ignore_index, fold.index, steps_per_epoch, windows)
    # strictly higher val Dice than the best so far (-inf to start: epoch 0 always counts, its Dice is never
    # NaN); a tie keeps the earlier epoch; stop after train.early_stop epochs without improvement
    best = BestSnapshot("max", start=-math.inf)
    stop = EarlyStopping(tc.early_stop)
    step = 0
    t0 = time.perf_counter()
    with Progress(total_steps, f"fold {fold.index} train", unit="step") as bar:
        for epoch in range(tc.epochs):
            train_ds.set_epoch(epoch)
            model.train()
            losses, step = _train_epoch(loop, epoch, step, bar)
            val_dice = validate(model, val_loader, data.num_classes, data.ignore_index, device, amp) if len(val_ds) else 0.0
            lrs = {f"lr_{g['kind']}": g["lr"] for g in opt.param_groups}
            masks = {f"mask_prob_{i}": q for i, q in enumerate(loop.mask_probs(step))} if loop.eomt else {}
            run.log(step, fold=fold.index, epoch=epoch, train_loss=float(np.mean(losses)) if losses else float("nan"),
                    val_dice=val_dice, **lrs, **masks)
            # while masks are still being annealed away, no epoch may be kept nor count towards early stopping
            annealed = end is None or step >= end
            improved = annealed and best.update(val_dice, epoch, model)
            plateau.step(val_dice)
            if annealed and stop.step(improved):
                break
    best.restore(model)
    info = {"best_val_dice": best.value, "best_epoch": best.epoch, "epochs_run": epoch + 1, "steps": step,
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


def anneal_end(cfg: SegConfig, steps_per_epoch: int, fold: int) -> int | None:
    """The completed optimiser step at which EoMT's mask annealing ends (None: no annealing, this head or
    ``eomt.mask_annealing=false``); a run of ``train.epochs`` that ends before it is a ConfigError.

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
        raise ConfigError(f"fold {fold}: EoMT mask annealing needs {end} optimiser steps ({how}), the run has "
                          f"{run_steps} (train.epochs={epochs} x {steps_per_epoch} per epoch); raise "
                          "train.epochs or shorten the annealing, else the kept model would still be masked")
    return end


def check_annealing(cfg: SegConfig, data: SegData, folds: list[Any]) -> None:
    """:func:`anneal_end` for every fold, before the first one trains (a fold's steps per epoch follow
    its training frames)."""
    for fold in folds:
        n = num_frames(_cases(data, fold.train))
        if n:  # no training frames: the fold's DataError says so when it starts
            anneal_end(cfg, epoch_steps(n, cfg.train), fold.index)


def _fold_loaders(cfg: SegConfig, data: SegData, fold: Any, size: tuple[int, int], mean: tuple, std: tuple,
                  fold_seed: int) -> tuple[FrameDataset, FrameDataset, torch.utils.data.DataLoader,
                                           torch.utils.data.DataLoader]:
    """The fold's training (augmented, shuffled by a generator seeded with the fold seed) and validation data."""
    tc = cfg.train
    train_ds = FrameDataset(data, _cases(data, fold.train), size, mean, std, train=tc.augment, seed=fold_seed,
                            rotation_degrees=tc.rotation_degrees)
    val_ds = FrameDataset(data, _cases(data, fold.val), size, mean, std, train=False)
    if len(train_ds) == 0:
        raise DataError(f"fold {fold.index}: no training images")
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
    fold: int
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
        losses.append(check_finite(loss, "eval seg", fold=loop.fold, epoch=epoch, step=step))
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


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_write(path, "w") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(ROW_FIELDS))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in r.items()})


def run_eval_seg(cfg: SegConfig) -> int:
    device = pick_device(cfg.train.device)
    spec = head_spec(cfg.head)
    data = load_seg_data(cfg.data, check=False)  # cases and classes only
    check_model(cfg)  # backbone, head and input size are checked before the slow mask scan
    folds = make_folds(data, cfg.data, cfg.seed)  # and so are the split and folds (no patient on two sides)
    check_annealing(cfg, data, folds)  # and whether every fold's run is long enough to finish EoMT's annealing
    scan(data)
    run = RunDir(cfg.out, cfg, tensorboard=False)
    amp = cfg.train.amp and device.type == "cuda"
    policy = cfg.metrics.policy
    all_rows: list[dict[str, Any]] = []
    fold_results = []
    meta: dict[str, Any] | None = None
    for fold in folds:
        model, info, size, mean, std = train_fold(cfg, data, fold, run, device, cfg.seed + 1000 * fold.index)
        if meta is None:
            eomt = spec.record(model.head, model.options) if spec.record is not None else None
            meta = model_meta(model, data.classes, size, mean, std, data.ignore_index, data.name,
                              window=cfg.data.window, eomt=eomt, monai_channels=cfg.monai_channels)
            meta["params_total"] = sum(p.numel() for p in model.parameters())
            meta["params_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        save_fold_model(run.path / "model", model, meta, fold.index, info)
        mask_dir = run.path / "predictions" / "masks" / f"fold{fold.index}" if cfg.save_predictions else None
        test_cases = _cases(data, fold.test)
        rows = evaluate_fold(model, data, test_cases, fold.index, size, mean, std, device,
                             cfg.train.batch_size, amp, mask_dir, policy)
        all_rows.extend(rows)
        agg = aggregate_seg(rows, policy=policy)
        fold_results.append({"fold": fold.index, "train": fold.train, "val": fold.val, "test": fold.test, **info,
                             "metrics": {m: {"mean": v["mean"], "std": v["std"], "n": v["n"]} for m, v in agg.items()}})
        run.log(info["steps"], fold=fold.index, **{f"test_{m}": v["mean"] for m, v in agg.items()})
    if not all_rows:
        raise DataError("no test rows were produced (every test image had only ignored pixels?)")
    write_rows(run.path / "predictions" / "per_image_class.csv", all_rows)
    agg = _summary(aggregate_seg(all_rows, policy=policy))
    results = {
        "task": "segmentation",
        "protocol": cfg.head,
        "model": cfg.model_name or (cfg.backbone if spec.needs_backbone else f"{cfg.head} (from scratch)"),
        "dataset": cfg.dataset_name or data.name,
        "level": "patient",
        "metric_policy": policy,
        "metrics": agg,
        "hd95_unit": "mm" if data.volumetric else "pixel",
        "classes": data.classes,
        "frozen_backbone": cfg.freeze_backbone if spec.needs_backbone else None,
        "input_size": list(meta["input_size"]) if meta else None,
        "params_total": meta.get("params_total") if meta else None,
        "params_trainable": meta.get("params_trainable") if meta else None,
        "n_patients": len({r["patient"] for r in all_rows}),
        "n_images": len({r["image"] for r in all_rows}),
        "folds": fold_results,
    }
    write_json(run.path / "results.json", results)
    run.close()
    d, h = agg["dice"], agg["hd95"]
    print(f"{results['model']} {cfg.head} on {results['dataset']}: Dice {d['mean']:.4f} +/- {d['std']:.4f}, "
          f"Jaccard {agg['jaccard']['mean']:.4f}, HD95 {h['mean']:.2f} {results['hd95_unit']} "
          f"({results['n_patients']} patients, {len(folds)} fold(s), metric policy {policy}) -> "
          f"{run.path / 'results.json'}")
    return 0
