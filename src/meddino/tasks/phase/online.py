"""Online phase recognition: one frame in, one phase out, from past frames only (``meddino predict phase``).

:class:`PhasePredictor` loads the ``model/`` folder written by ``meddino eval phase`` (backbone export, MS-TCN
weights, ``model.json``) and keeps the rolling causal state of :class:`~meddino.tasks.phase.mstcn.OnlineMSTCN`.
Latency per frame is measured from the decoded RGB frame to the phase probabilities: bicubic resize,
normalisation, backbone forward, MS-TCN step (CUDA is synchronised before the clock stops). Video decoding is
not included: it depends on the container and codec, not on the model.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from meddino.devices import autocast, pick_device
from meddino.errors import CheckpointError, DataError
from meddino.models import load_backbone
from meddino.models.checkpoints import load_into_strict
from meddino.runlog import atomic_write
from meddino.tasks.phase.frames import iter_source_frames, resize_frame
from meddino.tasks.phase.mstcn import MSTCN, MSTCNConfig, OnlineMSTCN


class PhasePredictor:
    """Backbone + causal MS-TCN with a rolling state; :meth:`step` maps one RGB frame to phase probabilities."""

    def __init__(self, backbone: torch.nn.Module, mstcn: MSTCN, meta: dict[str, Any], device: torch.device):
        self.backbone = backbone.to(device).eval()
        self.online = OnlineMSTCN(mstcn.to(device).eval())
        self.meta = meta
        self.device = device
        self.size = int(meta["img_size"])
        self.phases: list[str] = list(meta["phases"])
        self.mean = torch.tensor(meta["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(meta["std"], device=device).view(1, 3, 1, 1)

    @classmethod
    def load(cls, run_dir: str | Path, device: torch.device) -> PhasePredictor:
        """Load ``RUN/model/`` (or a ``model`` folder given directly)."""
        root = Path(run_dir).expanduser()
        folder = root / "model" if (root / "model").is_dir() else root
        meta_path = folder / "model.json"
        if not meta_path.is_file():
            raise CheckpointError(f"no phase model in {root}: {meta_path} not found (run `meddino eval phase` first)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            raise CheckpointError(f"{meta_path}: not valid JSON") from None
        if meta.get("format") != "meddino-phase":
            raise CheckpointError(f"{meta_path}: not a meddino phase model")
        cfg = MSTCNConfig(**meta["mstcn"])
        if not cfg.causal:
            raise CheckpointError(
                f"{folder}: the MS-TCN was trained non-causal (stage2.causal=false); online use needs causal"
            )
        mstcn = MSTCN(cfg)
        state = load_file(str(folder / "mstcn.safetensors"))
        load_into_strict(mstcn, state, folder / "mstcn.safetensors")
        backbone = load_backbone(folder / "backbone.safetensors", img_size=int(meta["img_size"]))
        return cls(backbone, mstcn, meta, device)

    def reset(self) -> None:
        self.online.reset()

    @torch.no_grad()
    def step(self, rgb: np.ndarray) -> torch.Tensor:
        """RGB uint8 [H, W, 3] of the next frame -> phase probabilities [K] (CPU)."""
        frame = torch.from_numpy(resize_frame(rgb, self.size)).to(self.device)
        x = frame.permute(2, 0, 1)[None].float().div_(255.0)
        x = (x - self.mean) / self.std
        with autocast(self.device):
            feat = self.backbone.forward_features(x)["cls"]
        logits = self.online.step(feat.float())
        return F.softmax(logits[0], dim=0).cpu()


def latency_summary(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    if a.size == 0:
        return {"median_ms": float("nan"), "p95_ms": float("nan"), "mean_ms": float("nan"), "fps": float("nan")}
    med = float(np.median(a))
    return {"median_ms": med, "p95_ms": float(np.percentile(a, 95)), "mean_ms": float(a.mean()),
            "fps": 1000.0 / med if med > 0 else float("inf")}


def run_predict(cfg: Any) -> int:
    """``meddino predict phase VIDEO model=RUN``: per-frame phase + latency, CSV and a JSON summary line."""
    device = pick_device(cfg.device)
    video = Path(cfg.video).expanduser()
    if not video.exists():
        raise DataError(f"video not found: {video}")
    predictor = PhasePredictor.load(cfg.model, device)
    fps = float(cfg.fps or predictor.meta["fps"])
    out = Path(cfg.out).expanduser() if cfg.out else Path(cfg.model).expanduser() / "predict" / f"{video.stem}.csv"
    rows, lat = [], []
    for t, rgb in enumerate(iter_source_frames(video, fps)):
        start = time.perf_counter()
        probs = predictor.step(rgb)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1000.0
        pred = int(probs.argmax())
        if t >= cfg.warmup:
            lat.append(ms)
        rows.append((t, t / fps, pred, probs.numpy(), ms))
        if not cfg.quiet:
            print(f"{t}\t{t / fps:.1f}s\t{predictor.phases[pred]}\t{float(probs[pred]):.3f}\t{ms:.1f} ms", flush=True)
    with atomic_write(out, "w") as fh:
        w = csv.writer(fh)
        probs_cols = [f"prob_{i}" for i in range(len(predictor.phases))]
        w.writerow(["frame", "time_s", "pred", "pred_phase", "latency_ms", *probs_cols])
        for t, ts, pred, probs, ms in rows:
            w.writerow([t, f"{ts:.3f}", pred, predictor.phases[pred], f"{ms:.3f}"] + [f"{p:.6f}" for p in probs])
    summary = {"video": str(video), "frames": len(rows), "fps_sampled": fps, "device": str(device),
               "latency": latency_summary(lat), "warmup_frames": cfg.warmup, "predictions": str(out)}
    print(json.dumps(summary))
    print(
        f"phase: {len(rows)} frames, latency median {summary['latency']['median_ms']:.1f} ms, "
        f"p95 {summary['latency']['p95_ms']:.1f} ms -> {out}",
        file=sys.stderr,
    )
    return 0
