"""Typed config of ``meddino eval seg`` and ``meddino predict seg`` (validated before any work starts)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from meddino.config import Schema
from meddino.metrics.segmentation import DEFAULT_METRIC_POLICY, MetricPolicyName
from meddino.tracking import LogConfig

#: Seed 000 leaves out CholecSeg8k's low-prevalence classes (names as in :data:`meddino.data.seg_masks.CHOLECSEG8K_CLASSES`).
SEED000_EXCLUDED = ["blood", "cystic duct", "hepatic vein", "liver ligament"]


class SegDataConfig(Schema):
    """Where the image/mask pairs come from and how they are split."""

    layout: Literal["manifest", "cholecseg8k", "msd"] = "manifest"
    # cv: k-fold CV, every patient tested once; seed000: a fixed test set + data.folds train/val folds of the
    # other patients, every fold's model tested on it; fewshot: seed 001's 1..16 training images (fewshot.*)
    protocol: Literal["cv", "seed000", "fewshot"] = "cv"
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # seed000 / fewshot: patients in the drawn fixed test set
    manifest: str | None = None  # CSV with image, mask, patient (and optional split) columns
    root: str | None = None  # folder of the cholecseg8k / msd layouts
    classes: list[str] | None = None  # class names, index = position (manifest layout; msd: from dataset.json)
    colors: list[list[int]] | None = None  # manifest: RGB colour of each class for colour-coded masks
    ignore_index: int = 255
    exclude_classes: list[str] = Field(default_factory=lambda: list(SEED000_EXCLUDED))  # cholecseg8k only
    excluded_to: Literal["background", "ignore"] = "background"
    split_column: str | None = None  # manifest column with train / val / test; else patient-level k-fold
    fold_column: str | None = None  # manifest column with a fold number per row (fixed folds)
    folds: int = Field(5, ge=2)
    run_folds: list[int] | None = None  # evaluate only these folds (0-based); default all
    val_fraction: float = Field(0.125, ge=0.0, lt=1.0)  # of each fold's training patients, for model selection
    image_size: int | list[int] | None = None  # network input (bicubic); None = the backbone's pretraining size
    window: str | list[float] | None = None  # volumes: window preset or [center, width]; default percentiles
    max_items: int | None = Field(None, ge=1)  # cap on images / volumes read (quick trials)

    @model_validator(mode="after")
    def _check(self) -> SegDataConfig:
        if self.layout == "manifest" and not self.manifest:
            raise ValueError("data.manifest is required for the manifest layout (or set data.layout=cholecseg8k|msd)")
        if self.layout != "manifest" and not self.root:
            raise ValueError(f"data.root is required for data.layout={self.layout}")
        if self.split_column and self.fold_column:
            raise ValueError("data.split_column and data.fold_column exclude each other")
        if self.layout != "manifest" and (self.split_column or self.fold_column):
            raise ValueError("data.split_column / data.fold_column need the manifest layout")
        if not 0 <= self.ignore_index <= 255:
            raise ValueError("data.ignore_index must be in 0..255 (masks are 8-bit)")
        if self.protocol != "cv" and self.fold_column:
            raise ValueError(f"data.fold_column gives the folds of data.protocol=cv; data.protocol={self.protocol} "
                             "draws its own around a fixed test set (its test rows: data.split_column)")
        if self.protocol == "fewshot" and self.run_folds is not None:
            raise ValueError("data.run_folds selects folds; data.protocol=fewshot has draws (fewshot.shots, "
                             "fewshot.draws)")
        return self


class EoMTConfig(Schema):
    """EoMT (Kerssies et al., CVPR 2025) as summarised in shared/reference/downstream.md."""

    num_queries: int = Field(100, ge=1)
    num_blocks: int | None = Field(None, ge=1)  # L2; None: 3 for S/B (depth <= 12), 4 for L (24), 5 for g (40)
    # true: masks annealed away (then inference is a plain ViT); false: masks on in every step and at inference
    mask_annealing: bool = True
    # annealing length, in completed optimiser steps or in epochs (x steps per epoch), one at most; neither:
    # 5/6 of train.epochs (official EoMT). Early stopping and the best epoch count only from its end on.
    anneal_steps: int | None = Field(None, ge=1)
    anneal_epochs: float | None = Field(None, gt=0)
    anneal_power: float = Field(0.9, gt=0)
    num_points: int = Field(12544, ge=16)
    oversample_ratio: float = Field(3.0, ge=1.0)
    importance_ratio: float = Field(0.75, ge=0.0, le=1.0)
    no_object_weight: float = 0.1
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    class_weight: float = 2.0
    head_warmup_steps: int = Field(500, ge=0)  # heads alone (backbone lr 0)
    backbone_warmup_steps: int = Field(1000, ge=0)  # then the backbone lr ramps up linearly


class UNetConfig(Schema):
    """Options of the U-Net decoder (``head=unet``). The defaults are meddino's original decoder; seed 001's code
    takes the last four blocks (``get_intermediate_layers(x, 4)``) and one 3x3 conv-BN-ReLU per up-block,
    which the ``seed001_unet`` recipe sets (``skips: last4``, ``convs_per_stage: 1``)."""

    skips: Literal["even", "last4"] = "even"  # ViT blocks feeding the decoder: evenly spaced | the last four
    blocks: list[int] | None = None  # four explicit 0-based block indices (override ``skips``)
    convs_per_stage: Literal[1, 2] = 2  # 3x3 conv-BN-ReLU layers in each up-block

    @model_validator(mode="after")
    def _check(self) -> UNetConfig:
        if self.blocks is not None and len(self.blocks) != 4:
            raise ValueError("unet.blocks must list exactly four block indices")
        return self


class SegTrainConfig(Schema):
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)  # heads
    backbone_lr: float = Field(1e-5, ge=0)  # used when the encoder is trainable
    weight_decay: float = Field(0.05, ge=0)
    plateau_patience: int = Field(10, ge=1)  # epochs without val improvement before the lr is halved
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_monitor: Literal["dice", "val_loss"] = "dice"  # what the plateau watches (seed 000: val_loss)
    early_stop: int = Field(15, ge=1)  # epochs without val improvement before stopping
    augment: bool = True  # flips + rotations, p 0.5 each (seed 000)
    rotation_degrees: float = Field(30.0, ge=0, le=180)  # rotation angle range (+/-)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    num_workers: int = Field(0, ge=0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA


class SegFewshotConfig(Schema):
    """``data.protocol=fewshot`` (seed 001): train on ``shots`` images, ``draws`` seeded draws per count."""

    shots: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    draws: int = Field(5, ge=1)
    primary_shots: int | None = None  # headline N in results.json (default: the largest N that could be drawn)

    @model_validator(mode="after")
    def _check(self) -> SegFewshotConfig:
        if not self.shots or min(self.shots) < 1:
            raise ValueError("fewshot.shots: give a list of positive integers")
        return self


class SegMetricsConfig(Schema):
    """Which definitions of Dice, HD95 and empty masks the test patients are scored with (docs/metrics.md)."""

    policy: MetricPolicyName = DEFAULT_METRIC_POLICY  # monai | seed000 (seed 000's released code)


class SegConfig(Schema):
    """``meddino eval seg``: train a head per fold, evaluate on the held-out patients."""

    backbone: str = "random:dinov2_tiny"  # checkpoint path | random:<arch> | timm:<name>[@weights]
    model_name: str | None = None  # display name in results.json (default: the backbone spec)
    head: Literal["linear", "unet", "eomt", "monai_unet"] = "linear"
    freeze_backbone: bool = True
    unet: UNetConfig = Field(default_factory=UNetConfig)
    monai_channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 128, 256])
    eomt: EoMTConfig = Field(default_factory=EoMTConfig)
    data: SegDataConfig
    train: SegTrainConfig = Field(default_factory=SegTrainConfig)
    metrics: SegMetricsConfig = Field(default_factory=SegMetricsConfig)
    fewshot: SegFewshotConfig = Field(default_factory=SegFewshotConfig)
    dataset_name: str | None = None  # display name (default: layout + folder / manifest name)
    save_predictions: bool = True  # predicted masks of the test folds under predictions/masks
    seed: int = 0
    out: str = "runs/seg"
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _check(self) -> SegConfig:
        e = self.eomt
        if e.anneal_steps is not None and e.anneal_epochs is not None:
            raise ValueError("eomt.anneal_steps and eomt.anneal_epochs exclude each other (the annealing length)")
        annealing = self.head == "eomt" and e.mask_annealing
        if annealing and e.anneal_epochs is not None and e.anneal_epochs > self.train.epochs:
            raise ValueError(f"eomt.anneal_epochs={e.anneal_epochs:g} is longer than the run (train.epochs="
                             f"{self.train.epochs}): the kept model must be one trained past the annealing")
        return self


class SegPredictConfig(Schema):
    """``meddino predict seg INPUT model=RUN_DIR out=DIR``."""

    model: str  # run folder of `meddino eval seg` (or its model/ folder)
    input: str  # image file, folder of images, or a volume (.nii/.nii.gz/.nrrd/.mha)
    out: str = "predictions"
    fold: int | None = None  # which fold's model (default: best validation Dice)
    overlay_alpha: float = Field(0.5, ge=0, le=1)
    window: str | list[float] | None = None
    batch_size: int = Field(8, ge=1)
    device: str = "auto"
