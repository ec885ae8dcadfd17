"""Typed configs of ``meddino eval phase`` and ``meddino predict phase`` (recipes in configs/phase/)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from meddino.config import Schema
from meddino.tracking import LogConfig


class PhaseData(Schema):
    root: str = Field(description="dataset folder (see docs/phase.md for the layouts)")
    layout: Literal["csv", "autolaparo", "cholec80"] = "csv"
    fps: float = Field(1.0, gt=0, description="sampling rate of frames and labels")
    annotation_fps: float = Field(25.0, gt=0, description="rate of the cholec80 annotation files")
    img_size: int | None = Field(None, gt=0, description="frame size; default the backbone's img_size")
    phases: list[str] | None = Field(None, description="csv layout: phase names in class order")
    train_videos: list[str] | None = None
    val_videos: list[str] | None = None
    test_videos: list[str] | None = None
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    cache: str | None = Field(None, description="frame cache folder; default OUT/cache")


class Augment(Schema):
    """Seed 000's stage-1 augmentations (albumentations there; torchvision v2 here)."""

    rotation: float = Field(15.0, ge=0, description="max rotation in degrees")
    scale: float = Field(0.1, ge=0, lt=1, description="scale factor drawn from [1 - scale, 1 + scale]")
    p_affine: float = Field(0.5, ge=0, le=1)
    rgb_shift: float = Field(20.0, ge=0, description="per-channel shift limit on the 0-255 scale")
    p_rgb_shift: float = Field(0.5, ge=0, le=1)
    brightness: float = Field(0.2, ge=0)
    contrast: float = Field(0.2, ge=0)
    p_color: float = Field(0.5, ge=0, le=1)


class Stage1(Schema):
    """Per-frame phase classifier: backbone + linear head on the CLS token."""

    enabled: bool = Field(True, description="false: features from the frozen backbone, no frame training")
    freeze_backbone: bool = False
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-5, gt=0, description="backbone learning rate (seed 000: 1e-5)")
    head_lr: float | None = Field(1e-3, gt=0, description="head learning rate; null = lr")
    weight_decay: float = Field(0.05, ge=0)
    class_weights: Literal["none", "balanced"] = "none"
    frame_stride: int = Field(1, ge=1, description="train on every n-th frame")
    augment: Augment = Augment()
    num_workers: int = Field(0, ge=0)


class Stage2(Schema):
    """Causal MS-TCN on per-frame features (seed 000: batch 1 video, AdamW, lr 7e-4, 200 epochs)."""

    num_stages: int = Field(2, ge=1)
    num_layers: int = Field(8, ge=1)
    channels: int = Field(64, ge=1)
    kernel_size: int = Field(3, ge=1)
    causal: bool = True
    dropout: float = Field(0.5, ge=0, lt=1)
    epochs: int = Field(200, ge=1)
    lr: float = Field(7e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    smooth_weight: float = Field(0.15, ge=0)
    tau: float = Field(4.0, gt=0)
    class_weights: Literal["none", "balanced"] = "none"


class PhaseEvalConfig(Schema):
    data: PhaseData
    backbone: str = Field(description="checkpoint path | random:<arch> | timm:<name>[@weights]")
    model_name: str | None = Field(None, description="display name in results (default: the backbone spec)")
    dataset_name: str | None = Field(None, description="display name in results (default: the data root's name)")
    out: str = "runs/phase"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    stage1: Stage1 = Stage1()
    stage2: Stage2 = Stage2()
    log: LogConfig = LogConfig()
    feature_batch_size: int = Field(64, ge=1)
    resume: bool = Field(True, description="reuse a finished stage-1 model and feature files in OUT")


class PhasePredictConfig(Schema):
    video: str = Field(description="a video file or a folder of frames")
    model: str = Field(description="run folder of `meddino eval phase` (holds model/)")
    out: str | None = Field(None, description="CSV of per-frame predictions; default RUN/predict/<video>.csv")
    fps: float | None = Field(None, gt=0, description="sampling rate; default the rate the model was trained at")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    warmup: int = Field(2, ge=0, description="frames excluded from the latency statistics")
    quiet: bool = Field(False, description="do not print one line per frame")
