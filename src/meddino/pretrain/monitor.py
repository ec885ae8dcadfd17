"""Online kNN monitor: teacher-backbone CLS features of a small labelled set, weighted kNN accuracy.

The labelled set is a CSV with ``image`` and ``label`` columns (paths relative to the CSV) and optionally
``split`` (train/val); without it a fixed, seeded fraction is held out. Images are resized to the global
crop size (bicubic, antialiased) and normalised with the backbone's mean/std; the features are recomputed
with the current teacher each time. Unreadable images are skipped and counted.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meddino.data import io
from meddino.errors import DataError
from meddino.metrics.knn import knn_scores


class KNNMonitor:
    def __init__(self, manifest: str | Path, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 k: int = 20, temperature: float = 0.07, val_fraction: float = 0.5, batch_size: int = 64,
                 seed: int = 0):
        path = Path(manifest).expanduser()
        if not path.is_file():
            raise DataError(f"monitor.manifest not found: {path}")
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "image" not in rows[0] or "label" not in rows[0]:
            raise DataError(f"monitor.manifest {path}: needs 'image' and 'label' columns")
        images, labels, splits = [], [], []
        self.skipped = 0
        for r in rows:
            p = Path(r["image"])
            p = p if p.is_absolute() else path.parent / p
            try:
                arr = io.read_image(p)
            except DataError:
                self.skipped += 1
                continue
            t = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).unsqueeze(0).float()
            t = F.interpolate(t, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            images.append((t.clamp(0, 255) / 255.0)[0])
            labels.append(r["label"])
            splits.append((r.get("split") or "").strip().lower())
        if len(images) < 2:
            raise DataError(f"monitor.manifest {path}: fewer than 2 readable images")
        classes = sorted(set(labels))
        self.labels = torch.tensor([classes.index(c) for c in labels])
        self.num_classes = len(classes)
        x = torch.stack(images)
        m = torch.tensor(mean).view(1, 3, 1, 1)
        s = torch.tensor(std).view(1, 3, 1, 1)
        self.images = (x - m) / s
        if any(splits):
            is_val = torch.tensor([sp in ("val", "valid", "validation", "test") for sp in splits])
        else:
            gen = torch.Generator().manual_seed(int(seed))
            perm = torch.randperm(len(images), generator=gen)
            is_val = torch.zeros(len(images), dtype=torch.bool)
            is_val[perm[: max(1, int(round(val_fraction * len(images))))]] = True
        if is_val.all() or not is_val.any():
            raise DataError(f"monitor.manifest {path}: needs both train and val images")
        self.is_val = is_val
        self.k, self.temperature, self.batch_size = k, temperature, batch_size

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, device: torch.device, autocast: bool = False) -> dict[str, float]:
        """kNN top-1 accuracy of ``backbone`` (eval mode during the call) on the held-out images."""
        was_training = backbone.training
        backbone.eval()
        feats = []
        try:
            for i in range(0, len(self.images), self.batch_size):
                x = self.images[i : i + self.batch_size].to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    feats.append(backbone.forward_features(x)["cls"].float().cpu())
        finally:
            backbone.train(was_training)
        f = torch.cat(feats)
        tr, va = ~self.is_val, self.is_val
        scores = knn_scores(f[tr], self.labels[tr], f[va], k=self.k, temperature=self.temperature,
                            num_classes=self.num_classes)
        acc = (scores.argmax(dim=1) == self.labels[va]).float().mean().item()
        return {"knn_top1": acc, "knn_n_val": int(va.sum())}
