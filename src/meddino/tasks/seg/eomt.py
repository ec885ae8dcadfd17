"""EoMT (Encoder-only Mask Transformer, Kerssies et al., CVPR 2025) on a meddino backbone, and its loss.

Written from the facts in shared/reference/downstream.md:

- ``num_queries`` learned queries (``nn.Embedding``) are prepended to the token sequence before the last
  ``L2`` blocks (``L2`` = 3 for ViT-S/B, 4 for L, 5 for g). They carry no position embedding and, on DINOv3,
  no RoPE (``run_blocks(extra_prefix=num_queries)``).
- Heads on the final-normed tokens: class head ``Linear(D, C + 1)`` (the last class is "no object"),
  mask head a 3-layer MLP on the queries, pixel features from the patch grid upsampled by
  ``n = max(0, round(log2(patch)) - 2)`` scale blocks (2x2 stride-2 transposed conv, GELU, depthwise 3x3
  conv, LayerNorm2d); mask logits ``einsum(query embedding, pixel features)``. Patch 16 -> 2 blocks (1/4
  of the input), patch 8 -> 1 block (1/4), patch 14 -> 2 blocks (1/3.5): "about 1/4" for every patch size.
- Masked attention: before each of the L2 blocks a prediction is made from the current tokens; a query
  may attend to the patches inside its predicted mask only (mask logits resized to the patch grid,
  ``> 0``). Queries always see each other and the prefix tokens, so no attention row is ever empty. Each
  query of each sample keeps its mask in block ``i`` with probability ``p_i``: mask annealing
  (:func:`anneal_windows`, :func:`mask_annealing_probs`, in completed optimiser steps) takes every ``p_i``
  from 1 to 0, after which the forward pass is a plain ViT plus heads, which is what inference runs.
  Without annealing every mask stays on, in training and at inference (``masked_inference``).
- Every intermediate prediction and the final one are supervised (deep supervision).

The loss (:class:`MaskClassificationLoss`) follows Mask2Former: Hungarian matching (scipy
``linear_sum_assignment``) on ``class_weight * (-p(class)) + mask_weight * BCE + dice_weight * Dice`` over
shared uniformly sampled points; matched masks are then supervised with sigmoid BCE + Dice on points chosen by
importance sampling (``oversample_ratio * P`` uniform candidates, the ``importance_ratio * P`` most
uncertain -- logits closest to 0 -- plus uniform points for the rest), classes with cross-entropy where
unmatched queries target "no object" with weight 0.1. Deliberate difference: when a target mask has at most
``num_points`` pixels (tiny test images) every pixel is used instead of sampled points, which makes the loss
exact and deterministic. Pixels with ``ignore_index`` carry no weight in the mask terms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from meddino.errors import ConfigError
from meddino.tasks.seg.tokens import tokens_to_map


# ---------------------------------------------------------------------------------------------- schedule
def default_num_blocks(depth: int) -> int:
    """L2 by model size (EoMT): 3 for ViT-S/B (12 blocks), 4 for ViT-L (24), 5 for ViT-g (40); never more
    than depth - 1 so at least one block runs before the queries join."""
    l2 = 3 if depth < 24 else 4 if depth < 40 else 5
    return max(1, min(l2, depth - 1))


def resolve_num_blocks(depth: int, num_blocks: int | None) -> int:
    """``eomt.num_blocks`` (None: :func:`default_num_blocks`) checked against a ``depth``-block backbone."""
    resolved = default_num_blocks(depth) if num_blocks is None else int(num_blocks)
    if not 1 <= resolved < depth:
        raise ConfigError(f"eomt.num_blocks must be in 1..{depth - 1} for a {depth}-block backbone")
    return resolved


#: The fraction of a planned run official EoMT anneals over when no length is given: every official
#: (DINOv2) config ends the last block's window at 5/6 of its steps and trains the last sixth unmasked.
DEFAULT_ANNEAL_FRACTION = 5 / 6


def anneal_windows(num_blocks: int, end: int) -> list[tuple[int, int]]:
    """Per masked block, the (start, end) completed steps of its annealing, in official EoMT's layout.

    Official EoMT takes these as lists in its configs; all of its DINOv2 configs follow one rule, written
    here with ``u = end / 5``: every mask is kept for the first ``u`` steps; block ``i``'s window is ``u``
    long and the windows' starts are evenly spaced from ``u`` to ``4u``, so the last ends at ``end``
    (L2 = 4: [u, 2u], [2u, 3u], [3u, 4u], [4u, 5u]; L2 = 3: starts u, 2.5u, 4u; L2 = 5: u, 1.75u, ..., 4u,
    overlapping). One masked block (not an official case) anneals over [u, end].
    """
    if num_blocks < 1 or end < 1:
        raise ValueError(f"anneal_windows needs num_blocks >= 1 and end >= 1, got {num_blocks}, {end}")
    if num_blocks == 1:
        return [(round(end / 5), end)]
    spread = 3 / (num_blocks - 1)
    return [(round(end * (1 + spread * i) / 5), round(end * (2 + spread * i) / 5)) for i in range(num_blocks)]


def mask_annealing_probs(step: int, windows: Sequence[tuple[int, int]], power: float = 0.9) -> list[float]:
    """Probability that each masked block keeps a query's attention mask after ``step`` completed
    optimiser steps: 1 before its window, 0 from its end on, ``(1 - t)^power`` in between (``t`` the
    fraction of the window done) -- official EoMT's ``mask_annealing`` (its power is the lr's poly 0.9)."""
    probs = []
    for start, end in windows:
        if step < start:
            probs.append(1.0)
        elif step >= end:
            probs.append(0.0)
        else:
            probs.append((1.0 - (step - start) / (end - start)) ** power)
    return probs


def num_upscale_blocks(patch_size: int) -> int:
    """``max(0, round(log2(patch)) - 2)``: pixel features at about 1/4 of the input (see module docstring)."""
    return max(0, int(round(math.log2(patch_size))) - 2)


# ---------------------------------------------------------------------------------------------- modules
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ScaleBlock(nn.Module):
    """2x upsampling: ConvTranspose 2x2 s2 -> GELU -> depthwise 3x3 -> LayerNorm2d."""

    def __init__(self, dim: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.dw = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dw(self.act(self.up(x))))


class EoMT(nn.Module):
    """Queries, class/mask heads and pixel upsampling; the backbone is passed at call time (it is owned by
    the surrounding :class:`~meddino.tasks.seg.heads.SegmentationModel`).

    ``masked_inference``: a forward pass without ``attn_probs`` (validation, test, predict) keeps every
    mask. That is masked attention without annealing (``eomt.mask_annealing=false``): official EoMT then
    leaves its mask probabilities at 1, and its inference reads the same probabilities, so it masks too.
    Otherwise inference is the plain ViT pass that annealing ends with.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, num_queries: int = 100, num_blocks: int | None = None,
                 masked_inference: bool = False):
        super().__init__()
        depth, dim = int(backbone.depth), int(backbone.embed_dim)
        self.num_blocks = resolve_num_blocks(depth, num_blocks)
        self.masked_inference = bool(masked_inference)
        self.num_queries, self.num_classes = int(num_queries), int(num_classes)
        self.queries = nn.Embedding(self.num_queries, dim)
        self.class_head = nn.Linear(dim, num_classes + 1)
        self.mask_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.upscale = nn.Sequential(*[ScaleBlock(dim) for _ in range(num_upscale_blocks(int(backbone.patch_size)))])

    def _predict(self, backbone: nn.Module, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = backbone.norm(tokens)
        q = tokens[:, : self.num_queries]
        patch = tokens[:, self.num_queries + backbone.num_prefix_tokens :]
        class_logits = self.class_head(q)
        pixels = self.upscale(tokens_to_map(patch, grid))
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_head(q), pixels)
        return mask_logits, class_logits

    def _attn_mask(self, mask_logits: torch.Tensor, grid: tuple[int, int], num_tokens: int, prefix: int,
                   keep: torch.Tensor) -> torch.Tensor:
        """Boolean [B, 1, T, T] (True = may attend): query rows see patch columns inside their mask only.
        ``keep`` [B, Q]: which queries keep their mask (a dropped one sees every patch), drawn per sample and
        query as official EoMT does."""
        b, q = mask_logits.shape[:2]
        inside = F.interpolate(mask_logits.detach().float(), size=grid, mode="bilinear", align_corners=False) > 0
        inside = inside.flatten(2) | ~keep.view(b, q, 1)
        allowed = torch.ones(b, 1, num_tokens, num_tokens, dtype=torch.bool, device=mask_logits.device)
        allowed[:, 0, :q, q + prefix :] = inside
        return allowed

    def forward(self, backbone: nn.Module, x: torch.Tensor, frozen: bool = False,
                attn_probs: Sequence[float] | None = None, deep_supervision: bool = False) -> dict[str, Any]:
        """``attn_probs``: per masked block, the probability that a query keeps its mask (None: inference,
        every mask kept with ``masked_inference``, none otherwise). ``deep_supervision``: also return the
        prediction made before each masked block (``aux``)."""
        tokens, rope, grid = backbone.prepare_tokens(x)
        start = backbone.depth - self.num_blocks
        if frozen:
            with torch.no_grad():
                tokens = backbone.run_blocks(tokens, rope, 0, start)
        else:
            tokens = backbone.run_blocks(tokens, rope, 0, start)
        b = tokens.shape[0]
        queries = self.queries.weight[None].expand(b, -1, -1).to(tokens.dtype)
        tokens = torch.cat([queries, tokens], dim=1)
        prefix = int(backbone.num_prefix_tokens)
        aux: list[dict[str, torch.Tensor]] = []
        if attn_probs is None:
            attn_probs = [1.0 if self.masked_inference else 0.0] * self.num_blocks
        probs = list(attn_probs)
        if len(probs) != self.num_blocks:
            raise ValueError(f"attn_probs needs {self.num_blocks} values, got {len(probs)}")
        for i in range(self.num_blocks):
            attn_mask = None
            if deep_supervision or probs[i] > 0:
                mask_logits, class_logits = self._predict(backbone, tokens, grid)
                if deep_supervision:
                    aux.append({"pred_masks": mask_logits, "pred_logits": class_logits})
                if probs[i] > 0:
                    keep = torch.rand(b, self.num_queries, device=x.device) < probs[i]
                    attn_mask = self._attn_mask(mask_logits, grid, tokens.shape[1], prefix, keep)
            tokens = backbone.run_blocks(tokens, rope, start + i, start + i + 1,
                                         extra_prefix=self.num_queries, attn_mask=attn_mask)
        mask_logits, class_logits = self._predict(backbone, tokens, grid)
        return {"pred_masks": mask_logits, "pred_logits": class_logits, "aux": aux}

    @torch.no_grad()
    def semantic_scores(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W]: ``sum_q sigmoid(mask_q) * softmax(class_q)[:C]`` at the input size (the inference pass:
        plain ViT, or masked with ``masked_inference``)."""
        out = self.forward(backbone, x)
        return semantic_map_scores(out["pred_masks"], out["pred_logits"], tuple(x.shape[-2:]))


def semantic_map_scores(mask_logits: torch.Tensor, class_logits: torch.Tensor,
                        size: Sequence[int] | None = None) -> torch.Tensor:
    """Per-pixel class scores ``sum_q sigmoid(mask_q) * softmax(class_q)[:C]`` (no-object dropped)."""
    if size is not None and tuple(mask_logits.shape[-2:]) != tuple(size):
        mask_logits = F.interpolate(mask_logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
    probs = class_logits.float().softmax(-1)[..., :-1]
    return torch.einsum("bqhw,bqc->bchw", mask_logits.float().sigmoid(), probs)


# ---------------------------------------------------------------------------------------------- loss
def semantic_to_targets(mask: torch.Tensor, num_classes: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[H, W] class map -> (labels [T], binary masks [T, H, W] float), one per class present."""
    present = [c for c in torch.unique(mask).tolist() if c != ignore_index and 0 <= c < num_classes]
    labels = torch.tensor(present, dtype=torch.long, device=mask.device)
    masks = torch.stack([(mask == c) for c in present]).float() if present else mask.new_zeros((0, *mask.shape)).float()
    return labels, masks


