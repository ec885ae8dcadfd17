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

This module is the run orchestration (steps 1-5 and the ``model/`` folder); stage 1 is
:mod:`.frame_model`, step 3 :mod:`.features`, stage 2 :mod:`.stage2`. ``meddino.tasks.phase.train:run_eval``
is the runner the CLI declares.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from meddino.devices import pick_device, seed_everything
from meddino.errors import ConfigError, DataError
from meddino.metrics.phase import pooled_f1_at_k, summarize, video_metrics
from meddino.models import export_backbone, load_backbone, resolve_backbone
from meddino.runlog import RunDir, atomic_path, atomic_write, track, write_json
from meddino.tasks.phase.config import PhaseEvalConfig
from meddino.tasks.phase.data import PhaseDataset, load_phase_dataset
from meddino.tasks.phase.features import extract_features, load_features, weights_fingerprint
from meddino.tasks.phase.frame_model import FrameClassifier, save_stage1, train_stage1
from meddino.tasks.phase.frames import extract_frames
from meddino.tasks.phase.mstcn import MSTCN
from meddino.tasks.phase.stage2 import mstcn_probs, train_stage2

MODEL_FORMAT = "meddino-phase"

Pairs = tuple[list[Path], list[np.ndarray]]  # (frame-cache paths, per-frame labels) of a split's videos


