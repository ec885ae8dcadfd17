"""Frozen-backbone embeddings of a manifest, cached on disk so that every frozen head costs no backbone pass.

Preprocessing (the same for embedding and fine-tuning): read as uint8 RGB (:func:`meddino.data.io.read_image`:
any PIL format, 16-bit, DICOM), bicubic resize (antialiased) of the whole image to ``img_size`` x ``img_size``,
scale to [0, 1], normalise with the backbone's mean/std. No crop: medical findings can sit at the border.

Features per sample, from ``get_intermediate_layers`` over the last ``blocks`` blocks (final norm applied, as
DINOv2's linear evaluation does):

- ``cls`` [D] and ``mean_patch`` [D] of the last block (= ``forward_features``);
- ``cls_blocks`` [n*D]: the CLS tokens of the last n blocks concatenated (DINOv2 ``n_last_blocks``);
- ``mean_patch_blocks`` [n*D]: the mean patch tokens of the last n blocks concatenated.

The linear grid's input sets are ``cls``, ``cls_patch`` (cls ++ mean_patch), ``cls_last4`` (cls_blocks) and
``cls_patch_last4`` (cls_blocks ++ mean_patch of the last block, DINOv2's "avgpool" variant).
A 3D volume (one label per volume) is embedded slice by slice along ``volume_axis``; its features are the mean
of its slice features (seed 001's CT protocol); near-empty slices are skipped when others remain.

Cache folder: ``features.safetensors`` (float32 tensors above + ``labels``), ``rows.csv`` (one row per sample:
index, image, path, patient, split, fold, label), ``embeddings.json`` (backbone, task, classes, sizes).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from meddino.data.geometric import GeometricAugment, sample_seed
from meddino.data.io import read_image
from meddino.data.manifest import Manifest
from meddino.data.transforms import to_tensor
from meddino.data.volumes import read_volume, volume_slices
from meddino.devices import autocast
from meddino.errors import ConfigError, DataError
from meddino.runlog import Progress, atomic_path, atomic_write, write_json

FEATURE_KEYS = ("cls", "mean_patch", "cls_blocks", "mean_patch_blocks")
_SETS = {
    "cls": ("cls",),
    "cls_patch": ("cls", "mean_patch"),
    "cls_last4": ("cls_blocks",),
    "cls_patch_last4": ("cls_blocks", "mean_patch"),
}




class ImageDataset(torch.utils.data.Dataset):
    """Rows of a manifest as normalised tensors, ``(image, row index)``.

    ``augment`` (training images only): a :class:`~meddino.data.geometric.GeometricAugment` run after the
    resize, with a generator seeded by (``seed``, epoch, row) (:meth:`set_epoch`), so an epoch's images are
    the same in every run and with any number of loader workers; ``hflip`` alone is the flip probability of a
    set without other ops. Uncovered pixels are black, as torchvision's fill 0 before normalisation."""

    def __init__(self, paths: list[Path], img_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 hflip: float = 0.0, augment: GeometricAugment | None = None, seed: int = 0):
        self.paths, self.img_size, self.mean, self.std = paths, img_size, mean, std
        if augment is None and hflip > 0:
            augment = GeometricAugment(hflip=hflip)
        self.augment = augment if augment is not None and augment.active else None
        self.fill = [-m / s for m, s in zip(mean, std, strict=True)]  # black after normalisation
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = to_tensor(read_image(self.paths[i], size_hint=self.img_size), self.img_size, self.mean, self.std)
        if self.augment is not None:
            gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i))
            x = self.augment(x, gen, self.fill)
        return x, i


def check_img_size(backbone: nn.Module, img_size: int) -> None:
    patch = int(getattr(backbone, "patch_size", 1))
    if getattr(backbone, "version", "") != "cnn" and img_size % patch:
        raise ConfigError(f"data.img_size={img_size} is not a multiple of the backbone patch size {patch}")


# ----------------------------------------------------------------------------------------------- features
@torch.no_grad()
def extract_features(backbone: nn.Module, x: torch.Tensor, blocks: int = 4) -> dict[str, torch.Tensor]:
    """One batch -> the four feature tensors of the module docstring (float32, on x's device)."""
    n = min(int(blocks), int(getattr(backbone, "depth", blocks)))
    outs = backbone.get_intermediate_layers(x, blocks=n, norm=True)
    cls = [o["cls"].float() for o in outs]
    mean_patch = [o["patch"].float().mean(dim=1) for o in outs]
    return {
        "cls": cls[-1],
        "mean_patch": mean_patch[-1],
        "cls_blocks": torch.cat(cls, dim=-1),
        "mean_patch_blocks": torch.cat(mean_patch, dim=-1),
    }


