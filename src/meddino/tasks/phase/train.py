"""``meddino eval phase``: seed 000's two-stage phase recognition protocol, end to end.

1. **frames**: decode every video once at ``data.fps`` into the frame cache (resumable, :mod:`.data`);
2. **stage 1**: fine-tune the backbone (or train only the head when frozen) as a per-frame phase classifier:
   linear head on the CLS token, cross-entropy (optional balanced class weights), AdamW, seed 000's
   augmentations with torchvision v2; the best epoch on the validation videos is kept (last epoch without
   validation videos). ``stage1.enabled=false`` skips it: features then come from the frozen backbone;
3. **features**: per-video CLS feature sequences [T, D] (and stage-1 logits) written once per video
   (``features/<video>.safetensors``, atomic; an existing file made by the same weights is reused);
4. **stage 2**: causal MS-TCN on whole-video feature sequences, batch of one video, AdamW (lr 7e-4),
   cross-entropy + 0.15 truncated-MSE smoothing; best epoch on validation accuracy kept;
5. **evaluation** on the test videos: accuracy, macro F1, Edit, F1@{10,25,50} per video, mean +/- std
   (``results.json``), per-frame ``predictions/test.csv``, and ``model/`` that ``meddino predict phase`` loads.

Offline evaluation of the causal MS-TCN on the full sequence gives exactly the online frame-by-frame
output (tested), so the reported numbers are those of the online model.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meddino.devices import autocast, pick_device, seed_everything
from meddino.errors import ConfigError, DataError
from meddino.metrics.phase import pooled_f1_at_k, summarize, video_metrics
from meddino.runlog import Progress, RunDir, atomic_path, atomic_write, track, write_json
from meddino.tasks.phase.config import Augment, PhaseEvalConfig, Stage2
from meddino.tasks.phase.data import PhaseVideo, extract_frames, load_phase_dataset
from meddino.tasks.phase.mstcn import MSTCN, MSTCNConfig, mstcn_loss

MODEL_FORMAT = "meddino-phase"


# ------------------------------------------------------------------------------------------- utilities


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


def weights_fingerprint(*modules: nn.Module) -> str:
    """sha1 over parameter and buffer bytes: feature files remember which weights made them."""
    h = hashlib.sha1()
    for module in modules:
        for key, value in sorted(module.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def config_key(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- stage 1


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
    from torchvision.transforms import v2

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


def train_stage1(
    model: FrameClassifier,
    train: tuple[list[Path], list[np.ndarray]],
    val: tuple[list[Path], list[np.ndarray]],
    cfg: PhaseEvalConfig,
    num_classes: int,
    device: torch.device,
    run: RunDir,
) -> dict[str, Any]:
    """Fine-tune ``model`` in place; returns {"best_epoch", "val_accuracy", "train_loss"}."""
    s1 = cfg.stage1
    mean, std = model.backbone.mean, model.backbone.std
    ds = FrameDataset(*train, stride=s1.frame_stride, transform=build_transform(s1.augment, mean, std))
    if len(ds) == 0:
        raise DataError("stage 1: the training videos have no frames")
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=s1.batch_size, shuffle=True, generator=gen, num_workers=s1.num_workers,
        drop_last=len(ds) > s1.batch_size, pin_memory=device.type == "cuda",
        persistent_workers=s1.num_workers > 0,
    )
    weight = class_weights(train[1], num_classes, s1.class_weights)
    weight = weight.to(device) if weight is not None else None
    model.to(device)
    if s1.freeze_backbone:
        model.backbone.requires_grad_(False)
        groups = [{"params": model.head.parameters(), "lr": s1.head_lr or s1.lr}]
    else:
        groups = [
            {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": s1.lr},
            {"params": model.head.parameters(), "lr": s1.head_lr or s1.lr},
        ]
    opt = torch.optim.AdamW(groups, weight_decay=s1.weight_decay)
    best: dict[str, Any] = {"best_epoch": s1.epochs, "val_accuracy": None}
    best_state = None
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
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(y)
                count += len(y)
                step += 1
                bar.advance(1, loss=loss.item(), epoch=epoch)
            row: dict[str, Any] = {"stage": 1, "epoch": epoch, "train_loss": total / max(count, 1)}
            if val[0]:
                acc = frame_accuracy_of(model, val, device, cfg.feature_batch_size)
                row["val_accuracy"] = acc
                if best["val_accuracy"] is None or acc > best["val_accuracy"]:
                    best = {"best_epoch": epoch, "val_accuracy": acc}
                    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            run.log(step, **row)
            best["train_loss"] = row["train_loss"]
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    best["steps"] = step
    return best


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


# ---------------------------------------------------------------------------------------------- features


def feature_file(folder: Path, video: PhaseVideo) -> Path:
    return folder / f"{video.name}.safetensors"


def features_complete(path: Path, fingerprint: str, n_frames: int) -> bool:
    """A feature file counts as done when it was made by the same weights for the same frames."""
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception:  # noqa: BLE001 - a torn or foreign file is simply recomputed
        return False
    return meta.get("fingerprint") == fingerprint and meta.get("frames") == str(n_frames)


def extract_features(
    model: FrameClassifier,
    videos: Sequence[PhaseVideo],
    frame_paths: dict[str, Path],
    folder: Path,
    device: torch.device,
    batch: int,
    with_logits: bool,
    fingerprint: str,
) -> dict[str, Path]:
    """One ``<video>.safetensors`` per video ({features [T, D], labels [T], logits [T, K]}); resumable."""
    from safetensors.torch import save_file

    out = {}
    skipped = 0
    for video in track(videos, "phase features", unit="video"):
        path = feature_file(folder, video)
        out[video.name] = path
        if features_complete(path, fingerprint, len(video.labels)):
            skipped += 1
            continue
        frames = np.load(frame_paths[video.name], mmap_mode="r")
        feats, logits = video_features(model, frames, device, batch, with_logits)
        tensors = {"features": feats.contiguous(), "labels": torch.from_numpy(video.labels.copy())}
        if logits is not None:
            tensors["logits"] = logits.contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint, "frames": str(len(video.labels))})
    if skipped:
        print(f"phase features: reused {skipped} existing file(s) in {folder}", file=sys.stderr)
    return out


def load_features(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------------------------- stage 2


def mstcn_config(s2: Stage2, in_dim: int, num_classes: int) -> MSTCNConfig:
    return MSTCNConfig(
        in_dim=in_dim, num_classes=num_classes, num_stages=s2.num_stages, num_layers=s2.num_layers,
        channels=s2.channels, kernel_size=s2.kernel_size, causal=s2.causal, dropout=s2.dropout,
    )


@torch.no_grad()
def mstcn_probs(model: MSTCN, features: Tensor, device: torch.device) -> Tensor:
    """features [T, D] -> last-stage probabilities [T, K] (offline causal pass = online output)."""
    model.eval()
    logits = model(features.T[None].to(device))[-1, 0]
    return F.softmax(logits.float(), dim=0).T.cpu()


def train_stage2(
    train: list[tuple[Tensor, Tensor]],
    val: list[tuple[Tensor, Tensor]],
    s2: Stage2,
    num_classes: int,
    device: torch.device,
    seed: int,
    run: RunDir,
    step0: int = 0,
) -> tuple[MSTCN, dict[str, Any]]:
    """Train the MS-TCN on (features [T, D], labels [T]) videos, one video per step."""
    torch.manual_seed(seed)
    in_dim = train[0][0].shape[1]
    model = MSTCN(mstcn_config(s2, in_dim, num_classes)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=s2.lr, weight_decay=s2.weight_decay)
    weight = class_weights([y.numpy() for _, y in train], num_classes, s2.class_weights)
    weight = weight.to(device) if weight is not None else None
    rng = np.random.default_rng(seed)
    best: dict[str, Any] = {"best_epoch": s2.epochs, "val_accuracy": None}
    best_state = None
    step = step0
    with Progress(s2.epochs, "phase stage 2 (MS-TCN)", unit="epoch") as bar:
        for epoch in range(1, s2.epochs + 1):
            model.train()
            losses = []
            for i in rng.permutation(len(train)):
                x, y = train[i]
                out = model(x.T[None].to(device))
                loss = mstcn_loss(out, y[None].to(device), None, weight, s2.smooth_weight, s2.tau)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                step += 1
            row: dict[str, Any] = {"stage": 2, "epoch": epoch, "train_loss": float(np.mean(losses))}
            if val:
                accs = [float((mstcn_probs(model, x, device).argmax(1) == y).float().mean()) for x, y in val]
                row["val_accuracy"] = float(np.mean(accs))
                if best["val_accuracy"] is None or row["val_accuracy"] > best["val_accuracy"]:
                    best = {"best_epoch": epoch, "val_accuracy": row["val_accuracy"]}
                    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            run.log(step, **row)
            best["train_loss"] = row["train_loss"]
            bar.advance(1, loss=row["train_loss"])
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, best


# -------------------------------------------------------------------------------------------- saving


def save_model(folder: Path, frame_model: FrameClassifier, mstcn: MSTCN, meta: dict[str, Any], stage1: bool) -> None:
    """``model/``: backbone (meddino export; already there after stage 1), MS-TCN weights, ``model.json``.

    ``model.json`` is written last, so its presence means the folder is complete.
    """
    from safetensors.torch import save_file

    from meddino.models import export_backbone

    folder.mkdir(parents=True, exist_ok=True)
    if not stage1:  # the frozen backbone the features came from
        export_backbone(frame_model.backbone.cpu(), folder / "backbone.safetensors")
    with atomic_path(folder / "mstcn.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in mstcn.state_dict().items()}, str(tmp))
    write_json(folder / "model.json", {"format": MODEL_FORMAT, "format_version": 1, **meta})


def _write_predictions(path: Path, rows: list[tuple[str, int, float, int, int, np.ndarray]], phases: list[str]) -> None:
    with atomic_write(path, "w") as fh:
        w = csv.writer(fh)
        w.writerow(["video", "frame", "time_s", "true", "pred", "true_phase", "pred_phase"]
                   + [f"prob_{i}" for i in range(len(phases))])
        for video, frame, time_s, true, pred, probs in rows:
            w.writerow([video, frame, f"{time_s:.3f}", true, pred, phases[true], phases[pred]]
                       + [f"{p:.6f}" for p in probs])


# ---------------------------------------------------------------------------------------------- runner


def run_eval(cfg: PhaseEvalConfig) -> int:
    """The whole protocol (module docstring); returns 0."""
    t_start = time.time()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    out = Path(cfg.out).expanduser()
    run = RunDir(out, cfg)
    try:
        return _run(cfg, out, run, device, t_start)
    finally:
        run.close()


def _run(cfg: PhaseEvalConfig, out: Path, run: RunDir, device: torch.device, t_start: float) -> int:
    from meddino.models import load_backbone, resolve_backbone

    d = cfg.data

    dataset = load_phase_dataset(
        d.root, d.layout, d.fps, d.phases, d.annotation_fps, d.train_videos, d.val_videos, d.test_videos,
        d.val_fraction, d.test_fraction, cfg.seed,
    )
    sizes = dataset.split_sizes()
    if sizes["train"] == 0:
        raise DataError(f"{d.root}: no training videos (check the split / data.train_videos)")
    if sizes["test"] == 0:
        raise DataError(f"{d.root}: no test videos (check the split / data.test_videos)")
    num_classes = len(dataset.phases)

    backbone = resolve_backbone(cfg.backbone, img_size=d.img_size)
    size = int(d.img_size or backbone.img_size)
    patch = int(getattr(backbone, "patch_size", 1))
    if getattr(backbone, "version", "cnn") != "cnn" and size % patch:
        raise ConfigError(f"data.img_size {size} is not a multiple of the backbone patch size {patch}")

    # 1. frames
    cache = Path(d.cache).expanduser() if d.cache else out / "cache"
    cache = cache / f"frames_{size}px_{d.fps:g}fps"
    frame_paths = {
        v.name: extract_frames(v, d.fps, size, cache) for v in track(dataset.videos, "phase frames", unit="video")
    }

    def pairs(split: str) -> tuple[list[Path], list[np.ndarray]]:
        vids = dataset.split(split)
        return [frame_paths[v.name] for v in vids], [v.labels for v in vids]

    # 2. stage 1
    model = FrameClassifier(backbone, num_classes)
    model_dir = out / "model"
    stage1_key = config_key({"backbone": cfg.backbone, "data": d.model_dump(), "stage1": cfg.stage1.model_dump(),
                             "seed": cfg.seed, "phases": dataset.phases, "size": size,
                             "train": [v.name for v in dataset.split("train")]})
    stage1_info: dict[str, Any] = {"enabled": cfg.stage1.enabled}
    stage1_json = model_dir / "stage1.json"
    if cfg.stage1.enabled:
        prev = json.loads(stage1_json.read_text()) if stage1_json.is_file() else {}
        if cfg.resume and prev.get("key") == stage1_key:
            from safetensors.torch import load_file

            model.backbone = load_backbone(model_dir / "backbone.safetensors", img_size=size)
            model.head.load_state_dict(load_file(str(model_dir / "head.safetensors")))
            stage1_info.update(prev.get("info", {}), resumed=True)
            print(f"phase stage 1: reusing the finished model in {model_dir}", file=sys.stderr)
        else:
            stage1_json.unlink(missing_ok=True)  # the weights about to be written no longer match it
            stage1_info.update(train_stage1(model, pairs("train"), pairs("val"), cfg, num_classes, device, run))
            _save_stage1(model_dir, model, stage1_key, stage1_info)
    else:  # model/backbone.safetensors will hold the frozen backbone: a stage-1 model left there is gone
        stage1_json.unlink(missing_ok=True)
        (model_dir / "head.safetensors").unlink(missing_ok=True)
    model.to(device).eval()

    # 3. features (the fingerprint names everything they depend on: weights, frame size and rate)
    weights = (model.backbone, model.head) if cfg.stage1.enabled else (model.backbone,)
    fingerprint = f"{weights_fingerprint(*weights)}-{size}px-{d.fps:g}fps"
    feature_dir = out / "features"
    feat_paths = extract_features(
        model, dataset.videos, frame_paths, feature_dir, device, cfg.feature_batch_size, cfg.stage1.enabled, fingerprint
    )
    loaded = {name: load_features(p) for name, p in feat_paths.items()}

    def feats(split: str) -> list[tuple[Tensor, Tensor]]:
        return [(loaded[v.name]["features"], loaded[v.name]["labels"]) for v in dataset.split(split)]

    # 4. stage 2
    mstcn, stage2_info = train_stage2(
        feats("train"), feats("val"), cfg.stage2, num_classes, device, cfg.seed, run,
        step0=int(stage1_info.get("steps", 0)),
    )

    # 5. evaluation
    per_video, per_video_frame, pairs_eval, rows = {}, {}, [], []
    for v in dataset.split("test"):
        x, y = loaded[v.name]["features"], loaded[v.name]["labels"].numpy()
        probs = mstcn_probs(mstcn, x, device).numpy()
        pred = probs.argmax(1)
        per_video[v.name] = video_metrics(pred, y)
        pairs_eval.append((pred, y))
        if "logits" in loaded[v.name]:
            per_video_frame[v.name] = video_metrics(loaded[v.name]["logits"].argmax(1).numpy(), y)
        rows += [(v.name, t, t / d.fps, int(y[t]), int(pred[t]), probs[t]) for t in range(len(y))]
    _write_predictions(out / "predictions" / "test.csv", rows, dataset.phases)

    meta = {
        "phases": dataset.phases, "fps": d.fps, "img_size": size,
        "mean": list(model.backbone.mean), "std": list(model.backbone.std), "feature": "cls",
        "backbone": cfg.backbone, "stage1": cfg.stage1.enabled, "mstcn": mstcn.cfg.to_dict(),
    }
    save_model(model_dir, model, mstcn, meta, stage1=cfg.stage1.enabled)

    summary = summarize(per_video)
    results = {
        "task": "phase",
        "protocol": "seed 000 two-stage: frame classifier + causal MS-TCN",
        "model": cfg.model_name or cfg.backbone,
        "dataset": cfg.dataset_name or Path(d.root).name,
        "level": "video",
        "layout": d.layout,
        "backbone": cfg.backbone,
        "phases": dataset.phases,
        "fps": d.fps,
        "img_size": size,
        "split_sizes": sizes,
        "metrics": summary,
        "pooled": pooled_f1_at_k(pairs_eval),
        "frame_model_metrics": summarize(per_video_frame) if per_video_frame else None,
        "per_video": per_video,
        "stage1": stage1_info,
        "stage2": {**stage2_info, "receptive_field": mstcn.receptive_field},
        "device": str(device),
        "seconds": round(time.time() - t_start, 1),
        "metric_notes": "accuracy, macro_f1 in 0-1 (macro F1 over phases present in gt or prediction, per video); "
        "edit, f1@k in 0-100 (MS-TCN definitions); mean/std over test videos (std ddof=1)",
    }
    write_json(out / "results.json", results)
    m = summary
    print(
        f"phase: {sizes['test']} test videos  accuracy {m['accuracy']['mean']:.4f} +/- {m['accuracy']['std']:.4f}  "
        f"macro F1 {m['macro_f1']['mean']:.4f} +/- {m['macro_f1']['std']:.4f}  edit {m['edit']['mean']:.1f}  "
        f"F1@10/25/50 {m['f1@10']['mean']:.1f}/{m['f1@25']['mean']:.1f}/{m['f1@50']['mean']:.1f}"
        f"  -> {out / 'results.json'}"
    )
    return 0


def _save_stage1(folder: Path, model: FrameClassifier, key: str, info: dict[str, Any]) -> None:
    """The finished stage-1 model (``backbone`` + ``head``), so a rerun of the same config skips to features.

    ``stage1.json`` is written last: its key matching the config means both weight files are complete.
    """
    from safetensors.torch import save_file

    from meddino.models import export_backbone

    device = next(model.backbone.parameters()).device
    export_backbone(model.backbone.cpu(), folder / "backbone.safetensors")
    model.backbone.to(device)
    with atomic_path(folder / "head.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, str(tmp))
    write_json(folder / "stage1.json", {"key": key, "info": info})