def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of ``maps`` [N, C, H, W] at ``coords`` [N, P, 2] ((x, y) in [0, 1]) -> [N, C, P]."""
    grid = (2.0 * coords - 1.0).unsqueeze(2)
    return F.grid_sample(maps, grid, mode="bilinear", align_corners=False).squeeze(3)


def importance_points(logits: torch.Tensor, num_points: int, oversample: float, importance: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask2Former's point selection for [N, 1, H, W] logits -> coords [N, P, 2]: of ``oversample * P``
    uniform candidates keep the ``importance * P`` with the smallest |logit|, add uniform points for the rest."""
    n = logits.shape[0]
    n_cand = int(num_points * oversample)
    cand = torch.rand(n, n_cand, 2, device=logits.device, generator=generator)
    unc = -point_sample(logits.detach().float(), cand).abs()[:, 0]  # [N, n_cand]
    k = int(importance * num_points)
    idx = unc.topk(k, dim=1).indices
    picked = torch.gather(cand, 1, idx[..., None].expand(-1, -1, 2))
    rest = torch.rand(n, num_points - k, 2, device=logits.device, generator=generator)
    return torch.cat([picked, rest], dim=1)


def pairwise_mask_costs(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE and Dice cost matrices [Q, T] between logits [Q, P] and targets [T, P] with point weights [P]."""
    w = weights.float()
    denom = w.sum().clamp_min(1.0)
    pos, neg = F.softplus(-logits) * w, F.softplus(logits) * w
    bce = (pos @ targets.T + neg @ (1 - targets).T) / denom
    p = logits.sigmoid() * w
    tw = targets * w
    dice = 1 - (2 * p @ targets.T + 1) / (p.sum(-1)[:, None] + tw.sum(-1)[None, :] + 1)
    return bce, dice


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-mask ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`` over weighted points; [N, P] -> [N]."""
    p = logits.sigmoid() * weights
    t = targets * weights
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-mask mean sigmoid BCE over weighted points; [N, P] -> [N]."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weights
    return loss.sum(-1) / weights.sum(-1).clamp_min(1.0)


class MaskClassificationLoss(nn.Module):
    """Mask2Former's set loss with Hungarian matching, for EoMT's final and intermediate predictions."""

    def __init__(self, num_classes: int, ignore_index: int = 255, num_points: int = 12544,
                 oversample_ratio: float = 3.0, importance_ratio: float = 0.75, no_object_weight: float = 0.1,
                 mask_weight: float = 5.0, dice_weight: float = 5.0, class_weight: float = 2.0):
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.num_points, self.oversample, self.importance = num_points, oversample_ratio, importance_ratio
        self.mask_weight, self.dice_weight, self.class_weight = mask_weight, dice_weight, class_weight
        empty = torch.ones(num_classes + 1)
        empty[-1] = no_object_weight
        self.register_buffer("class_weights", empty, persistent=False)

    def _dense(self, shape: Sequence[int]) -> bool:
        return int(np.prod(shape)) <= self.num_points

    @torch.no_grad()
    def match(self, mask_logits: torch.Tensor, class_logits: torch.Tensor, labels: torch.Tensor,
              masks: torch.Tensor, valid: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """One image: (query indices, target indices) of the minimum-cost assignment."""
        if labels.numel() == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        cost_class = -class_logits.float().softmax(-1)[:, labels]  # [Q, T]
        pred, tgt, w = self._points(mask_logits.float(), masks, valid, None)
        cost_bce, cost_dice = pairwise_mask_costs(pred, tgt, w)
        cost = self.class_weight * cost_class + self.mask_weight * cost_bce + self.dice_weight * cost_dice
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        return rows.astype(np.int64), cols.astype(np.int64)

    def _points(self, pred: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor,
                importance_from: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pred [Q, P], targets [T, P], weights [P] or [T, P]) on the comparison points.

        Dense mode (target <= num_points pixels): predictions resized to the target size, every pixel.
        Matching uses one shared set of uniform points; the loss (``importance_from`` given: matched
        logits [M, h, w]) uses per-mask importance-sampled points.
        """
        h, w = masks.shape[-2:]
        if self._dense((h, w)):
            if tuple(pred.shape[-2:]) != (h, w):
                pred = F.interpolate(pred[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            return pred.flatten(1), masks.flatten(1), valid.float().flatten()
        if importance_from is None:
            coords = torch.rand(1, self.num_points, 2, device=pred.device)
            p = point_sample(pred[None], coords)[0]
            t = point_sample(masks[None], coords)[0]
            v = point_sample(valid[None, None].float(), coords)[0, 0]
            return p, t, v
        coords = importance_points(importance_from[:, None], self.num_points, self.oversample, self.importance)
        p = point_sample(pred[:, None], coords)[:, 0]
        t = point_sample(masks[:, None], coords)[:, 0]
        v = point_sample(valid[None, None].float().expand(len(coords), 1, h, w), coords)[:, 0]
        return p, t, v

    def single(self, mask_logits: torch.Tensor, class_logits: torch.Tensor,
               targets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Loss of one prediction level for a batch. ``targets``: per image (labels, masks, valid)."""
        b, q = class_logits.shape[:2]
        target_classes = torch.full((b, q), self.num_classes, dtype=torch.long, device=class_logits.device)
        preds, tgts, valids = [], [], []
        num_masks = 0
        for i, (labels, masks, valid) in enumerate(targets):
            rows, cols = self.match(mask_logits[i], class_logits[i], labels, masks, valid)
            num_masks += len(cols)
            if len(cols) == 0:
                continue
            rows_t = torch.as_tensor(rows, device=class_logits.device)
            cols_t = torch.as_tensor(cols, device=class_logits.device)
            target_classes[i, rows_t] = labels[cols_t]
            preds.append(mask_logits[i][rows_t])
            tgts.append(masks[cols_t])
            valids.append(valid)
        loss_class = F.cross_entropy(class_logits.float().transpose(1, 2), target_classes,
                                     weight=self.class_weights.to(class_logits.device))
        zero = mask_logits.sum() * 0.0
        loss_mask, loss_dice = zero, zero
        if num_masks:
            bce_sum, dice_sum = zero, zero
            for pred, tgt, valid in zip(preds, tgts, valids):
                pred = pred.float()
                if self._dense(tgt.shape[-2:]):
                    p, t, w = self._points(pred, tgt, valid, None)
                    w = w.expand_as(p)
                else:  # points chosen where the prediction itself is uncertain
                    p, t, w = self._points(pred, tgt, valid, pred.detach())
                bce_sum = bce_sum + bce_loss(p, t, w).sum()
                dice_sum = dice_sum + dice_loss(p, t, w).sum()
            loss_mask, loss_dice = bce_sum / num_masks, dice_sum / num_masks
        total = self.mask_weight * loss_mask + self.dice_weight * loss_dice + self.class_weight * loss_class
        return {"loss": total, "loss_mask": loss_mask, "loss_dice": loss_dice, "loss_class": loss_class}

    def forward(self, outputs: dict[str, Any], semantic: torch.Tensor) -> dict[str, torch.Tensor]:
        """Deep-supervised loss: the final prediction plus every ``aux`` one, summed.

        ``semantic``: [B, H, W] class maps (``ignore_index`` = no weight).
        """
        targets = []
        for m in semantic:
            labels, masks = semantic_to_targets(m, self.num_classes, self.ignore_index)
            targets.append((labels, masks, m != self.ignore_index))
        levels = [outputs, *outputs.get("aux", [])]
        result: dict[str, torch.Tensor] = {}
        for level in levels:
            parts = self.single(level["pred_masks"], level["pred_logits"], targets)
            for k, v in parts.items():
                result[k] = result.get(k, 0.0) + v
        return result
