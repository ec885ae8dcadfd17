"""Position-embedding resampling: each DINO version's official formula, the default per version, resample once.

The references are written here from the formulas of the official code (facebookresearch/dino and dinov2
``interpolate_pos_encoding``): bicubic with ``scale_factor = (h + 0.1) / sqrt(N)`` and no antialias for
v1/v2, bicubic to the exact size with antialias for the hub's ``*_reg`` models.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from meddino.errors import ConfigError
from meddino.models import build_backbone, export_backbone, load_backbone, resolve_backbone
from meddino.models.pos_embed import POS_EMBED_MODES, resample_pos_embed

V2 = dict(patch_size=14, embed_dim=32, depth=1, num_heads=2, num_classes=0)


def official_offset(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINOv1 / DINOv2 training: scale factor (grid + 0.1) / sqrt(N), bicubic, no antialias."""
    n, dim = pos.shape[1], pos.shape[2]
    m = math.sqrt(n)
    grid = pos.reshape(1, int(m), int(m), dim).permute(0, 3, 1, 2)
    out = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic")
    assert out.shape[-2:] == (h, w)
    return out.permute(0, 2, 3, 1).reshape(1, h * w, dim)


def official_reg(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINOv2 hub *_reg models: interpolate_offset=0 (exact size), antialias=True."""
    n, dim = pos.shape[1], pos.shape[2]
    m = int(math.sqrt(n))
    grid = pos.reshape(1, m, m, dim).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
    return out.permute(0, 2, 3, 1).reshape(1, h * w, dim)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def smooth_pos(side: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """A smooth random field, like trained position embeddings (and unlike white noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, dim, 5, 5, generator=g)
    field = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=True)
    return field.permute(0, 2, 3, 1).reshape(1, side * side, dim)


def _features(backbone, x):
    out = backbone.eval().forward_features(x)
    regs = out.get("registers")
    return torch.cat([out["cls"][:, None]] + ([regs] if regs is not None else []) + [out["patch"]], dim=1)


# ------------------------------------------------------------------------------------ the pure function


@pytest.mark.parametrize("old,new", [(16, (7, 7)), (14, (6, 6)), (37, (16, 16)), (37, (7, 7)), (4, (6, 6)), (16, (7, 9))])
@pytest.mark.parametrize("mode", ["dinov1", "dinov2"])
def test_offset_modes_follow_the_official_formula(old, new, mode):
    pos = torch.randn(1, old * old, 8)
    got = resample_pos_embed(pos, new, mode)
    torch.testing.assert_close(got, official_offset(pos, *new), atol=0, rtol=0)
    plain = F.interpolate(pos.reshape(1, old, old, 8).permute(0, 3, 1, 2), size=new, mode="bicubic")
    assert rel_l2(got, plain.permute(0, 2, 3, 1).reshape(1, -1, 8)) > 1e-3  # the offset matters


@pytest.mark.parametrize("mode", POS_EMBED_MODES)
def test_identity_when_the_grid_matches(mode):
    pos = torch.randn(1, 16, 8)
    assert resample_pos_embed(pos, (4, 4), mode) is pos


@pytest.mark.parametrize("old,new", [(37, (16, 16)), (16, (7, 7)), (37, (7, 7)), (4, (6, 6))])
def test_reg_mode_is_the_hub_formula_and_equals_timm(old, new):
    from timm.layers import resample_abs_pos_embed

    pos = smooth_pos(old)
    reg = resample_pos_embed(pos, new, "dinov2_reg")
    torch.testing.assert_close(reg, official_reg(pos, *new), atol=1e-6, rtol=0)
    torch.testing.assert_close(resample_pos_embed(pos, new, "timm"), reg, atol=1e-6, rtol=0)
    timm_ref = resample_abs_pos_embed(pos, new_size=list(new), num_prefix_tokens=0)
    torch.testing.assert_close(reg, timm_ref, atol=1e-6, rtol=0)
    if new[0] < old:  # downsampling (local crops, 518 -> 224): timm's formula is not the training one
        assert rel_l2(timm_ref, resample_pos_embed(pos, new, "dinov2")) > 0.01


def test_dtype_is_kept_and_unknown_modes_refused():
    pos = torch.randn(1, 256, 8).to(torch.bfloat16)
    out = resample_pos_embed(pos, (7, 7), "dinov2")
    assert out.dtype == torch.bfloat16 and out.shape == (1, 49, 8)
    torch.testing.assert_close(out.float(), official_offset(pos.float(), 7, 7).bfloat16().float())
    with pytest.raises(ConfigError, match="unknown mode 'bilinear'"):
        resample_pos_embed(pos, (7, 7), "bilinear")


