"""Heads, EMA teacher, schedules, parameter groups, gradient clipping and freeze-last-layer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

from meddino.errors import ConfigError
from meddino.ssl import (
    DINOHead,
    cancel_last_layer_gradients,
    clip_gradients,
    cosine_schedule,
    ema_update_,
    layer_id,
    linear_warmup_then_constant,
    make_heads,
    param_groups,
    scaled_lr,
)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """numpy's assert_allclose on tensors (torch.testing's first call imports torch.distributed.tensor: slow)."""
    np.testing.assert_allclose(actual.detach().cpu().numpy(), expected.detach().cpu().numpy(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- heads


def test_dino_head_shapes_and_weight_norm_frozen_g():
    torch.manual_seed(0)
    h = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16, nlayers=3)
    x = torch.randn(5, 32)
    assert h(x).shape == (5, 100)
    g = h.last_layer.parametrizations.weight.original0
    assert g.shape == (100, 1) and torch.all(g == 1) and not g.requires_grad
    # with g = 1 each prototype (row of the effective weight) is a unit vector
    _close(h.last_layer.weight.norm(dim=1), torch.ones(100))
    # the output is the bottleneck (unit norm) times unit prototypes: cosine similarities in [-1, 1]
    z = h.forward_bottleneck(x)
    _close(z.norm(dim=1), torch.ones(5))
    _close(h(x), z @ h.last_layer.weight.t())
    assert h(x).abs().max() <= 1 + 1e-5
    # layers: Linear, GELU, Linear, GELU, Linear ; trunc-normal(0.02) weights, zero biases
    linears = [m for m in h.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 64), (64, 64), (64, 16)]
    assert sum(isinstance(m, nn.GELU) for m in h.mlp) == 2
    for m in linears:
        assert torch.all(m.bias == 0)
        # trunc_normal_(std=0.02) with the default absolute bounds [-2, 2], as the originals: ~N(0, 0.02)
        assert 0.015 < m.weight.std().item() < 0.025 and abs(m.weight.mean().item()) < 0.005


def test_dino_head_trainable_g_and_gradients():
    h = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    g = h.last_layer.parametrizations.weight.original0
    assert g.requires_grad and torch.all(g == 1)
    h(torch.randn(3, 8)).sum().backward()
    assert g.grad is not None


def test_v3_head_plain_linear_and_last_layer_identification():
    torch.manual_seed(0)
    h = DINOHead(32, 500, hidden_dim=64, bottleneck_dim=16, weight_norm_last_layer=False)
    assert type(h.last_layer) is nn.Linear and h.last_layer.bias is None
    assert not hasattr(h.last_layer, "parametrizations")
    w = h.last_layer.weight
    assert 0.018 < w.std().item() < 0.022 and abs(w.mean().item()) < 0.002
    assert [id(p) for p in h.last_layer_parameters()] == [id(w)]
    names = {n for n, _ in h.named_parameters() if "last_layer" in n}
    assert names == {"last_layer.weight"}
    wn = DINOHead(32, 50, 64, 16)
    assert {id(p) for p in wn.last_layer_parameters()} == {
        id(p) for n, p in wn.named_parameters() if n.startswith("last_layer.")
    }
    assert len(wn.last_layer_parameters()) == 2  # g and v


def test_weight_norm_head_loads_dinov1_legacy_keys():
    src = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    sd = dict(src.state_dict())
    g = sd.pop("last_layer.parametrizations.weight.original0")
    v = sd.pop("last_layer.parametrizations.weight.original1")
    sd["last_layer.weight_g"], sd["last_layer.weight_v"] = g * 3.0, v  # DINOv1 (old weight_norm) key names
    dst = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    dst.load_state_dict(sd)
    expected = 3.0 * v / v.norm(dim=1, keepdim=True)
    _close(dst.last_layer.weight, expected)


def test_single_layer_and_batchnorm_heads():
    h1 = DINOHead(8, 10, nlayers=1, bottleneck_dim=4)
    assert [type(m) for m in h1.mlp] == [nn.Linear]
    hb = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4, nlayers=2, use_bn=True)
    assert [type(m) for m in hb.mlp] == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear]
    assert hb(torch.randn(4, 8)).shape == (4, 10)


def test_make_heads_per_version():
    d1, i1 = make_heads("v1", 16, out_dim=20, hidden_dim=32, bottleneck_dim=8)
    assert i1 is None and hasattr(d1.last_layer, "parametrizations")
    d2, i2 = make_heads("v2", 16, out_dim=20, hidden_dim=32, bottleneck_dim=8)
    assert i2 is d2
    d2s, i2s = make_heads(2, 16, out_dim=20, hidden_dim=32, bottleneck_dim=8, ibot_separate=True, ibot_out_dim=30)
    assert i2s is not d2s and i2s.out_dim == 30 and hasattr(i2s.last_layer, "parametrizations")
    d3, i3 = make_heads("v3", 16, out_dim=20, hidden_dim=32, bottleneck_dim=8)
    assert i3 is not d3 and type(d3.last_layer) is nn.Linear and type(i3.last_layer) is nn.Linear
    with pytest.raises(ConfigError):
        make_heads("v3", 16, out_dim=20, ibot_separate=False)
    with pytest.raises(ConfigError):
        make_heads("v4", 16)
    with pytest.raises(ConfigError):
        make_heads("v2", 16, out_dim=20, ibot_out_dim=30)


# ---------------------------------------------------------------- EMA


def test_ema_update_matches_formula_and_ddp_prefix():
    torch.manual_seed(0)
    student = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    teacher = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    m = 0.9
    ema_update_(teacher, student, m)
    s = dict(student.named_parameters())
    for n, p in teacher.named_parameters():
        _close(p, m * before[n] + (1 - m) * s[n].detach(), rtol=0, atol=1e-7)
        assert not p.requires_grad or p.grad is None

    class Wrapped(nn.Module):  # names like a DDP wrapper: "module.<name>"
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    t2 = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    before2 = [p.detach().clone() for p in t2.parameters()]
    ema_update_(t2, Wrapped(student), 0.5)
    for p, b, sp in zip(t2.parameters(), before2, student.parameters()):
        _close(p, 0.5 * b + 0.5 * sp.detach())
    with pytest.raises(KeyError):
        ema_update_(nn.Linear(2, 2), nn.Linear(2, 2, bias=False), 0.9)


# ---------------------------------------------------------------- schedules


def test_cosine_schedule_hand_formula_with_warmup_and_freeze():
    base, final, total, warm, freeze, start = 1.0, 0.1, 20, 4, 3, 0.05
    s = cosine_schedule(base, final, total, warmup_iters=warm, start_warmup=start, freeze_iters=freeze)
    assert len(s) == total
    expected = [0.0] * freeze
    expected += [start + (base - start) * i / (warm - 1) for i in range(warm)]
    n = total - warm - freeze
    expected += [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    np.testing.assert_allclose(np.asarray(s), expected, rtol=0, atol=1e-15)
    assert s(0) == 0.0 and s[freeze] == start and s(freeze + warm - 1) == base
    assert s(total) == final and s(10**6) == final  # past the end: final value
    plain = cosine_schedule(0.996, 1.0, 5)
    np.testing.assert_allclose(
        plain.values, [1.0 + 0.5 * (0.996 - 1.0) * (1 + math.cos(math.pi * i / 5)) for i in range(5)], atol=1e-15
    )
    with pytest.raises(ConfigError):
        cosine_schedule(1.0, 0.0, 5, warmup_iters=6)


def test_teacher_temperature_per_epoch_and_per_iteration():
    per_ep = linear_warmup_then_constant(0.04, 0.07, warmup_epochs=3, total_epochs=5, iters_per_epoch=4, per_epoch=True)
    exp = []
    for e in range(5):
        v = 0.04 + (0.07 - 0.04) * e / 2 if e < 3 else 0.07
        exp += [v] * 4
    np.testing.assert_allclose(np.asarray(per_ep), exp, atol=1e-15)
    per_it = linear_warmup_then_constant(0.04, 0.07, warmup_epochs=3, total_epochs=5, iters_per_epoch=4)
    exp = [0.04 + 0.03 * i / 11 for i in range(12)] + [0.07] * 8
    np.testing.assert_allclose(np.asarray(per_it), exp, atol=1e-15)
    assert per_it(100) == 0.07
    assert per_it(1) != per_it(2) and per_ep(1) == per_ep(2)


def test_scaled_lr_rules():
    assert scaled_lr(5e-4, 512, "linear256") == pytest.approx(1e-3)
    assert scaled_lr(4e-3, 256, "sqrt1024") == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 77, "none") == 1e-3
    with pytest.raises(ConfigError):
        scaled_lr(1e-3, 64, "cubic")


# ---------------------------------------------------------------- parameter groups


def _tiny_vit():
    return timm.create_model(
        "vit_small_patch14_dinov2", embed_dim=32, depth=3, num_heads=2, img_size=28, pretrained=False
    )


def test_param_groups_multipliers_tiny_timm_vit():
    vit = _tiny_vit()
    groups = param_groups(vit, base_lr=1e-3, weight_decay=0.04, layer_decay=0.9, patch_embed_lr_mult=0.2)
    by_name = {n: g for g in groups for n in g["names"]}
    assert set(by_name) == {n for n, _ in vit.named_parameters()}
    expect = {  # name: (lr multiplier, wd multiplier), written out by hand: 0.9 ** (L + 1 - layer id), L = 3 blocks
        "cls_token": (0.9**4, 1.0),
        "pos_embed": (0.9**4, 1.0),
        "patch_embed.proj.weight": (0.9**4 * 0.2, 1.0),
        "patch_embed.proj.bias": (0.9**4 * 0.2, 0.0),
        "blocks.0.attn.qkv.weight": (0.9**3, 1.0),
        "blocks.0.attn.qkv.bias": (0.9**3, 0.0),
        "blocks.1.ls1.gamma": (0.9**2, 0.0),
        "blocks.2.norm1.weight": (0.9**1, 0.0),
        "blocks.2.mlp.fc2.weight": (0.9**1, 1.0),
        "norm.weight": (1.0, 0.0),
        "norm.bias": (1.0, 0.0),
    }
    for name, (lr_m, wd_m) in expect.items():
        g = by_name[name]
        assert g["lr_multiplier"] == pytest.approx(lr_m, rel=1e-12), name
        assert g["wd_multiplier"] == wd_m, name
        assert g["lr"] == pytest.approx(1e-3 * lr_m) and g["weight_decay"] == pytest.approx(0.04 * wd_m)
        assert not g["is_last_layer"]
    assert len(groups) == 10  # merged: far fewer groups than parameters
    assert len(groups) < len(list(vit.parameters()))
    # the groups work as they are with AdamW
    torch.optim.AdamW(groups)


def test_param_groups_with_prefix_heads_and_frozen_params():
    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Module()
            self.backbone.vit = _tiny_vit()
            self.dino_head = DINOHead(32, 10, hidden_dim=16, bottleneck_dim=4)

    model = Student()
    groups = param_groups(model, 1.0, 1.0, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["backbone.vit.cls_token"]["lr_multiplier"] == pytest.approx(0.5**4)
    assert by_name["backbone.vit.blocks.1.attn.proj.weight"]["lr_multiplier"] == pytest.approx(0.5**2)
    assert by_name["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0
    v = "dino_head.last_layer.parametrizations.weight.original1"
    assert by_name[v]["is_last_layer"] and by_name[v]["wd_multiplier"] == 1.0
    # the frozen weight-norm g is not handed to the optimiser
    assert "dino_head.last_layer.parametrizations.weight.original0" not in by_name
    assert layer_id("backbone.blocks.0.5.attn.qkv.weight", 12) == 6  # DINOv2 chunked blocks
    assert layer_id("backbone.register_tokens", 12) == 0
    assert layer_id("dino_head.mlp.0.weight", 12) == 13


# ---------------------------------------------------------------- clipping and freezing


def _two_param_module(g1, g2):
    m = nn.Module()
    m.a = nn.Parameter(torch.zeros(len(g1), dtype=torch.float64))
    m.b = nn.Parameter(torch.zeros(len(g2), dtype=torch.float64))
    m.a.grad = torch.tensor(g1, dtype=torch.float64)
    m.b.grad = torch.tensor(g2, dtype=torch.float64)
    return m


def test_clip_gradients_per_parameter_vs_global():
    # grads of norm 5 (3-4-0) and 1: per-parameter clip to 3 scales only a; global scales both by 3/|g|
    m = _two_param_module([3.0, 4.0, 0.0], [1.0, 0.0])
    total = clip_gradients(m, 3.0, per_parameter=True)
    assert float(total) == pytest.approx(math.sqrt(26))
    np.testing.assert_allclose(m.a.grad.numpy(), np.array([3, 4, 0]) * 3 / (5 + 1e-6), rtol=1e-12)
    np.testing.assert_allclose(m.b.grad.numpy(), [1.0, 0.0])  # below the threshold: untouched
    m = _two_param_module([3.0, 4.0, 0.0], [1.0, 0.0])
    total = clip_gradients(m, 3.0, per_parameter=False)
    coef = 3 / (math.sqrt(26) + 1e-6)
    assert float(total) == pytest.approx(math.sqrt(26))
    np.testing.assert_allclose(m.a.grad.numpy(), np.array([3, 4, 0]) * coef, rtol=1e-9)
    np.testing.assert_allclose(m.b.grad.numpy(), np.array([1, 0]) * coef, rtol=1e-9)
    m = _two_param_module([3.0, 4.0, 0.0], [1.0, 0.0])
    clip_gradients(m, 0.0, per_parameter=True)  # disabled
    np.testing.assert_allclose(m.a.grad.numpy(), [3, 4, 0])


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipped, and below the threshold
def test_global_clipping_equals_torch_clip_grad_norm_bit_for_bit(max_norm):
    """The fp32 path takes the norm once; torch.nn.utils.clip_grad_norm_ is the reference."""
    torch.manual_seed(0)
    mods = [torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8)) for _ in range(2)]
    mods[1].load_state_dict(mods[0].state_dict())
    x = torch.randn(4, 16)
    for m in mods:
        m(x).pow(2).sum().backward()
    total = clip_gradients(mods[0], max_norm, per_parameter=False)
    ref = torch.nn.utils.clip_grad_norm_(mods[1].parameters(), max_norm)
    assert torch.equal(total, ref)
    for a, b in zip(mods[0].parameters(), mods[1].parameters()):
        assert torch.equal(a.grad, b.grad)
    assert (float(total) > max_norm) == (max_norm == 0.5)


def test_cancel_last_layer_gradients():
    h = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4, weight_norm_last_layer=False)
    h(torch.randn(3, 8)).sum().backward()
    cancel_last_layer_gradients(h, iteration=5, freeze_iters=5)  # freeze over
    assert h.last_layer.weight.grad is not None
    cancel_last_layer_gradients(h, iteration=4, freeze_iters=5)
    assert h.last_layer.weight.grad is None
    assert all(p.grad is not None for n, p in h.named_parameters() if "last_layer" not in n)