def config_key(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# -------------------------------------------------------------------------------------------- saving


def save_model(folder: Path, frame_model: FrameClassifier, mstcn: MSTCN, meta: dict[str, Any], stage1: bool) -> None:
    """``model/``: backbone (meddino export; already there after stage 1), MS-TCN weights, ``model.json``.

    ``model.json`` is written last, so its presence means the folder is complete.
    """
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
    dataset = _dataset(cfg)  # before RunDir writes: a refused split (a leak, no test video) leaves no folder
    run = RunDir(out, cfg)
    try:
        return _run(cfg, dataset, out, run, device, t_start)
    finally:
        run.close()


def _dataset(cfg: PhaseEvalConfig) -> PhaseDataset:
    """The videos and their split; DataError without training or test videos."""
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
    return dataset


def _backbone(cfg: PhaseEvalConfig) -> tuple[torch.nn.Module, int]:
    """(backbone, frame size in pixels); the size must be a multiple of a ViT's patch size."""
    backbone = resolve_backbone(cfg.backbone, img_size=cfg.data.img_size)
    size = int(cfg.data.img_size or backbone.img_size)
    patch = int(getattr(backbone, "patch_size", 1))
    if getattr(backbone, "version", "cnn") != "cnn" and size % patch:
        raise ConfigError(f"data.img_size {size} is not a multiple of the backbone patch size {patch}")
    return backbone, size


def _stage1(cfg: PhaseEvalConfig, dataset: PhaseDataset, model: FrameClassifier, pairs: Any, size: int,
            model_dir: Path, device: torch.device, run: RunDir) -> dict[str, Any]:
    """Step 2: train the frame model, or reuse the finished one of the same config (``resume``)."""
    d = cfg.data
    stage1_key = config_key({"backbone": cfg.backbone, "data": d.model_dump(), "stage1": cfg.stage1.model_dump(),
                             "seed": cfg.seed, "phases": dataset.phases, "size": size,
                             "train": [v.name for v in dataset.split("train")]})
    stage1_info: dict[str, Any] = {"enabled": cfg.stage1.enabled}
    stage1_json = model_dir / "stage1.json"
    if cfg.stage1.enabled:
        prev = json.loads(stage1_json.read_text()) if stage1_json.is_file() else {}
        if cfg.resume and prev.get("key") == stage1_key:
            model.backbone = load_backbone(model_dir / "backbone.safetensors", img_size=size)
            model.head.load_state_dict(load_file(str(model_dir / "head.safetensors")))
            stage1_info.update(prev.get("info", {}), resumed=True)
            print(f"phase stage 1: reusing the finished model in {model_dir}", file=sys.stderr)
        else:
            stage1_json.unlink(missing_ok=True)  # the weights about to be written no longer match it
            num_classes = len(dataset.phases)
            stage1_info.update(train_stage1(model, pairs("train"), pairs("val"), cfg, num_classes, device, run))
            save_stage1(model_dir, model, stage1_key, stage1_info)
    else:  # model/backbone.safetensors will hold the frozen backbone: a stage-1 model left there is gone
        stage1_json.unlink(missing_ok=True)
        (model_dir / "head.safetensors").unlink(missing_ok=True)
    model.to(device).eval()
    return stage1_info


def _evaluate(mstcn: MSTCN, dataset: PhaseDataset, loaded: dict[str, dict[str, Tensor]], fps: float,
              device: torch.device) -> tuple[dict, dict, list, list]:
    """Step 5: per-video metrics of the MS-TCN (and of the frame model when it has logits), prediction rows."""
    per_video, per_video_frame, pairs_eval, rows = {}, {}, [], []
    for v in dataset.split("test"):
        x, y = loaded[v.name]["features"], loaded[v.name]["labels"].numpy()
        probs = mstcn_probs(mstcn, x, device).numpy()
        pred = probs.argmax(1)
        per_video[v.name] = video_metrics(y, pred)
        pairs_eval.append((y, pred))
        if "logits" in loaded[v.name]:
            per_video_frame[v.name] = video_metrics(y, loaded[v.name]["logits"].argmax(1).numpy())
        rows += [(v.name, t, t / fps, int(y[t]), int(pred[t]), probs[t]) for t in range(len(y))]
    return per_video, per_video_frame, pairs_eval, rows


def _results(cfg: PhaseEvalConfig, dataset: PhaseDataset, size: int, per_video: dict, per_video_frame: dict,
             pairs_eval: list, stage1_info: dict[str, Any], stage2_info: dict[str, Any], device: torch.device,
             t_start: float) -> dict[str, Any]:
    """``results.json``: summary over the test videos, pooled F1@k, per-video values and both stages' info."""
    d = cfg.data
    return {
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
        "split_sizes": dataset.split_sizes(),
        "metrics": summarize(per_video),
        "pooled": pooled_f1_at_k(pairs_eval),
        "frame_model_metrics": summarize(per_video_frame) if per_video_frame else None,
        "per_video": per_video,
        "stage1": stage1_info,
        "stage2": stage2_info,
        "device": str(device),
        "seconds": round(time.time() - t_start, 1),
        "metric_notes": "accuracy, macro_f1 in 0-1 (macro F1 over phases present in gt or prediction, per video); "
        "edit, f1@k in 0-100 (MS-TCN definitions); mean/std over test videos (std ddof=1)",
    }


def _run(cfg: PhaseEvalConfig, dataset: PhaseDataset, out: Path, run: RunDir, device: torch.device,
         t_start: float) -> int:
    d = cfg.data
    num_classes = len(dataset.phases)
    backbone, size = _backbone(cfg)

    # 1. frames
    frame_paths = _frames(cfg, dataset, size, out)

    def pairs(split: str) -> Pairs:
        vids = dataset.split(split)
        return [frame_paths[v.name] for v in vids], [v.labels for v in vids]

    # 2. stage 1
    model = FrameClassifier(backbone, num_classes)
    model_dir = out / "model"
    stage1_info = _stage1(cfg, dataset, model, pairs, size, model_dir, device, run)

    # 3. features (the fingerprint names everything they depend on: weights, frame size and rate)
    weights = (model.backbone, model.head) if cfg.stage1.enabled else (model.backbone,)
    fingerprint = f"{weights_fingerprint(*weights)}-{size}px-{d.fps:g}fps"
    feat_paths = extract_features(
        model, dataset.videos, frame_paths, out / "features", device, cfg.feature_batch_size, cfg.stage1.enabled,
        fingerprint,
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
    per_video, per_video_frame, pairs_eval, rows = _evaluate(mstcn, dataset, loaded, d.fps, device)
    _write_predictions(out / "predictions" / "test.csv", rows, dataset.phases)
    meta = {
        "phases": dataset.phases, "fps": d.fps, "img_size": size,
        "mean": list(model.backbone.mean), "std": list(model.backbone.std), "feature": "cls",
        "backbone": cfg.backbone, "stage1": cfg.stage1.enabled, "mstcn": mstcn.cfg.to_dict(),
    }
    save_model(model_dir, model, mstcn, meta, stage1=cfg.stage1.enabled)

    results = _results(cfg, dataset, size, per_video, per_video_frame, pairs_eval, stage1_info,
                       {**stage2_info, "receptive_field": mstcn.receptive_field}, device, t_start)
    write_json(out / "results.json", results)
    _print_summary(results, out)
    return 0


def _frames(cfg: PhaseEvalConfig, dataset: PhaseDataset, size: int, out: Path) -> dict[str, Path]:
    """Step 1: every video decoded into the frame cache (one folder per frame size and rate)."""
    d = cfg.data
    cache = Path(d.cache).expanduser() if d.cache else out / "cache"
    cache = cache / f"frames_{size}px_{d.fps:g}fps"
    return {
        v.name: extract_frames(v, d.fps, size, cache) for v in track(dataset.videos, "phase frames", unit="video")
    }


def _print_summary(results: dict[str, Any], out: Path) -> None:
    m = results["metrics"]
    print(
        f"phase: {results['split_sizes']['test']} test videos  "
        f"accuracy {m['accuracy']['mean']:.4f} +/- {m['accuracy']['std']:.4f}  "
        f"macro F1 {m['macro_f1']['mean']:.4f} +/- {m['macro_f1']['std']:.4f}  edit {m['edit']['mean']:.1f}  "
        f"F1@10/25/50 {m['f1@10']['mean']:.1f}/{m['f1@25']['mean']:.1f}/{m['f1@50']['mean']:.1f}"
        f"  -> {out / 'results.json'}"
    )
