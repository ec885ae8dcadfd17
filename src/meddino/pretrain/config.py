"""The ``meddino pretrain`` config schema: one pydantic model with nested sections, validated up front.

Version-dependent defaults (centering, KoLeo weight, iBOT, clipping style, temperature schedule, blur
quirk, lr scaling rule) are filled in from ``method.version`` before validation when a recipe leaves them
out, so the ``config.yaml`` written into the run folder always shows the concrete values that ran.
Impossible combinations fail with one line naming the key; questionable ones (Sinkhorn with v1) warn.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from meddino.config import Schema
from meddino.models.archs import ALIASES, version_of_timm_name
from meddino.tracking import LogConfig

Version = Literal["v1", "v2", "v3"]

# Per-version defaults for keys a recipe may leave out (None in the schema = "the version's default").
_VERSION_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "v1": {
        "method": {"centering": "ema", "koleo_weight": 0.0},
        "method.ibot": {"enabled": False},
        "model.head": {"norm_last_layer": True},  # DINOv1 freezes the weight-norm g at 1
        "crops": {"blur_quirk": False, "global_scale": [0.4, 1.0], "local_scale": [0.05, 0.4]},
        "optim": {"lr_scaling": "linear256", "clip_per_param": True, "teacher_temp_per_epoch": True,
                  "layer_decay": 1.0, "patch_embed_lr_mult": 1.0},
    },
    "v2": {
        "method": {"centering": "ema", "koleo_weight": 0.1},
        "method.ibot": {"enabled": True},
        "model.head": {"norm_last_layer": False},  # DINOv2 trains g (init 1, with weight decay)
        "crops": {"blur_quirk": True, "global_scale": [0.32, 1.0], "local_scale": [0.05, 0.32]},
        "optim": {"lr_scaling": "sqrt1024", "clip_per_param": False, "teacher_temp_per_epoch": False,
                  "layer_decay": 0.9, "patch_embed_lr_mult": 0.2},
    },
    "v3": {
        "method": {"centering": "sinkhorn", "koleo_weight": 0.1},
        "method.ibot": {"enabled": True},
        "model.head": {"norm_last_layer": False},  # no effect: plain-Linear last layer (head_norm_last_layer: false)
        "crops": {"blur_quirk": True, "global_scale": [0.32, 1.0], "local_scale": [0.05, 0.32]},
        "optim": {"lr_scaling": "sqrt1024", "clip_per_param": False, "teacher_temp_per_epoch": False,
                  "layer_decay": 0.9, "patch_embed_lr_mult": 0.2},
    },
}


class IbotConfig(Schema):
    """iBOT masked-patch objective (v2/v3)."""

    enabled: bool | None = None
    weight: float = Field(1.0, ge=0)
    separate_head: bool | None = None  # v2: shared by default; v3: always separate
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = Field(0.5, ge=0, le=1)


class GramWeightSchedule(Schema):
    """The Gram loss weight per iteration, the official ``gram.loss_weight_schedule``
    (``linear_warmup_cosine_decay``): linear ``start -> peak`` over ``warmup_iters`` (end point excluded),
    then a half cosine ``peak -> end`` over ``cosine_iters`` (None = the rest of the run; both ends
    included), then constant ``end``. ``end`` defaults to ``peak`` (warm-up, then constant). The official
    counts warm-up/cosine in epochs of ``OFFICIAL_EPOCH_LENGTH`` iterations: multiply them by it."""

    start: float = Field(0.0, ge=0)
    peak: float = Field(1.0, ge=0)
    end: float | None = Field(None, ge=0)
    warmup_iters: int = Field(0, ge=0)
    cosine_iters: int | None = Field(None, ge=0)


class GramConfig(Schema):
    """DINOv3 Gram anchoring against a frozen Gram teacher (the starting backbone by default).

    Official names (``ssl_default_config.yaml`` ``gram:``): ``weight`` = ``loss_weight``, ``weight_schedule``
    = ``loss_weight_schedule`` (replaces ``weight`` when given), ``refresh_every`` = ``update_frequency``
    (set = ``rep_update: true``), ``max_refreshes`` = ``max_updates``, ``it_first_update`` the same: the Gram
    teacher is refreshed from the EMA teacher after iteration ``it`` when ``it + 1 >= it_first_update`` and
    ``(it + 1) % refresh_every == 0``. ``teacher: init`` = ``ckpt`` pointing at the starting checkpoint
    (``init=``); ``teacher: random`` anchors to the (random) starting network, which the original refuses.
    ``normalized``, ``img_level``, ``remove_neg``, ``remove_only_teacher_neg``, ``tokens_used`` as officially.
    """

    enabled: bool = False
    teacher: Literal["init", "random"] = "init"
    weight: float = Field(1.0, ge=0)
    weight_schedule: GramWeightSchedule | None = None
    img_level: bool = False
    normalized: bool = True
    remove_neg: bool = False
    remove_only_teacher_neg: bool = False
    tokens_used: Literal["all", "masked", "unmasked"] = "all"
    refresh_every: int | None = Field(None, ge=1)  # copy the EMA teacher into the Gram teacher every N its
    max_refreshes: int | None = Field(None, ge=0)
    it_first_update: int = Field(0, ge=0)  # no refresh before this iteration (official gram.it_first_update)

    def weight_at(self, it: int, total_iters: int) -> float:
        """The loss weight at iteration ``it`` of a ``total_iters`` run (``weight`` without a schedule)."""
        s = self.weight_schedule
        if s is None:
            return float(self.weight)
        end = s.peak if s.end is None else s.end
        w = s.warmup_iters
        if it < w:
            return float(s.start + (s.peak - s.start) * it / w)
        c = max(int(total_iters) - w, 0) if s.cosine_iters is None else s.cosine_iters
        j = it - w
        if j < c:
            cos = 1.0 if c == 1 else (math.cos(math.pi * j / (c - 1)) + 1.0) / 2.0
            return float((s.peak - end) * cos + end)
        return float(end)

    def refresh_due(self, it: int, refreshes_done: int) -> bool:
        """Whether the Gram teacher is refreshed after iteration ``it`` (the official rule, see above)."""
        return bool(
            self.enabled and self.refresh_every and it + 1 >= self.it_first_update
            and (it + 1) % self.refresh_every == 0
            and (self.max_refreshes is None or refreshes_done < self.max_refreshes)
        )


class MethodConfig(Schema):
    version: Version
    centering: Literal["ema", "sinkhorn"] | None = None
    center_momentum: float = Field(0.9, ge=0, le=1)
    sinkhorn_iterations: int = Field(3, ge=1)
    student_temp: float = Field(0.1, gt=0)
    koleo_weight: float | None = Field(None, ge=0)
    local_crop_weight: float = Field(1.0, ge=0)
    ibot: IbotConfig = IbotConfig()
    gram: GramConfig = GramConfig()


class HeadConfig(Schema):
    out_dim: int = Field(65536, ge=2)
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    nlayers: int = Field(3, ge=1)
    # freeze the weight-norm g of the last layer at 1; None = the version's default (v1 true, v2 false:
    # DINOv2 trains g with weight decay; v3 has a plain-Linear last layer, so it has no effect there)
    norm_last_layer: bool | None = None
    ibot_out_dim: int | None = None  # separate iBOT head sizes (default: the DINO head's)
    ibot_bottleneck_dim: int | None = Field(None, ge=1)  # e.g. 256 in DINOv2 vitl14 (DINO head: 384)


class ModelConfig(Schema):
    arch: str
    img_size: int | None = None  # grid of the stored position embeddings; default the global crop size
    drop_path: float = Field(0.1, ge=0, lt=1)
    head: HeadConfig = HeadConfig()


class DataConfig(Schema):
    path: str | None = None
    kind: Literal["auto", "image", "dicom", "video", "volume"] = "auto"  # auto: every kind found, by extension
    fps: float = Field(1.0, gt=0)
    volume_axes: list[int] = [0]
    window: str | tuple[float, float] | None = None
    # the sample index: auto = PATH.mdidx beside the data when there (meddino data index), else built by
    # rank 0 into the run folder and memory-mapped by every rank; off = indexed in memory by each process;
    # a file name = that index (built there when missing, rebuilt when stale)
    index: str = "auto"
    num_workers: int = Field(4, ge=0)
    batch_size: int = Field(64, ge=1)  # per process


class CropsConfig(Schema):
    global_size: int = Field(224, ge=8)
    local_size: int = Field(96, ge=8)
    global_scale: tuple[float, float] | None = None
    local_scale: tuple[float, float] | None = None
    n_local: int = Field(8, ge=0)
    blur_quirk: bool | None = None  # v2/v3 released models were trained with blur p 0.0 / 0.9 / 0.5
    # where JPEGs are decoded and the crops made: loader = in the DataLoader workers (CPU, the default);
    # cuda = workers read bytes and draw the views, the training GPU decodes (nvJPEG) and crops;
    # cpu = that device path on the CPU, in the training process (its test mode; slower than loader)
    device: Literal["loader", "cuda", "cpu"] = "loader"


class OptimConfig(Schema):
    lr: float = Field(5e-4, ge=0)  # base lr, scaled by the GLOBAL batch with lr_scaling
    lr_scaling: Literal["linear256", "sqrt1024", "none"] | None = None
    warmup_epochs: float = Field(10, ge=0)
    min_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.04, ge=0)
    weight_decay_end: float = Field(0.4, ge=0)
    momentum: float = Field(0.996, ge=0, le=1)
    momentum_end: float = Field(1.0, ge=0, le=1)
    teacher_temp_start: float = Field(0.04, gt=0)
    teacher_temp: float = Field(0.04, gt=0)
    teacher_temp_warmup_epochs: float = Field(0, ge=0)
    teacher_temp_per_epoch: bool | None = None  # v1 changes it once per epoch, v2/v3 every iteration
    layer_decay: float | None = Field(None, gt=0, le=1)
    patch_embed_lr_mult: float | None = Field(None, ge=0)
    clip_grad: float = Field(3.0, ge=0)  # 0 disables
    clip_per_param: bool | None = None  # v1 per parameter, v2/v3 global norm per sub-model
    freeze_last_layer_epochs: float = Field(1, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


class TrainConfig(Schema):
    iterations: int = Field(1000, ge=1)
    # Stop (with a checkpoint) after this iteration although the schedules run to `iterations`: a
    # time-boxed cluster job that is continued later with resume=auto (and the kill-and-resume tests).
    stop_at: int | None = Field(None, ge=1)
    epoch_length: int | None = Field(None, ge=1)  # v2/v3: 1250; None = one pass over the data (v1)
    checkpoint_every: int = Field(1000, ge=1)
    keep_last: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    fsdp: bool = False
    # full: one checkpoint_<it>.pt written by rank 0 (under FSDP2 every tensor is gathered onto it);
    # sharded: a checkpoint_<it>.dcp/ folder each rank writes its own shards into (torch.distributed.checkpoint);
    # auto: sharded under FSDP2 (train.fsdp=true with several processes), full otherwise
    checkpoint_format: Literal["auto", "full", "sharded"] = "auto"
    # stop with exit code 2 (keeping the last good checkpoint) when the collapse detector fires
    stop_on_collapse: bool = False


class HeadWarmupConfig(Schema):
    """Continued pretraining (DINOv3 FINO recipe): frozen backbone while the fresh heads train, then a
    linear ramp of the backbone's lr (and, in ``fino`` mode, its weight decay) to the schedule or to the
    constant ``backbone_lr``.

    ``mode=fino`` (default) reproduces the FINO branch: the backbone keeps ``requires_grad`` (it receives
    gradients and its AdamW moments accumulate) while its lr and weight decay are 0; both ramp together;
    ``backbone_lr`` is a base lr scaled by ``optim.lr_scaling`` like ``optim.lr``. ``mode=requires_grad``
    is meddino's earlier variant: no gradient, no moments, weight decay untouched, ``backbone_lr`` used as
    given (unscaled)."""

    frozen_iters: int = Field(0, ge=0)
    ramp_iters: int = Field(0, ge=0)
    backbone_lr: float | None = Field(None, ge=0)  # constant backbone lr after the ramp (None = schedule)
    mode: Literal["fino", "requires_grad"] = "fino"


class HealthConfig(Schema):
    """Training-health diagnostics (entropies, KL, prototype usage, effective rank) at every log step and
    the collapse detector (:mod:`meddino.pretrain.health`)."""

    enabled: bool = True
    # the detector's uniform-collapse condition: teacher entropy >= (1 - tolerance) * ln K
    entropy_tolerance: float = Field(0.02, ge=0, lt=1)
    # ... and the teacher's targets carry less than this many nats about the image (teacher_information);
    # 0 = the entropy alone decides, which also fires on DINOv3's healthy start at ~0.99 ln K
    min_information: float = Field(0.005, ge=0)
    # dimensional collapse: RankMe of the teacher CLS features below this (1 = every image on one direction;
    # the rank is bounded by min(2 * batch, embed_dim), so 1.5 stays meaningful down to batch 1; 0 disables)
    min_effective_rank: float = Field(1.5, ge=0)
    patience: int = Field(5, ge=1)  # consecutive log steps a condition must hold before the warning


class MonitorConfig(Schema):
    manifest: str | None = None  # CSV with image,label[,split]
    every: int = Field(0, ge=0)  # 0 = off
    k: int = Field(20, ge=1)
    temperature: float = Field(0.07, gt=0)
    val_fraction: float = Field(0.5, gt=0, lt=1)
    batch_size: int = Field(64, ge=1)


class PretrainConfig(Schema):
    method: MethodConfig
    model: ModelConfig
    data: DataConfig = DataConfig()
    crops: CropsConfig = CropsConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    head_warmup: HeadWarmupConfig = HeadWarmupConfig()
    monitor: MonitorConfig = MonitorConfig()
    health: HealthConfig = HealthConfig()
    log: LogConfig = LogConfig()
    init: str | None = None
    out: str = "runs/pretrain"
    resume: str | None = None  # null | auto | checkpoint path

    @model_validator(mode="before")
    @classmethod
    def _version_defaults(cls, data: Any) -> Any:
        """Fill keys left out (or null) with the defaults of ``method.version``."""
        if not isinstance(data, dict):
            return data
        version = (data.get("method") or {}).get("version") if isinstance(data.get("method"), dict) else None
        if version not in _VERSION_DEFAULTS:
            return data
        data = dict(data)
        for section, defaults in _VERSION_DEFAULTS[version].items():
            parts = section.split(".")
            node = data
            for i, part in enumerate(parts):
                sub = node.get(part)
                if sub is None:
                    sub = {}
                if not isinstance(sub, dict):
                    break
                sub = dict(sub)
                node[part] = sub
                node = sub
            else:
                for key, value in defaults.items():
                    if node.get(key) is None:
                        node[key] = value
        ibot = data["method"].get("ibot") or {}
        if version == "v3" and ibot.get("separate_head") is None:
            data["method"]["ibot"] = {**ibot, "separate_head": True}
        elif version == "v2" and ibot.get("separate_head") is None:
            data["method"]["ibot"] = {**ibot, "separate_head": False}
        return data

    @field_validator("resume")
    @classmethod
    def _resume(cls, v: str | None) -> str | None:
        if v in ("", "null", "none", "None", "false", "False"):
            return None
        return v

    @model_validator(mode="after")
    def _combinations(self) -> PretrainConfig:
        m, v = self.method, self.method.version
        if m.gram.enabled and v != "v3":
            raise ValueError(f"method.gram.enabled: Gram anchoring is a DINOv3 objective, not {v}")
        gram = m.gram
        if gram.enabled and gram.teacher == "init" and not self.init:
            raise ValueError("method.gram.teacher=init: Gram anchoring needs a starting checkpoint (init=CKPT); "
                             "without one the Gram teacher is a random network (set method.gram.teacher=random "
                             "to anchor to it anyway)")
        if gram.remove_neg and gram.remove_only_teacher_neg:
            raise ValueError("method.gram.remove_only_teacher_neg: mutually exclusive with method.gram.remove_neg")
        if gram.enabled and gram.tokens_used != "all":
            if gram.img_level:
                raise ValueError(f"method.gram.tokens_used={gram.tokens_used} needs method.gram.img_level=false")
            if not m.ibot.enabled:
                raise ValueError(f"method.gram.tokens_used={gram.tokens_used} needs the iBOT masks "
                                 "(method.ibot.enabled=true)")
        if m.ibot.enabled and v == "v1":
            raise ValueError("method.ibot.enabled: DINOv1 has no iBOT objective (use v2 or v3)")
        if v == "v3" and m.ibot.separate_head is False:
            raise ValueError("method.ibot.separate_head: DINOv3 always uses a separate iBOT head")
        if v == "v1" and m.centering == "sinkhorn":
            warnings.warn("method.centering=sinkhorn with v1: not what DINOv1 did (it used the EMA centre)",
                          stacklevel=2)
        lo, hi = m.ibot.mask_ratio
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"method.ibot.mask_ratio: need 0 <= min <= max <= 1, got {m.ibot.mask_ratio}")
        patch = arch_patch_size(self.model.arch)
        if patch:
            for key, size in (("crops.global_size", self.crops.global_size), ("crops.local_size", self.crops.local_size)):
                if size % patch:
                    raise ValueError(f"{key}: {size} is not a multiple of the patch size {patch} of {self.model.arch}")
        for key, scale in (("crops.global_scale", self.crops.global_scale), ("crops.local_scale", self.crops.local_scale)):
            if scale is not None and not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{key}: need 0 < min <= max <= 1, got {scale}")
        if self.resume not in (None, "auto") and not str(self.resume):
            raise ValueError("resume: give auto or a checkpoint path")
        if self.monitor.every and not self.monitor.manifest:
            raise ValueError("monitor.manifest: the online kNN monitor needs a labelled CSV (image,label)")
        if self.optim.momentum > self.optim.momentum_end:
            raise ValueError("optim.momentum_end: must be >= optim.momentum (the teacher momentum rises to it)")
        koleo = m.koleo_weight or 0.0
        if koleo > 0 and self.data.batch_size < 2:
            raise ValueError("data.batch_size: KoLeo needs at least 2 images per process (or method.koleo_weight=0)")
        return self


def arch_version(arch: str) -> str | None:
    """The DINO version ("v1", "v2", "v3") of an architecture alias or timm ViT name (None when unknown)."""
    spec = ALIASES.get(arch)
    return spec.version if spec is not None else version_of_timm_name(arch)


def arch_patch_size(arch: str) -> int | None:
    """Patch size of an architecture alias or timm ViT name (None when it cannot be told from the name)."""
    spec = ALIASES.get(arch)
    if spec is not None and "patch_size" in spec.kwargs:
        return int(spec.kwargs["patch_size"])
    name = spec.timm_name if spec is not None else arch
    match = re.search(r"patch(\d+)", name)
    return int(match.group(1)) if match else None
