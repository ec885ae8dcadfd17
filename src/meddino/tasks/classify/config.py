"""Typed configs of the classification verbs (``meddino embed``, ``meddino eval knn|linear|fewshot|finetune``,
``meddino data split``). One schema serves every verb so that a recipe can hold the settings of several
protocols and the resolved config in a run folder always has the same shape."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from meddino.config import Schema
from meddino.tracking import LogConfig

FEATURE_SETS = ("cls", "cls_patch", "cls_last4", "cls_patch_last4")
FeatureSet = Literal["cls", "cls_patch", "cls_last4", "cls_patch_last4"]


class DataConfig(Schema):
    """Where the labelled rows come from and how images are presented to the backbone."""

    manifest: str | None = None
    label_columns: list[str] = Field(default_factory=lambda: ["label"])
    image_column: str = "image"
    patient_column: str = "patient"
    positive_class: str | None = None  # binary tasks: which of the two classes is positive
    img_size: int = Field(224, ge=8)  # square resize (bicubic) before the backbone
    scheme: Literal["auto", "split", "folds"] = "auto"  # auto: the fold column if present, else split
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # patient share carved from train when val is needed
    volume_axis: int = Field(0, ge=0, le=2)  # slicing axis of 3D volumes (0 = axial for (z, y, x))
    volume_min_foreground: float | None = Field(0.05, ge=0.0, le=1.0)  # skip near-empty slices

    @field_validator("label_columns")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one label column")
        return v


class EmbedConfig(Schema):
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0)
    blocks: int = Field(4, ge=1)  # intermediate blocks kept for the "last 4" feature sets


class KnnConfig(Schema):
    k: list[int] = Field(default_factory=lambda: [10, 20])
    temperature: float = Field(0.07, gt=0.0)
    features: FeatureSet = "cls"
    primary_k: int | None = None  # the k whose metrics are the headline numbers (default: 20 if listed, else the last)

    @model_validator(mode="after")
    def _check(self) -> KnnConfig:
        if not self.k or min(self.k) < 1:
            raise ValueError("knn.k: give a list of positive integers")
        if self.primary_k is not None and self.primary_k not in self.k:
            raise ValueError(f"knn.primary_k={self.primary_k} is not in knn.k={self.k}")
        return self


class LinearConfig(Schema):
    features: list[FeatureSet] = Field(default_factory=lambda: list(FEATURE_SETS))
    lrs: list[float] = Field(default_factory=lambda: [1e-3, 1e-2, 1e-1])
    weight_decays: list[float] = Field(default_factory=lambda: [0.0, 1e-4])
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=1)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    normalize: Literal["standard", "l2", "none"] = "standard"
    select_metric: Literal["auroc", "accuracy", "loss"] = "auroc"
    retrain_on_trainval: bool = True

    @model_validator(mode="after")
    def _check(self) -> LinearConfig:
        if not self.features or not self.lrs or not self.weight_decays:
            raise ValueError("linear.features, linear.lrs and linear.weight_decays must not be empty")
        return self


class FewshotConfig(Schema):
    shots: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    draws: int = Field(5, ge=1)
    features: FeatureSet = "cls"
    lr: float = Field(0.1, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(256, ge=1)
    normalize: Literal["standard", "l2", "none"] = "l2"
    primary_shots: int | None = None  # headline N (default: the largest N that could be drawn)

    @model_validator(mode="after")
    def _check(self) -> FewshotConfig:
        if not self.shots or min(self.shots) < 1:
            raise ValueError("fewshot.shots: give a list of positive integers")
        return self


class AugmentConfig(Schema):
    """Geometric augmentation of fine-tuning's training images (:mod:`meddino.data.geometric`), every op off
    by default. Seed 002 (MediDino): rotation 10, crop_scale [0.9, 1.1], shear 10, translate 0.1."""

    rotation: float = Field(0.0, ge=0.0, le=180.0)  # angle uniform in +/- degrees
    crop_scale: list[float] | None = None  # resized crop: area-fraction range [lo, hi]; None = no crop
    crop_ratio: list[float] = Field(default_factory=lambda: [3 / 4, 4 / 3])  # its aspect-ratio range
    shear: float = Field(0.0, ge=0.0, lt=90.0)  # x-shear angle uniform in +/- degrees
    translate: float = Field(0.0, ge=0.0, le=1.0)  # shift uniform in +/- this fraction of width and height

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _range(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) != 2 or not 0.0 < v[0] <= v[1]):
            raise ValueError("give a range [lo, hi] with 0 < lo <= hi")
        return v


class FinetuneConfig(Schema):
    mode: Literal["full", "lora", "bitfit"] = "full"
    head: Literal["linear", "mlp"] = "linear"  # mlp = Linear -> ReLU -> Linear on CLS (seed 002)
    head_hidden: int = Field(256, ge=1)
    lrs: list[float] = Field(default_factory=lambda: [1e-4])
    batch_sizes: list[int] = Field(default_factory=lambda: [32])
    head_lr_scale: float = Field(1.0, gt=0.0)  # head lr = lr x this
    optimizer: Literal["adamw", "adam"] = "adamw"  # adam: torch Adam, weight_decay as an L2 term (seed 002: 0)
    weight_decay: float = Field(0.05, ge=0.0)
    layer_decay: float = Field(0.75, gt=0.0, le=1.0)  # full mode: lr x decay^(depth + 1 - layer)
    epochs: int = Field(10, ge=1)
    warmup_epochs: float = Field(0.0, ge=0.0)
    schedule: Literal["cosine", "constant"] = "cosine"
    patience: int | None = Field(None, ge=1)  # early stop after this many epochs without a better val loss
    hflip: float = Field(0.5, ge=0.0, le=1.0)  # flip probability of training images
    augment: AugmentConfig = Field(default_factory=AugmentConfig)  # training images only
    grad_clip: float | None = Field(1.0, gt=0.0)  # max gradient norm; null = no clipping (seed 002)
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    lora_r: int = Field(48, ge=1)
    lora_alpha: float = Field(16.0, gt=0.0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_targets: list[str] = Field(default_factory=lambda: ["qkv", "fc1", "fc2"])
    sweep_select: Literal["val_loss", "val_auroc"] = "val_loss"
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if not self.lrs or not self.batch_sizes:
            raise ValueError("finetune.lrs and finetune.batch_sizes must not be empty")
        return self


class ClassifyConfig(Schema):
    """``meddino embed`` / ``meddino eval knn|linear|fewshot|finetune``."""

    backbone: str | None = None  # checkpoint path | random:<arch> | timm:<name>[@weights]
    embeddings: str | None = None  # a cache folder written by `meddino embed` (frozen protocols)
    out: str = "runs/classify"
    seed: int = 0
    model_name: str | None = None  # display name in results (default: the backbone spec)
    dataset_name: str | None = None  # default: the manifest file name
    level: Literal["patient", "image"] = "patient"  # the level of the headline metrics
    threshold: float = Field(0.5, gt=0.0, lt=1.0)  # binary / multi-label decision threshold
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = Field(default_factory=DataConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    knn: KnnConfig = Field(default_factory=KnnConfig)
    linear: LinearConfig = Field(default_factory=LinearConfig)
    fewshot: FewshotConfig = Field(default_factory=FewshotConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    log: LogConfig = Field(default_factory=LogConfig)


class SplitConfig(Schema):
    """``meddino data split MANIFEST out=FILE k=5 seed=0``."""

    manifest: str
    out: str | None = None  # default: MANIFEST with a _folds suffix
    k: int = Field(5, ge=2)
    seed: int = 0
    label_columns: list[str] = Field(default_factory=lambda: ["label"])
    patient_column: str = "patient"
    stratify: bool = True


class ManifestConfig(Schema):
    """``meddino data manifest KIND SRC out=FILE``: write a labelled manifest from a known layout."""

    kind: Literal["nih", "chexpert", "folder"]
    src: str  # NIH Data_Entry_2017.csv | CheXpert CSV | class-folder root
    out: str
    images: str | None = None  # NIH: folder searched for the images; CheXpert: root the Path column resolves in
    train_val_list: str | None = None  # NIH official lists (default: beside the CSV)
    test_list: str | None = None
    labels: list[str] | None = None  # NIH / CheXpert: label columns to keep
    uncertain: Literal["ones", "zeros", "ignore"] = "ones"  # CheXpert -1 policy
    frontal_only: bool = False
    split: str | None = None  # CheXpert: split written to every row
    patient_regex: str | None = None  # folder: patient id from the relative path
    skip_missing: bool = False  # NIH: drop rows whose image is absent
