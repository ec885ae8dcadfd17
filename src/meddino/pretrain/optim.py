"""The optimisation side of a pretraining run: its schedules, the AdamW groups, applying and clipping.

Split from :mod:`meddino.pretrain.engine` so the engine stays the orchestration of an iteration: this
module holds what turns the config into per-iteration numbers (:class:`Schedules`, with the head warm-up
of continued pretraining), the optimiser with one group per (backbone / head) parameter kind, writing the
scheduled lr and weight decay into those groups, and the version's gradient clipping. The schedule shapes
themselves are :mod:`meddino.ssl.schedules`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from meddino import ssl
from meddino.pretrain.config import PretrainConfig
from meddino.ssl.schedules import linear_then_constant


class Schedules:
    """All per-iteration schedules of a run (pure functions of the iteration)."""

    def __init__(self, cfg: PretrainConfig, global_batch: int, epoch_length: int):
        o, t = cfg.optim, cfg.train
        total = t.iterations
        self.epoch_length = epoch_length
        self.base_lr = ssl.scaled_lr(o.lr, global_batch, o.lr_scaling or "none")
        warmup = min(int(round(o.warmup_epochs * epoch_length)), total)
        self.lr = ssl.cosine_schedule(self.base_lr, o.min_lr, total, warmup)
        self.wd = ssl.cosine_schedule(o.weight_decay, o.weight_decay_end, total)
        self.momentum = ssl.cosine_schedule(o.momentum, o.momentum_end, total)
        total_epochs = math.ceil(total / epoch_length)
        temp_warmup = o.teacher_temp_warmup_epochs
        if o.teacher_temp_per_epoch:
            self.teacher_temp = ssl.linear_warmup_then_constant(
                o.teacher_temp_start, o.teacher_temp, int(round(temp_warmup)), total_epochs, epoch_length, per_epoch=True
            )
        else:  # per iteration: warm-up over round(epochs * epoch_length) iterations
            w_iters = int(round(temp_warmup * epoch_length))
            self.teacher_temp = linear_then_constant(o.teacher_temp_start, o.teacher_temp, w_iters)
        self.freeze_last_layer_iters = int(round(o.freeze_last_layer_epochs * epoch_length))
        hw = cfg.head_warmup
        self.frozen_iters, self.ramp_iters, self.head_warmup_mode = hw.frozen_iters, hw.ramp_iters, hw.mode
        self.backbone_lr = hw.backbone_lr
        if hw.backbone_lr is not None and hw.mode == "fino":  # FINO scales its constant lr like optim.lr
            self.backbone_lr = ssl.scaled_lr(hw.backbone_lr, global_batch, o.lr_scaling or "none")

    def backbone_factor(self, it: int) -> float:
        """Head warm-up factor of the backbone at ``it``: 0 while frozen, then a linear ramp to 1."""
        if it < self.frozen_iters:
            return 0.0
        if self.ramp_iters > 0:
            return min(1.0, (it - self.frozen_iters + 1) / self.ramp_iters)
        return 1.0

    def backbone_lr_at(self, it: int) -> float:
        """Backbone lr at ``it``: the warm-up factor times the schedule (or the constant
        ``head_warmup.backbone_lr``)."""
        target = self.lr(it) if self.backbone_lr is None else self.backbone_lr
        return target * self.backbone_factor(it)

    def backbone_wd_factor(self, it: int) -> float:
        """FINO ramps the backbone's weight decay with its lr; the requires_grad variant leaves it alone."""
        return self.backbone_factor(it) if self.head_warmup_mode == "fino" else 1.0


def build_optimizer(cfg: PretrainConfig, backbone: nn.Module, heads: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW over separate groups for backbone and heads, so the head warm-up can address the backbone
    (each group flagged ``is_backbone``); lr and weight decay are set every iteration by :func:`apply_schedules`.
    Fused (``fused=True``) except under FSDP2 on CPU."""
    o = cfg.optim
    groups = []
    for g in ssl.param_groups(backbone, 0.0, 0.0, o.layer_decay or 1.0, o.patch_embed_lr_mult or 1.0):
        g["is_backbone"] = True
        groups.append(g)
    for g in ssl.param_groups(heads, 0.0, 0.0, 1.0, 1.0):
        g["is_backbone"] = False
        groups.append(g)
    for g in groups:
        g.pop("names", None)
    # fused kernels on CUDA, and on CPU too (torch >= 2.4: 6x faster than the per-tensor loop over the
    # 65,536-prototype heads, equal to it within float round-off); not for CPU FSDP2's DTensor shards
    fused = device.type == "cuda" or (device.type == "cpu" and not cfg.train.fsdp)
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(o.betas), fused=fused or None)


def apply_schedules(optimizer: torch.optim.Optimizer, sched: Schedules, it: int, clip_per_param: bool) -> dict[str, float]:
    """Write iteration ``it``'s lr and weight decay into every group; returns the scheduled values."""
    lr, wd = sched.lr(it), sched.wd(it)
    bb_lr, bb_wd = sched.backbone_lr_at(it), wd * sched.backbone_wd_factor(it)
    freeze_ll = it < sched.freeze_last_layer_iters
    fino = sched.head_warmup_mode == "fino"
    bb_target = lr if sched.backbone_lr is None else sched.backbone_lr
    for g in optimizer.param_groups:
        # FINO's warm-up leaves the patch embedding trainable: it gets the backbone's target lr at once
        warm = g["is_backbone"] and not (fino and g["is_patch_embed"])
        base = bb_lr if warm else (bb_target if g["is_backbone"] else lr)
        if g["is_last_layer"] and freeze_ll and not clip_per_param:
            base = 0.0  # v2/v3 freeze the prototypes with a zero lr; v1 drops their gradients
        g["lr"] = base * g["lr_multiplier"]
        g["weight_decay"] = (bb_wd if warm else wd) * g["wd_multiplier"]
    return {"lr": lr, "backbone_lr": bb_lr, "wd": wd, "momentum": sched.momentum(it),
            "teacher_temp": sched.teacher_temp(it)}


def clip_and_freeze(student: Any, cfg: PretrainConfig, sched: Schedules, it: int, sharded: bool) -> None:
    """The version's clipping of the student's gradients, and (v1) the freeze-last-layer rule."""
    o = cfg.optim
    if o.clip_per_param:  # DINOv1: per parameter over the whole student, then drop the prototypes' grads
        if sharded:
            clip_per_parameter_sharded(student, o.clip_grad)
        else:
            ssl.clip_gradients(student, o.clip_grad, per_parameter=True)
        for head in student.heads().values():
            ssl.cancel_last_layer_gradients(head, it, sched.freeze_last_layer_iters)
    else:  # DINOv2/v3: global norm per sub-model
        ssl.clip_gradients(student.backbone, o.clip_grad, per_parameter=False)
        for head in student.heads().values():
            ssl.clip_gradients(head, o.clip_grad, per_parameter=False)


@torch.no_grad()
def clip_per_parameter_sharded(module: nn.Module, max_norm: float) -> None:
    """DINOv1's per-parameter clipping (``g *= min(1, max_norm / (||g|| + 1e-6))``) for FSDP2-sharded
    gradients: each parameter's norm is the all-reduced sum of its shards' squared norms."""
    # FSDP2 only, imported here like the FSDP imports of meddino.pretrain.distributed: torch builds
    # without distributed support have no torch.distributed.tensor, and single-process runs never call this
    from torch.distributed.tensor import DTensor

    if max_norm <= 0:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    sq = torch.stack([t.float().pow(2).sum() for t in local])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sq)
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for t, c in zip(local, coef):
        t.mul_(c.to(t.dtype))
