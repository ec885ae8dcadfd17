"""PCA feature maps and attention maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from meddino.models import build_backbone
from meddino.viz.pca import cls_attention_maps, fit_pca, pca_rgb


def test_fit_pca_matches_sklearn():
    from sklearn.decomposition import PCA

    x = np.random.default_rng(0).normal(size=(200, 6)) @ np.diag([5, 3, 2, 1, 0.5, 0.1])
    mean, comps = fit_pca(x, 3)
    ref = PCA(3).fit(x)
    np.testing.assert_allclose(mean, ref.mean_, atol=1e-10)
    np.testing.assert_allclose(np.abs(comps @ ref.components_.T), np.eye(3), atol=1e-8)


def _two_regions(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=16) * 3, rng.normal(size=16) * 3
    feats = rng.normal(scale=0.1, size=(8, 8, 16))
    feats[:, :4] += a
    feats[:, 4:] += b
    return feats


def test_pca_map_separates_two_regions():
    maps = pca_rgb([_two_regions(0), _two_regions(0)[::-1]])
    left, right = maps[0][:, :4].reshape(-1, 3), maps[0][:, 4:].reshape(-1, 3)
    # the first component (red) carries the region difference; the others are the noise directions
    gap = abs(left[:, 0].mean() - right[:, 0].mean())
    spread = max(left[:, 0].std(), right[:, 0].std())
    assert gap > 0.9 and gap > 20 * spread
    assert maps[0].min() >= 0 and maps[0].max() <= 1


def test_pca_background_removal_blackens_one_region():
    feats = _two_regions(1)
    fg = pca_rgb([feats], threshold=0.5)[0]
    bg = pca_rgb([feats], threshold=0.5, invert_foreground=True)[0]
    black_fg = (fg.reshape(-1, 3).sum(1) == 0).reshape(8, 8)
    black_bg = (bg.reshape(-1, 3).sum(1) == 0).reshape(8, 8)
    # one half is black in each, and they are complementary
    assert black_fg.sum() == 32 and black_bg.sum() == 32
    assert not (black_fg & black_bg).any()
    assert black_fg[:, :4].all() or black_fg[:, 4:].all()


@pytest.mark.parametrize("arch", ["dinov2_tiny_reg", "dinov3_tiny"])
def test_cls_attention_matches_timm_unfused_attention(arch):
    torch.manual_seed(0)
    backbone = build_backbone(arch).eval()
    x = torch.randn(2, 3, 32, 32)
    captured = {}
    last = backbone.blocks[-1].attn
    last.fused_attn = False
    handle = last.attn_drop.register_forward_hook(lambda m, i, o: captured.setdefault("w", i[0]))
    with torch.no_grad():
        backbone.forward_features(x)
    handle.remove()
    ref = captured["w"][:, :, 0, backbone.num_prefix_tokens :].reshape(2, -1, 4, 4)
    torch.testing.assert_close(cls_attention_maps(backbone, x), ref, atol=1e-6, rtol=1e-5)


def test_viz_pca_cli(tmp_path, cli):
    rng = np.random.default_rng(0)
    for i in range(2):
        img = np.zeros((40, 40, 3), np.uint8)
        img[:, :20] = (200, 30, 30)
        img[:, 20:] = rng.integers(0, 255, (40, 20, 3))
        Image.fromarray(img).save(tmp_path / f"im{i}.png")
    res = cli("viz", "pca", tmp_path / "im0.png", tmp_path / "im1.png",
              "backbones=[random:dinov2_tiny, random:dinov3_tiny]", f"out={tmp_path / 'viz'}", "img_size=32",
              "threshold=0.4")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "viz" / "pca.png").stat().st_size > 1000
    assert (tmp_path / "viz" / "attention.png").is_file()
    bad = cli("viz", "pca", tmp_path / "missing.png", "backbones=[random:dinov2_tiny]", f"out={tmp_path / 'v2'}")
    assert bad.returncode == 2 and "image not found" in bad.stderr
