"""Stage 1 of ``meddino eval phase``: the per-frame phase classifier, its frame dataset and its training.

Kept apart from the runner (:mod:`.train`) because feature extraction (:mod:`.features`) and the resumable
stage-1 save use the same model: backbone + linear head on the CLS token, trained with cross-entropy
(optional balanced class weights), AdamW and seed 000's augmentations (torchvision v2 plus the RGB shift of
albumentations); the best epoch on the validation videos' frame accuracy is kept (strictly better only, so a
tie keeps the earlier epoch; the last epoch when there are no validation videos). No early stopping.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torchvision.transforms import v2

from meddino.devices import autocast
from meddino.errors import DataError
from meddino.models import export_backbone
from meddino.runlog import Progress, RunDir, atomic_path, write_json
from meddino.tasks.loop import BestSnapshot, check_finite
from meddino.tasks.phase.config import Augment, PhaseEvalConfig


def class_weights(labels: Sequence[np.ndarray], num_classes: int, kind: str) -> Tensor | None:
    """``balanced``: n_samples / (n_present_classes * count_c), scikit-learn's rule; absent classes get 1."""
    if kind == "none":
        return None
    counts = np.bincount(np.concatenate(list(labels)), minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.ones(num_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def normalise(frames: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W]."""
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class FrameClassifier(nn.Module):
    """Backbone + linear phase head on the CLS token (seed 000's stage-1 model)."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.embed_dim), num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.backbone.forward_features(x)["cls"]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return f, self.head(f)


class RandomRGBShift(nn.Module):
    """Add one random offset in [-limit, limit] (0-255 scale) per channel with probability ``p``.

    The RGBShift of albumentations that seed 000 uses; torchvision has no equivalent transform.
    """

    def __init__(self, limit: float = 20.0, p: float = 0.5):
        super().__init__()
        self.limit, self.p = float(limit), float(p)

    def forward(self, img: Tensor) -> Tensor:
        if self.limit <= 0 or torch.rand(()) >= self.p:
            return img
        shift = (torch.rand(3, 1, 1) * 2 - 1) * self.limit
        if img.dtype == torch.uint8:
            return (img.float() + shift).round().clamp(0, 255).to(torch.uint8)
        return (img + shift / 255.0).clamp(0, 1)


def build_transform(aug: Augment | None, mean: Sequence[float], std: Sequence[float]):
    """uint8 [3, H, W] -> normalised float; ``aug=None`` for evaluation."""
    ops: list[Any] = []
    if aug is not None:
        ops += [
            v2.RandomApply(
                [v2.RandomAffine(degrees=aug.rotation, scale=(1 - aug.scale, 1 + aug.scale))], p=aug.p_affine
            ),
            RandomRGBShift(aug.rgb_shift, aug.p_rgb_shift),
            v2.RandomApply([v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast)], p=aug.p_color),
        ]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


class FrameDataset(torch.utils.data.Dataset):
    """(frame, phase) pairs from the frame cache; arrays are memory-mapped lazily (safe with workers)."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[np.ndarray], stride: int, transform):
        self.paths = list(paths)
        self.labels = list(labels)
        self.index = [(v, t) for v, lab in enumerate(self.labels) for t in range(0, len(lab), stride)]
        self.transform = transform
        self._arrays: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        v, t = self.index[i]
        if v not in self._arrays:
            self._arrays[v] = np.load(self.paths[v], mmap_mode="r")
        img = torch.from_numpy(np.array(self._arrays[v][t])).permute(2, 0, 1)
        return self.transform(img), int(self.labels[v][t])


def _loader(ds: FrameDataset, s1: Any, seed: int, device: torch.device) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        ds, batch_size=s1.batch_size, shuffle=True, generator=gen, num_workers=s1.num_workers,
        drop_last=len(ds) > s1.batch_size, pin_memory=device.type == "cuda",
        persistent_workers=s1.num_workers > 0,
    )


def _optimizer(model: FrameClassifier, s1: Any) -> torch.optim.Optimizer:
    if s1.freeze_backbone:
        model.backbone.requires_grad_(False)
        groups = [{"params": model.head.parameters(), "lr": s1.head_lr or s1.lr}]
    else:
        groups = [
            {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": s1.lr},
            {"params": model.head.parameters(), "lr": s1.head_lr or s1.lr},
        ]
    return torch.optim.AdamW(groups, weight_decay=s1.weight_decay)


def train_stage1(
    model: FrameClassifier,
    train: tuple[list[Path], list[np.ndarray]],
    val: tuple[list[Path], list[np.ndarray]],
    cfg: PhaseEvalConfig,
    num_classes: int,
    device: torch.device,
    run: RunDir,
) -> dict[str, Any]:
    """Fine-tune ``model`` in place; returns {"best_epoch", "val_accuracy", "train_loss", "steps"}."""
    s1 = cfg.stage1
    mean, std = model.backbone.mean, model.backbone.std
    ds = FrameDataset(*train, stride=s1.frame_stride, transform=build_transform(s1.augment, mean, std))
    if len(ds) == 0:
        raise DataError("stage 1: the training videos have no frames")
    loader = _loader(ds, s1, cfg.seed, device)
    weight = class_weights(train[1], num_classes, s1.class_weights)
    weight = weight.to(device) if weight is not None else None
    model.to(device)
    opt = _optimizer(model, s1)
    best = BestSnapshot("max")  # the first validated epoch is always taken, then strictly better only
    train_loss = float("nan")
    step = 0
    with Progress(s1.epochs * len(loader), "phase stage 1", unit="batch") as bar:
        for epoch in range(1, s1.epochs + 1):
            model.train()
            if s1.freeze_backbone:
                model.backbone.eval()
            total, count = 0.0, 0
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast(device):
                    if s1.freeze_backbone:
                        with torch.no_grad():
                            f = model.features(x)
                        logits = model.head(f.float())
                    else:
                        _, logits = model(x)
                loss = F.cross_entropy(logits.float(), y, weight=weight)
                value = check_finite(loss, "eval phase stage 1", epoch=epoch, step=step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += value * len(y)
                count += len(y)
                step += 1
                bar.advance(1, loss=value, epoch=epoch)
            train_loss = total / max(count, 1)
            row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss}
            if val[0]:
                row["val_accuracy"] = frame_accuracy_of(model, val, device, cfg.feature_batch_size)
                best.update(row["val_accuracy"], epoch, model)
            run.log(step, group={"stage": 1}, **row)
    best.restore(model)
    model.eval()
    # best_epoch is the last epoch without validation videos; train_loss is the last epoch's, as before
    return {"best_epoch": best.epoch if best.epoch is not None else s1.epochs, "val_accuracy": best.value,
            "train_loss": train_loss, "steps": step}


@torch.no_grad()
def frame_accuracy_of(
    model: FrameClassifier, data: tuple[list[Path], list[np.ndarray]], device: torch.device, batch: int
) -> float:
    """Frame accuracy of the stage-1 classifier pooled over the given videos."""
    model.eval()
    correct = total = 0
    for path, labels in zip(*data):
        _, logits = video_features(model, np.load(path, mmap_mode="r"), device, batch, with_logits=True)
        correct += int((logits.argmax(1).numpy() == labels[: len(logits)]).sum())
        total += len(logits)
    return correct / max(total, 1)


@torch.no_grad()
def video_features(
    model: FrameClassifier, frames: np.ndarray, device: torch.device, batch: int, with_logits: bool
) -> tuple[Tensor, Tensor | None]:
    """uint8 [T, H, W, 3] -> CLS features [T, D] (float32, CPU) and head logits [T, K] if asked."""
    model.eval()
    feats, logits = [], []
    mean, std = model.backbone.mean, model.backbone.std
    for start in range(0, len(frames), batch):
        chunk = torch.from_numpy(np.array(frames[start : start + batch])).to(device)
        with autocast(device):
            f = model.features(normalise(chunk, mean, std))
        f = f.float()
        feats.append(f.cpu())
        if with_logits:
            logits.append(model.head(f).float().cpu())
    return torch.cat(feats), (torch.cat(logits) if with_logits else None)


def save_stage1(folder: Path, model: FrameClassifier, key: str, info: dict[str, Any]) -> None:
    """The finished stage-1 model (``backbone`` + ``head``), so a rerun of the same config skips to features.

    ``stage1.json`` is written last: its key matching the config means both weight files are complete.
    """
    device = next(model.backbone.parameters()).device
    export_backbone(model.backbone.cpu(), folder / "backbone.safetensors")
    model.backbone.to(device)
    with atomic_path(folder / "head.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, str(tmp))
    write_json(folder / "stage1.json", {"key": key, "info": info})