# ------------------------------------------------------------------------------------- defaults, records


def test_default_mode_per_version_and_overrides():
    assert build_backbone("dinov1_tiny").pos_embed_resample == "dinov1"
    assert build_backbone("dinov2_tiny").pos_embed_resample == "dinov2"
    # a fresh register model trains as DINOv2's training code does (interpolate_offset=0.1)
    assert build_backbone("dinov2_tiny_reg").pos_embed_resample == "dinov2"
    v3 = build_backbone("dinov3_tiny")
    assert v3.pos_embed_resample is None and "pos_embed_resample" not in v3.arch["kwargs"]
    b = build_backbone("dinov2_tiny", pos_embed_resample="timm")
    assert b.pos_embed_resample == "timm" and b.arch["kwargs"]["pos_embed_resample"] == "timm"
    assert resolve_backbone("random:dinov1_tiny", pos_embed_resample="dinov2").pos_embed_resample == "dinov2"
    with pytest.raises(ConfigError, match="unknown mode"):
        build_backbone("dinov2_tiny", pos_embed_resample="nearest")
    with pytest.raises(ConfigError, match="RoPE"):
        build_backbone("dinov3_tiny", pos_embed_resample="dinov2")
    b.pos_embed_resample = "dinov2_reg"  # the setter re-records it
    assert b.vit.pos_embed_resample == "dinov2_reg" and b.arch["kwargs"]["pos_embed_resample"] == "dinov2_reg"


def _timm_checkpoint(tmp_path, name: str, img_size: int, seed: int = 0):
    torch.manual_seed(seed)
    ref = timm.create_model(name, pretrained=False, img_size=img_size, **V2).eval()
    with torch.no_grad():
        ref.pos_embed.copy_(torch.randn_like(ref.pos_embed))
    path = tmp_path / f"{name}_{img_size}.safetensors"
    save_file(ref.state_dict(), str(path))
    return ref, path


def test_default_mode_of_loaded_checkpoints(tmp_path):
    _, hub_reg = _timm_checkpoint(tmp_path, "vit_small_patch14_reg4_dinov2", 518)
    _, seed_reg = _timm_checkpoint(tmp_path, "vit_small_patch14_reg4_dinov2", 224)
    _, hub = _timm_checkpoint(tmp_path, "vit_small_patch14_dinov2", 518)
    assert load_backbone(hub_reg).pos_embed_resample == "dinov2_reg"  # released *_reg: the hub's setting
    assert load_backbone(seed_reg).pos_embed_resample == "dinov2"  # trained by the official training code
    assert load_backbone(hub).pos_embed_resample == "dinov2"
    assert load_backbone(hub_reg, pos_embed_resample="dinov2").pos_embed_resample == "dinov2"
    v1 = tmp_path / "v1.safetensors"
    save_file(timm.create_model("vit_small_patch16_224", pretrained=False, **{**V2, "patch_size": 16}).state_dict(),
              str(v1))
    assert load_backbone(v1).pos_embed_resample == "dinov1"


@pytest.mark.parametrize("mode", ["dinov2_reg", None])
def test_export_records_and_reproduces_the_mode(tmp_path, mode):
    backbone = build_backbone("dinov2_tiny_reg", pos_embed_resample=mode).eval()
    with torch.no_grad():
        backbone.vit.pos_embed.normal_()
    path = export_backbone(backbone, tmp_path / "exported")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["pos_embed_resample"] == (mode or "dinov2")
    assert "pos_embed_resample" not in meta["timm_kwargs"]
    timm.create_model(meta["timm_name"], pretrained=False, num_classes=0, **meta["timm_kwargs"])  # plain timm builds
    again = load_backbone(path)
    assert again.pos_embed_resample == (mode or "dinov2")
    x = torch.randn(2, 3, 56, 56)  # grid 7 from the stored 4
    torch.testing.assert_close(_features(again, x), _features(backbone, x), atol=0, rtol=0)
    # an export written before the mode was recorded gets the version's default
    meta.pop("pos_embed_resample")
    path.with_suffix(".json").write_text(json.dumps(meta))
    assert load_backbone(path).pos_embed_resample == "dinov2"


# --------------------------------------------------------------------------------------- the forward pass


