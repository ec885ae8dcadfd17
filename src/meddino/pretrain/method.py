"""Student, EMA teacher, Gram teacher and the per-version objective (DINOv1 / v2 / v3).

:class:`Student` is one ``nn.Module`` holding the backbone and the heads, so DDP/FSDP wrap it whole and a
single gradient all-reduce covers backbone and heads. Its ``forward`` runs the student's two global crops
(masked for iBOT) in one pass and ALL local crops of the batch in a second pass (stacked ``[n*B, 3, L, L]``),
then the DINO head once over every CLS token (and the masked patch tokens when the iBOT head is shared,
as DINOv2 does). :class:`SSLObjective` owns the teacher side and the losses; its state (EMA centres, Gram
teacher refresh count) is checkpointed.

Objective, per version (facts: shared/reference/dino-recipes.md):

- v1: DINO loss on 2 global + n local crops against the centred (EMA, m 0.9) and sharpened teacher.
- v2: + iBOT masked-patch loss (shared head by default) + KoLeo (0.1, per global crop, summed); EMA centre
  by default, Sinkhorn-Knopp optional.
- v3: Sinkhorn-Knopp, separate iBOT head, KoLeo, optional Gram anchoring against a frozen Gram teacher
  (the starting backbone, optionally refreshed from the EMA teacher every N iterations).

Deliberate difference: the iBOT masks of a step are drawn for the GLOBAL batch from a generator seeded by
(seed, iteration) and each rank takes its slice, so masks do not depend on the number of processes (the
originals draw them per GPU, with the ratio range spread over the local batch instead of the global one).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch import nn

from meddino import ssl
from meddino.pretrain.config import PretrainConfig


class Student(nn.Module):
    """Backbone + DINO head (+ iBOT head, possibly the same module) behind one forward."""

    def __init__(self, backbone: nn.Module, dino_head: nn.Module, ibot_head: nn.Module | None):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head
        self.shared_ibot_head = ibot_head is not None and ibot_head is dino_head

    def heads(self) -> dict[str, nn.Module]:
        """The distinct heads by name (a shared iBOT head appears once, as ``dino_head``)."""
        out = {"dino_head": self.dino_head}
        if self.ibot_head is not None and not self.shared_ibot_head:
            out["ibot_head"] = self.ibot_head
        return out

    def forward(
        self, global_crops: torch.Tensor, local_crops: torch.Tensor | None, masks: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """``global_crops`` [2B, 3, G, G] (crop-major), ``local_crops`` [nB, 3, L, L] or None, ``masks``
        [2B, N] bool or None. Returns CLS logits of every crop (globals first), masked-patch logits, and the
        global CLS / patch features for KoLeo and Gram anchoring."""
        g = self.backbone.forward_features(global_crops, masks=masks)
        cls_tokens = [g["cls"]]
        if local_crops is not None and local_crops.shape[0] > 0:
            cls_tokens.append(self.backbone.forward_features(local_crops)["cls"])
        cls_all = torch.cat(cls_tokens)
        n_cls = cls_all.shape[0]
        out = {"global_cls": g["cls"], "global_patch": g["patch"]}
        masked_patches = None
        if masks is not None and self.ibot_head is not None:
            masked_patches = g["patch"][masks]  # [M, D]
        if masked_patches is not None and self.shared_ibot_head:
            logits = self.dino_head(torch.cat([cls_all, masked_patches]))
            out["cls_logits"], out["patch_logits"] = logits[:n_cls], logits[n_cls:]
        else:
            out["cls_logits"] = self.dino_head(cls_all)
            if masked_patches is not None:
                out["patch_logits"] = self.ibot_head(masked_patches)
        return out


def build_student(cfg: PretrainConfig, backbone: nn.Module) -> Student:
    """Fresh heads on ``backbone`` with the recipe's sizes (heads never come from a checkpoint: no DINOv2/v3
    release contains them)."""
    h = cfg.model.head
    ibot = cfg.method.ibot
    version = cfg.method.version
    separate = bool(ibot.separate_head) if version != "v1" else None
    dino_head, ibot_head = ssl.make_heads(
        version,
        backbone.embed_dim,
        out_dim=h.out_dim,
        hidden_dim=h.hidden_dim,
        bottleneck_dim=h.bottleneck_dim,
        nlayers=h.nlayers,
        norm_last_layer=h.norm_last_layer,
        ibot_separate=separate,
        ibot_out_dim=h.ibot_out_dim if separate else None,
        ibot_bottleneck_dim=h.ibot_bottleneck_dim if separate else None,
    )
    if not ibot.enabled:
        ibot_head = None
    if not ibot.enabled and getattr(backbone, "mask_token", None) is not None:
        # Unused without iBOT: a parameter without gradient would stall DDP's all-reduce.
        backbone.mask_token.requires_grad_(False)
    return Student(backbone, dino_head, ibot_head)


class SSLObjective(nn.Module):
    """Teacher side and losses. ``teacher`` is a deep copy of the student (EMA, no gradients, eval mode so
    drop path is off, as the originals build the teacher without drop path)."""

    def __init__(self, cfg: PretrainConfig, student: Student):
        super().__init__()
        self.cfg = cfg
        m = cfg.method
        self.version = m.version
        self.teacher = copy.deepcopy(student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.gram_teacher: nn.Module | None = None
        if m.gram.enabled:
            self.gram_teacher = copy.deepcopy(student.backbone)
            for p in self.gram_teacher.parameters():
                p.requires_grad_(False)
            self.gram_teacher.eval()
        k = cfg.model.head.out_dim
        k_ibot = cfg.model.head.ibot_out_dim or k
        self.register_buffer("center", torch.zeros(1, k))
        self.register_buffer("ibot_center", torch.zeros(1, k_ibot))
        self.gram_refreshes = 0
        self.use_ibot = bool(m.ibot.enabled)
        self.sinkhorn = m.centering == "sinkhorn"

    def train(self, mode: bool = True) -> SSLObjective:  # the teacher always stays in eval mode
        super().train(mode)
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    # ------------------------------------------------------------------------------------------ teacher
    @torch.no_grad()
    def teacher_targets(
        self, global_crops: torch.Tensor, masks: torch.Tensor | None, teacher_temp: float,
        bf16_device: str | None = None,
    ) -> dict[str, Any]:
        """Teacher probabilities for the global crops [2, B, K] and the masked patches [M, K] (plus the raw
        logits for the centre update, the teacher's CLS features ``cls_features`` [2B, D] and, with Gram
        anchoring on, the Gram teacher's patch features ``gram_patches``).

        Every teacher-side forward pass (EMA teacher and Gram teacher) runs here, in one no-grad path: no
        autograd graph is recorded, and with ``bf16_device`` (the engine passes ``"cuda"`` when the step
        runs in bf16) under bf16 autocast; the centring / Sinkhorn-Knopp that follows runs in fp32."""
        t = self.teacher
        with teacher_autocast(bf16_device):
            feats = t.backbone.forward_features(global_crops)
            cls = feats["cls"]
            n_cls = cls.shape[0]
            patches = feats["patch"][masks] if (masks is not None and self.use_ibot) else None
            if patches is not None and t.shared_ibot_head:
                logits = t.dino_head(torch.cat([cls, patches]))
                cls_logits, patch_logits = logits[:n_cls], logits[n_cls:]
            else:
                cls_logits = t.dino_head(cls)
                patch_logits = t.ibot_head(patches) if patches is not None else None
            gram_patches = (self.gram_teacher.forward_features(global_crops)["patch"]
                            if self.gram_active() else None)
        cls_logits, patch_logits = cls_logits.float(), (patch_logits.float() if patch_logits is not None else None)
        its = self.cfg.method.sinkhorn_iterations
        if self.sinkhorn:
            cls_probs = ssl.sinkhorn_knopp(cls_logits, teacher_temp, its)
            patch_probs = ssl.sinkhorn_knopp(patch_logits, teacher_temp, its) if patch_logits is not None else None
        else:
            cls_probs = ssl.softmax_center(cls_logits, self.center, teacher_temp)
            patch_probs = (
                ssl.softmax_center(patch_logits, self.ibot_center, teacher_temp) if patch_logits is not None else None
            )
        out = {
            "cls_probs": cls_probs.view(2, -1, cls_probs.shape[-1]),
            "patch_probs": patch_probs,
            "cls_logits": cls_logits,
            "patch_logits": patch_logits,
            "cls_features": cls.detach(),  # teacher CLS [2B, D] for the health diagnostics (effective rank)
        }
        if gram_patches is not None:
            out["gram_patches"] = gram_patches
        return out

    def gram_active(self) -> bool:
        """Whether the Gram loss is computed this run (also while a weight schedule is at 0, as the original)."""
        gc = self.cfg.method.gram
        return self.gram_teacher is not None and (gc.weight_schedule is not None or gc.weight > 0)

    @torch.no_grad()
    def update_centers(self, targets: dict[str, Any]) -> None:
        """EMA centre update after the loss (v1 and v2's default centering)."""
        if self.sinkhorn:
            return
        mom = self.cfg.method.center_momentum
        self.center.copy_(ssl.update_center(self.center, targets["cls_logits"], mom))
        if targets["patch_logits"] is not None:
            self.ibot_center.copy_(ssl.update_center(self.ibot_center, targets["patch_logits"], mom))

    def maybe_refresh_gram_teacher(self, iteration: int) -> bool:
        """Refresh the Gram teacher after ``iteration`` when ``method.gram`` says so (``refresh_due``:
        every ``refresh_every`` iterations from ``it_first_update`` on, at most ``max_refreshes`` times)."""
        if self.gram_teacher is None or not self.cfg.method.gram.refresh_due(iteration, self.gram_refreshes):
            return False
        self.refresh_gram_teacher()
        return True

    @torch.no_grad()
    def refresh_gram_teacher(self) -> None:
        """Copy the EMA teacher backbone into the Gram teacher (DINOv3's periodic refresh)."""
        if self.gram_teacher is None:
            return
        src = dict(self.teacher.backbone.named_parameters())
        for name, p in self.gram_teacher.named_parameters():  # shard-wise copy also under FSDP2
            p.copy_(src[name])
        self.gram_refreshes += 1

    # ------------------------------------------------------------------------------------------ loss
    def losses(
        self,
        student_out: dict[str, torch.Tensor],
        targets: dict[str, Any],
        masks: torch.Tensor | None,
        global_crops: torch.Tensor,
        batch: int,
        iteration: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """All loss terms (weighted total in ``loss``). ``iteration`` (0-based) sets the Gram weight when
        ``method.gram.weight_schedule`` is given (``gram_weight`` is then logged as a term)."""
        m = self.cfg.method
        k = student_out["cls_logits"].shape[-1]
        s_logits = student_out["cls_logits"].float().view(-1, batch, k)  # [2 + n, B, K]
        terms: dict[str, torch.Tensor] = {}
        terms["dino"] = ssl.dino_loss(s_logits, targets["cls_probs"], m.student_temp, local_weight=m.local_crop_weight)
        total = terms["dino"]
        if self.use_ibot and masks is not None and "patch_logits" in student_out:
            weights = ssl.ibot_patch_weights(masks)
            terms["ibot"] = ssl.ibot_loss(
                student_out["patch_logits"].float(), targets["patch_probs"], weights, n_crops=2 * batch,
                student_temp=m.student_temp,
            )
            total = total + m.ibot.weight * terms["ibot"]
        if (m.koleo_weight or 0.0) > 0:
            cls = student_out["global_cls"].float().view(2, batch, -1)
            terms["koleo"] = ssl.koleo_loss(cls[0]) + ssl.koleo_loss(cls[1])
            total = total + m.koleo_weight * terms["koleo"]
        gc = m.gram
        if self.gram_active():
            if gc.weight_schedule is not None and iteration is None:
                raise ValueError("losses: method.gram.weight_schedule needs the iteration")
            # as the original, the loss is computed (and logged) also while the scheduled weight is 0
            gram_weight = gc.weight_at(int(iteration or 0), self.cfg.train.iterations)
            terms["gram"] = ssl.gram_loss(  # the Gram teacher's patches: from teacher_targets' no-grad path
                student_out["global_patch"], targets["gram_patches"], img_level=gc.img_level, remove_neg=gc.remove_neg,
                remove_only_teacher_neg=gc.remove_only_teacher_neg, normalize=gc.normalized,
                tokens_used=gc.tokens_used, masks=masks,
            )
            terms["gram_weight"] = torch.tensor(gram_weight)
            total = total + gram_weight * terms["gram"]
        terms["loss"] = total
        return terms


def teacher_autocast(bf16_device: str | None) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``bf16_device`` for the teacher's forward passes, or nothing (fp32)."""
    if bf16_device is None:
        return contextlib.nullcontext()
    return torch.autocast(bf16_device, dtype=torch.bfloat16)


def iteration_masks(
    cfg: PretrainConfig, iteration: int, global_batch: int, slots: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor | None:
    """iBOT masks [2 * b, N] for this rank's samples at ``iteration``: drawn for the whole global batch from
    a generator seeded by (seed, iteration), crop-major, and indexed by the samples' ``slots`` (their
    positions 0..global_batch-1 in the global batch, so skipped unreadable files drop their own rows)."""
    ib = cfg.method.ibot
    if not ib.enabled or cfg.method.version == "v1":
        return None
    gen = torch.Generator().manual_seed((int(cfg.train.seed) * 1_000_003 + 7919 * int(iteration) + 17) % (2**62))
    full = ssl.block_masks(
        2 * global_batch, grid, cfg.method.version, tuple(ib.mask_ratio), ib.mask_probability, generator=gen
    )
    full = full.view(2, global_batch, -1)
    return full[:, slots.long()].reshape(2 * len(slots), -1)