def feature_set(features: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A named input of the heads (``cls``, ``cls_patch``, ``cls_last4``, ``cls_patch_last4``)."""
    if name not in _SETS:
        raise ConfigError(f"unknown feature set {name!r} (known: {', '.join(_SETS)})")
    return torch.cat([features[k] for k in _SETS[name]], dim=-1)


def _volume_batches(path: Path, axis: int, min_fg: float | None, img_size: int, mean: tuple[float, ...],
                    std: tuple[float, ...], batch_size: int) -> Iterator[torch.Tensor]:
    vol, _ = read_volume(path)
    slices = [s for _, _, s in volume_slices(vol, axes=(axis,), min_foreground=min_fg)]
    if not slices:  # every slice near-empty: use them all rather than nothing
        slices = [s for _, _, s in volume_slices(vol, axes=(axis,))]
    if not slices:
        raise DataError(f"volume {path} has no slices along axis {axis}")
    for start in range(0, len(slices), batch_size):
        yield torch.stack([to_tensor(s, img_size, mean, std) for s in slices[start : start + batch_size]])


def embed_manifest(backbone: nn.Module, m: Manifest, img_size: int, batch_size: int = 64, blocks: int = 4,
                   device: torch.device | None = None, num_workers: int = 0, volume_axis: int = 0,
                   volume_min_foreground: float | None = 0.05) -> dict[str, torch.Tensor]:
    """Features of every row of ``m`` (CPU float32 tensors [N, ...]) with a frozen backbone in eval mode."""
    device = device or torch.device("cpu")
    check_img_size(backbone, img_size)
    backbone = backbone.to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    mean, std = tuple(backbone.mean), tuple(backbone.std)
    n = len(m)
    out: dict[str, torch.Tensor] = {}

    def store(rows: list[int], feats: dict[str, torch.Tensor]) -> None:
        for key, value in feats.items():
            if key not in out:
                out[key] = torch.zeros(n, value.shape[-1], dtype=torch.float32)
            out[key][rows] = value.detach().float().cpu()

    is_vol = m.is_volume()
    image_rows = np.flatnonzero(~is_vol)
    with Progress(n, "embed", unit="img") as bar, torch.no_grad():
        if image_rows.size:
            ds = ImageDataset([m.paths[i] for i in image_rows], img_size, mean, std)
            loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
            for x, local in loader:
                with autocast(device):
                    feats = extract_features(backbone, x.to(device, non_blocking=True), blocks)
                store(image_rows[local.numpy()].tolist(), feats)
                bar.advance(len(local))
        for i in np.flatnonzero(is_vol):
            sums: dict[str, torch.Tensor] = {}
            count = 0
            for x in _volume_batches(m.paths[i], volume_axis, volume_min_foreground, img_size, mean, std,
                                     batch_size):
                with autocast(device):
                    feats = extract_features(backbone, x.to(device), blocks)
                for key, value in feats.items():
                    sums[key] = sums.get(key, 0) + value.float().sum(dim=0)
                count += x.shape[0]
            store([int(i)], {k: (v / count)[None] for k, v in sums.items()})
            bar.advance(1)
    return out


# ---------------------------------------------------------------------------------------------- the cache
@dataclass
class EmbeddingCache:
    features: dict[str, torch.Tensor]
    manifest: Manifest
    meta: dict[str, Any]

    def inputs(self, name: str) -> torch.Tensor:
        return feature_set(self.features, name)


def save_cache(out: Path, features: dict[str, torch.Tensor], m: Manifest, meta: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in features.items():  # safetensors refuses shared storage: copy only where it is shared
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr()
        tensors[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    tensors["labels"] = torch.as_tensor(m.labels, dtype=torch.int64).contiguous()
    with atomic_path(out / "features.safetensors") as tmp:
        save_file(tensors, str(tmp))
    with atomic_write(out / "rows.csv", "w") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["index", "image", "path", "patient", "split", "fold", "label"])
        onehot = m.one_hot()
        for i in range(len(m)):
            label = "|".join(n for n, v in zip(m.names, onehot[i], strict=True) if v) if m.task == "multilabel" \
                else m.names[int(m.labels[i])]
            w.writerow([i, m.images[i], str(m.paths[i]), m.patients[i],
                        "" if m.split is None else m.split[i], "" if m.fold is None else int(m.fold[i]), label])
    info = dict(meta)
    info.update({"n": len(m), "task": m.task, "classes": list(m.names), "label_columns": list(m.label_columns),
                 "dataset": m.dataset, "manifest": str(m.source) if m.source else None,
                 "has_split": m.split is not None, "has_fold": m.fold is not None,
                 "features": {k: list(v.shape) for k, v in features.items()}})
    write_json(out / "embeddings.json", info)
    return out


def load_cache(path: str | Path) -> EmbeddingCache:
    root = Path(path).expanduser()
    for name in ("features.safetensors", "rows.csv", "embeddings.json"):
        if not (root / name).is_file():
            raise DataError(f"embeddings cache {root}: {name} missing (write one with `meddino embed`)")
    try:
        tensors = load_file(str(root / "features.safetensors"))
        meta = json.loads((root / "embeddings.json").read_text())
        with open(root / "rows.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, ValueError, RuntimeError) as exc:
        raise DataError(f"embeddings cache {root}: unreadable ({exc})") from None
    labels = tensors.pop("labels").numpy()
    missing = [k for k in FEATURE_KEYS if k not in tensors]
    if missing or len(rows) != labels.shape[0] or any(v.shape[0] != len(rows) for v in tensors.values()):
        raise DataError(f"embeddings cache {root}: inconsistent files (missing {missing or 'nothing'}, "
                        f"{len(rows)} rows)")
    m = Manifest(
        images=[r["image"] for r in rows],
        paths=[Path(r["path"]) for r in rows],
        patients=np.array([r["patient"] for r in rows], dtype=object).astype(str),
        labels=labels,
        task=meta["task"],
        names=list(meta["classes"]),
        label_columns=list(meta["label_columns"]),
        split=np.array([r["split"] for r in rows], dtype=object).astype(str) if meta.get("has_split") else None,
        fold=np.array([int(r["fold"]) for r in rows], dtype=np.int64) if meta.get("has_fold") else None,
        dataset=meta.get("dataset", root.name),
        source=Path(meta["manifest"]) if meta.get("manifest") else root / "rows.csv",
    )
    return EmbeddingCache(features=dict(tensors), manifest=m, meta=meta)