@pytest.mark.parametrize("arch", ["dinov1_tiny", "dinov2_tiny_reg"])
def test_timm_mode_equals_timm_dynamic_img_size(arch):
    """The hook keeps timm's token layout: in mode timm it is timm's own dynamic resampling, exactly."""
    backbone = build_backbone(arch, pos_embed_resample="timm").eval()
    with torch.no_grad():
        backbone.vit.pos_embed.normal_()
    meta = backbone.arch
    plain = timm.create_model(meta["timm_name"], pretrained=False, num_classes=0, dynamic_img_size=True,
                              **{k: v for k, v in meta["kwargs"].items() if k != "pos_embed_resample"}).eval()
    plain.load_state_dict(backbone.vit.state_dict())
    x = torch.randn(2, 3, 24, 40)
    torch.testing.assert_close(_features(backbone, x), plain.forward_features(x), atol=1e-6, rtol=0)
    backbone.pos_embed_resample = "dinov1"
    assert rel_l2(_features(backbone, x), plain.forward_features(x)) > 1e-4


@pytest.mark.parametrize("name,mode,reference", [
    ("vit_small_patch14_dinov2", "dinov2", official_offset),
    ("vit_small_patch14_reg4_dinov2", "dinov2_reg", official_reg),
])
def test_518_checkpoint_resamples_once_from_the_stored_grid(tmp_path, name, mode, reference):
    """Loaded as pretraining does (img_size = global crop 224), a 98 px crop resamples 37 x 37 -> 7 x 7."""
    ref518, path = _timm_checkpoint(tmp_path, name, 518)
    backbone = resolve_backbone(str(path), img_size=224)
    assert backbone.pos_embed_resample == mode
    assert backbone.vit.pos_embed.shape == ref518.pos_embed.shape  # stored grid kept
    assert backbone.load_report.kept_pos_embed_grid == (37, 37)
    prefix = 0 if ref518.no_embed_class else 1
    stored = ref518.pos_embed.detach()
    for size, side in ((98, 7), (224, 16)):
        direct = timm.create_model(name, pretrained=False, img_size=size, dynamic_img_size=False, **V2).eval()
        state = dict(ref518.state_dict())
        state["pos_embed"] = torch.cat([stored[:, :prefix], reference(stored[:, prefix:], side, side)], dim=1)
        direct.load_state_dict(state)
        x = torch.randn(2, 3, size, size)
        torch.testing.assert_close(_features(backbone, x), direct.forward_features(x), atol=1e-5, rtol=0)
    # and not 518 -> 224 -> 98
    twice = reference(reference(stored[:, prefix:], 16, 16), 7, 7)
    assert rel_l2(twice, reference(stored[:, prefix:], 7, 7)) > 1e-3
    # the stored parameter is what trains
    backbone.train()
    backbone.forward_features(torch.randn(2, 3, 98, 98))["patch"].square().mean().backward()
    grad = backbone.vit.pos_embed.grad
    assert grad is not None and grad.shape[1] == stored.shape[1] and (grad[:, prefix:].abs() > 0).float().mean() > 0.5


def test_resize_at_load_resamples_once_in_the_mode(tmp_path):
    ref518, path = _timm_checkpoint(tmp_path, "vit_small_patch14_dinov2", 518)
    backbone = load_backbone(path, img_size=224, resize_pos_embed=True)
    assert backbone.load_report.resampled_pos_embed == (16, 16)
    stored = ref518.pos_embed.detach()
    want = torch.cat([stored[:, :1], official_offset(stored[:, 1:], 16, 16)], dim=1)
    torch.testing.assert_close(backbone.vit.pos_embed.detach(), want, atol=1e-6, rtol=0)
    # equal to keeping the stored grid, at the resized grid
    kept = load_backbone(path, img_size=224)
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(_features(backbone, x), _features(kept, x), atol=1e-5, rtol=0)


def test_copies_resample_their_own_parameter():
    """The teacher is a deepcopy of the student: its hook must read its own position embeddings."""
    student = build_backbone("dinov2_tiny").eval()
    teacher = copy.deepcopy(student)
    assert teacher.vit._pos_embed.args[0] is teacher.vit
    with torch.no_grad():
        teacher.vit.pos_embed.add_(1.0)
    x = torch.randn(1, 3, 16, 16)  # grid 2 from the stored 4
    assert not torch.allclose(_features(teacher, x), _features(student, x))
