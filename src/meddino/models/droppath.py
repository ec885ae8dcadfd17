"""Stochastic depth as each DINO version does it.

- DINOv1: timm's per-sample coin with rates rising linearly over the blocks (timm's default).
- DINOv2 (``drop_path_uniform``): the same rate in every block; when it exceeds 0.1 the official block keeps
  a random subset of exactly ``max(int(B * (1 - p)), 1)`` samples and adds their residual scaled by
  ``B / subset`` (``drop_add_residual_stochastic_depth``), instead of an independent coin per sample.
- DINOv3: the batch-subset form at any rate > 0, uniform over blocks.

:class:`BatchSubsetDropPath` reproduces the subset rule on the residual branch: the output equals the
official one (the originals also skip computing the dropped samples, which only saves time).
"""

from __future__ import annotations

import torch
from torch import nn


class BatchSubsetDropPath(nn.Module):
    """Keep a random subset of ``max(int(B * (1 - p)), 1)`` samples, scaled by ``B / subset``; zero the rest."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob <= 0.0:
            return residual
        batch = residual.shape[0]
        keep = max(int(batch * (1.0 - self.drop_prob)), 1)
        chosen = torch.randperm(batch, device=residual.device)[:keep]
        mask = torch.zeros(batch, device=residual.device, dtype=residual.dtype)
        mask[chosen] = batch / keep
        return residual * mask.view(batch, *([1] * (residual.ndim - 1)))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def apply_dino_drop_path(vit: nn.Module, version: str, rate: float) -> None:
    """Set every block's drop path the way ``version`` does (v1 keeps timm's linear per-sample rule)."""
    if version == "v1" or rate <= 0.0:
        return
    from timm.layers import DropPath  # why: keeps this torch-only module free of timm (seconds to import)

    for block in vit.blocks:
        for name in ("drop_path1", "drop_path2"):
            if hasattr(block, name):
                module = BatchSubsetDropPath(rate) if (version == "v3" or rate > 0.1) else DropPath(rate)
                setattr(block, name, module)
