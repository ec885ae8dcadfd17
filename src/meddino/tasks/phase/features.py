"""Step 3 of ``meddino eval phase``: per-video CLS feature sequences, written once and reused.

Stage 2 trains on whole-video feature sequences, so every video's frames go through the frame model once:
``features/<video>.safetensors`` holds ``features`` [T, D], ``labels`` [T] and, after stage 1, ``logits``
[T, K]. Files are written atomically and carry the fingerprint of the weights that made them, so a rerun
(or a resumed run) recomputes only what is missing or was made by other weights.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from meddino.runlog import atomic_path, track
from meddino.tasks.phase.data import PhaseVideo
from meddino.tasks.phase.frame_model import FrameClassifier, video_features


def weights_fingerprint(*modules: nn.Module) -> str:
    """sha1 over parameter and buffer bytes: feature files remember which weights made them."""
    h = hashlib.sha1()
    for module in modules:
        for key, value in sorted(module.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def feature_file(folder: Path, video: PhaseVideo) -> Path:
    return folder / f"{video.name}.safetensors"


def features_complete(path: Path, fingerprint: str, n_frames: int) -> bool:
    """A feature file counts as done when it was made by the same weights for the same frames."""
    if not path.is_file():
        return False
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
    return load_file(str(path))
