"""Pretraining config schema, shipped recipes, and the per-iteration schedules against written-out formulas."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from meddino.config import list_recipes, load_config
from meddino.errors import ConfigError
from meddino.pretrain.config import PretrainConfig, arch_patch_size
from meddino.pretrain.optim import Schedules


def cfg_of(recipe: str | None, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, recipe, ["data.path=/tmp/x", *overrides], "pretrain")


def test_every_shipped_recipe_validates_and_has_a_description():
    names = [n for n, _ in list_recipes()["pretrain"]]
    for required in ["dinov1_tiny", "dinov2_tiny", "dinov3_tiny", "dinov1_vits16", "dinov1_vitb16", "dinov2_vits14",
                     "dinov2_vitb14", "dinov2_vitl14", "dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16",
                     "seed000_dinov1", "seed000_dinov2", "seed000_dinov3", "seed002_medidino"]:
        assert required in names
    for name, desc in list_recipes()["pretrain"]:
        assert desc, name
        cfg = cfg_of(name)
        patch = arch_patch_size(cfg.model.arch)
        assert cfg.crops.global_size % patch == 0 and cfg.crops.local_size % patch == 0


def test_official_defaults_in_full_recipes():
    v1, v2, v3 = cfg_of("dinov1_vits16"), cfg_of("dinov2_vits14"), cfg_of("dinov3_vits16")
    assert (v1.optim.lr, v1.optim.lr_scaling, v1.optim.momentum, v1.method.centering) == (5e-4, "linear256", 0.996, "ema")
    assert v1.optim.clip_per_param and v1.optim.teacher_temp_per_epoch and not v1.method.ibot.enabled
    assert (v2.optim.lr, v2.optim.lr_scaling, v2.optim.momentum, v2.train.epoch_length) == (4e-3, "sqrt1024", 0.992, 1250)
    assert v2.method.ibot.enabled and v2.method.ibot.separate_head is False and v2.method.koleo_weight == 0.1
    assert (v2.optim.layer_decay, v2.optim.patch_embed_lr_mult, v2.crops.blur_quirk) == (0.9, 0.2, True)
    assert v3.method.centering == "sinkhorn" and v3.method.ibot.separate_head is True
    l14 = cfg_of("dinov2_vitl14")
    assert (l14.model.head.out_dim, l14.model.head.bottleneck_dim, l14.method.centering) == (131072, 384, "sinkhorn")
    medi = cfg_of("seed002_medidino")
    assert (medi.optim.lr, medi.optim.momentum, medi.model.drop_path, medi.method.centering) == (2e-4, 0.994, 0.4, "sinkhorn")
    assert (medi.optim.teacher_temp_start, medi.optim.teacher_temp, medi.optim.teacher_temp_warmup_epochs) == (0.04, 0.07, 30)
    s2 = cfg_of("seed000_dinov2")
    assert (s2.model.arch, s2.crops.global_size, s2.crops.local_size) == ("dinov2_vits14_reg4", 336, 98)


def test_version_defaults_fill_missing_keys():
    c = load_config(PretrainConfig, None, ["method.version=v3", "model.arch=dinov3_tiny", "crops.global_size=32",
                                           "crops.local_size=16"])
    assert c.method.centering == "sinkhorn" and c.method.koleo_weight == 0.1 and c.method.ibot.enabled
    assert c.crops.global_scale == (0.32, 1.0) and c.optim.lr_scaling == "sqrt1024"
    c1 = load_config(PretrainConfig, None, ["method.version=v1", "model.arch=dinov1_tiny", "crops.global_size=32",
                                            "crops.local_size=16"])
    assert c1.method.centering == "ema" and c1.method.koleo_weight == 0.0 and not c1.method.ibot.enabled
    assert c1.crops.global_scale == (0.4, 1.0) and c1.optim.clip_per_param


@pytest.mark.parametrize("overrides, match", [
    (["method.gram.enabled=true"], "method.gram.enabled"),
    (["method.ibot.enabled=true"], "method.ibot.enabled"),
    (["crops.global_size=36"], "crops.global_size"),
    (["monitor.every=5"], "monitor.manifest"),
    (["optim.momentum=0.9", "optim.momentum_end=0.5"], "optim.momentum_end"),
    (["train.iteration=5"], "did you mean 'train.iterations'"),
])
def test_impossible_combinations_are_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        cfg_of("dinov1_tiny", *overrides)
    assert "\n" not in str(err.value)


def test_sinkhorn_with_v1_warns_but_is_allowed():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = cfg_of("dinov1_tiny", "method.centering=sinkhorn")
    assert c.method.centering == "sinkhorn"
    assert any("sinkhorn" in str(w.message) for w in caught)


def test_v3_shared_ibot_head_refused():
    with pytest.raises(ConfigError, match="separate"):
        cfg_of("dinov3_tiny", "method.ibot.separate_head=false")


# ---------------------------------------------------------------------------------------------- schedules
def _cosine_ref(base: float, final: float, total: int, warmup: int) -> list[float]:
    out = []
    for it in range(total):
        if it < warmup:
            out.append(base * it / (warmup - 1) if warmup > 1 else base)
        else:
            i, n = it - warmup, total - warmup
            out.append(final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)))
    return out


def test_lr_uses_the_global_batch_and_the_version_rule():
    c = cfg_of("dinov1_tiny", "train.iterations=50", "train.epoch_length=10", "optim.warmup_epochs=2",
               "optim.lr=5e-4", "optim.min_lr=1e-6")
    s = Schedules(c, global_batch=512, epoch_length=10)
    base = 5e-4 * 512 / 256
    assert s.base_lr == pytest.approx(base)
    np.testing.assert_allclose([s.lr(i) for i in range(50)], _cosine_ref(base, 1e-6, 50, 20), rtol=1e-12, atol=1e-15)
    assert s.lr(10_000) == pytest.approx(1e-6)
    c2 = cfg_of("dinov2_tiny", "optim.lr=4e-3")
    s2 = Schedules(c2, global_batch=256, epoch_length=10)
    assert s2.base_lr == pytest.approx(4e-3 * math.sqrt(256 / 1024))


def test_wd_and_momentum_cosine():
    c = cfg_of("dinov2_tiny", "train.iterations=40", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4",
               "optim.momentum=0.992", "optim.momentum_end=1.0")
    s = Schedules(c, 8, 10)
    np.testing.assert_allclose([s.wd(i) for i in range(40)], _cosine_ref(0.04, 0.4, 40, 0), rtol=1e-12)
    np.testing.assert_allclose([s.momentum(i) for i in range(40)], _cosine_ref(0.992, 1.0, 40, 0), rtol=1e-12)


def test_teacher_temperature_per_epoch_v1_and_per_iteration_v2():
    c1 = cfg_of("dinov1_tiny", "train.iterations=60", "optim.teacher_temp_start=0.04", "optim.teacher_temp=0.07",
                "optim.teacher_temp_warmup_epochs=3")
    s1 = Schedules(c1, 8, 10)
    for it in range(60):
        epoch = it // 10
        want = 0.04 + (0.07 - 0.04) * epoch / 2 if epoch < 3 else 0.07  # linspace over 3 epochs
        assert s1.teacher_temp(it) == pytest.approx(want)
    c2 = cfg_of("dinov2_tiny", "train.iterations=60", "optim.teacher_temp_start=0.04", "optim.teacher_temp=0.07",
                "optim.teacher_temp_warmup_epochs=3")
    s2 = Schedules(c2, 8, 10)
    for it in range(60):
        want = 0.04 + (0.07 - 0.04) * it / 29 if it < 30 else 0.07
        assert s2.teacher_temp(it) == pytest.approx(want)


def test_freeze_last_layer_and_head_warmup_ramp():
    c = cfg_of("dinov2_tiny", "train.iterations=40", "optim.freeze_last_layer_epochs=1.5",
               "head_warmup.frozen_iters=5", "head_warmup.ramp_iters=4", "head_warmup.backbone_lr=2e-3",
               "head_warmup.mode=requires_grad")
    s = Schedules(c, 8, 10)
    assert s.freeze_last_layer_iters == 15
    got = [s.backbone_lr_at(i) for i in range(12)]
    assert got[:5] == [0.0] * 5
    np.testing.assert_allclose(got[5:9], [2e-3 * k / 4 for k in (1, 2, 3, 4)])
    assert got[9:] == [2e-3] * 3
    assert [s.backbone_wd_factor(i) for i in range(12)] == [1.0] * 12  # requires_grad: wd untouched
    # FINO (default): the constant lr is a base lr, sqrt-scaled by the global batch like optim.lr
    # (v2: 2e-3 * sqrt(8 / 1024)), and the weight decay ramps with the lr
    f = Schedules(cfg_of("dinov2_tiny", "train.iterations=40", "head_warmup.frozen_iters=5",
                         "head_warmup.ramp_iters=4", "head_warmup.backbone_lr=2e-3"), 8, 10)
    scaled = 2e-3 * (8 / 1024) ** 0.5
    np.testing.assert_allclose([f.backbone_lr_at(i) for i in range(12)],
                               [0.0] * 5 + [scaled * k / 4 for k in (1, 2, 3, 4)] + [scaled] * 3)
    np.testing.assert_allclose([f.backbone_wd_factor(i) for i in range(12)],
                               [0.0] * 5 + [k / 4 for k in (1, 2, 3, 4)] + [1.0] * 3)
    c2 = cfg_of("dinov2_tiny", "train.iterations=40", "head_warmup.frozen_iters=3")
    s2 = Schedules(c2, 8, 10)
    assert s2.backbone_lr_at(2) == 0.0 and s2.backbone_lr_at(3) == s2.lr(3)
