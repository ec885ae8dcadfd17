"""Drop path per DINO version: uniform rates for v2/v3 and the batch-subset rule."""

from __future__ import annotations

import torch
from timm.layers import DropPath

from meddino.models import build_backbone
from meddino.models.droppath import BatchSubsetDropPath


def test_batch_subset_keeps_exact_count_and_rescales():
    torch.manual_seed(0)
    dp = BatchSubsetDropPath(0.4).train()
    residual = torch.ones(10, 3, 2)
    out = dp(residual)
    kept = (out.flatten(1).abs().sum(1) > 0).sum().item()
    assert kept == int(10 * 0.6)
    torch.testing.assert_close(out[out != 0], torch.full((kept * 6,), 10 / 6))
    assert torch.equal(dp.eval()(residual), residual)
    assert (BatchSubsetDropPath(0.99).train()(torch.ones(3, 1)) != 0).sum() == 1  # at least one sample


def test_versions_get_their_rule():
    v1 = build_backbone("dinov1_tiny", drop_path_rate=0.1)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in v1.blocks]  # timm uses Identity at rate 0
    assert rates[0] == 0.0 and abs(rates[-1] - 0.1) < 1e-6  # linear, timm's rule as in DINOv1
    v2 = build_backbone("dinov2_tiny", drop_path_rate=0.3)
    assert all(isinstance(b.drop_path1, BatchSubsetDropPath) and b.drop_path2.drop_prob == 0.3 for b in v2.blocks)
    v2_low = build_backbone("dinov2_tiny", drop_path_rate=0.1)
    assert all(type(b.drop_path1) is DropPath and b.drop_path1.drop_prob == 0.1 for b in v2_low.blocks)
    v3 = build_backbone("dinov3_tiny", drop_path_rate=0.05)
    assert all(isinstance(b.drop_path2, BatchSubsetDropPath) for b in v3.blocks)
    x = torch.randn(4, 3, 32, 32)
    v3.train()(x).sum().backward()  # trains through the custom module
