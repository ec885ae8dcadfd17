"""The resumable, rank-sharded batch order, per-sample seeded crops, world-size independent iBOT masks, and
the optimiser groups of the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from meddino.config import load_config
from meddino.data.sources import PretrainSource, Skipped
from meddino.pretrain.config import PretrainConfig
from meddino.pretrain.data import CropDataset, StepBatchSampler, build_augmentation
from meddino.pretrain.method import iteration_masks


def test_ranks_partition_the_single_process_batch():
    one = StepBatchSampler(50, 8, 0, 1, seed=3, start=0, end=20)
    two = [StepBatchSampler(50, 8, r, 2, seed=3, start=0, end=20) for r in range(2)]
    for it, (b1, b2a, b2b) in enumerate(zip(one, two[0], two[1])):
        assert b1 == b2a + b2b, it
        assert [k[1] for k in b1] == list(range(8))  # slots


def test_epochs_are_permutations_and_resume_mid_epoch():
    n, gb = 30, 8  # 3 full batches per epoch, 6 samples dropped
    s = StepBatchSampler(n, gb, 0, 1, seed=0, start=0, end=9)
    batches = list(s)
    for epoch in range(3):
        idx = [k[3] for b in batches[3 * epoch : 3 * epoch + 3] for k in b]
        assert len(set(idx)) == 24 and all(k[0] == epoch for b in batches[3 * epoch : 3 * epoch + 3] for k in b)
    assert [k[3] for k in batches[0]] != [k[3] for k in batches[3]]  # a new order each epoch
    resumed = list(StepBatchSampler(n, gb, 0, 1, seed=0, start=4, end=9))
    assert resumed == batches[4:]
    other_seed = list(StepBatchSampler(n, gb, 0, 1, seed=1, start=0, end=1))
    assert other_seed[0] != batches[0]


def test_too_little_data_is_one_line():
    from meddino.errors import DataError

    with pytest.raises(DataError, match="global batch"):
        StepBatchSampler(5, 8, 0, 1, 0, 0, 1)


def _cfg(recipe: str, data, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, recipe, [f"data.path={data}", *extra], "pretrain")


def test_crops_are_a_function_of_seed_epoch_position(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((40, 44, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    cfg = _cfg("dinov2_tiny", tmp_path)
    src = PretrainSource(tmp_path)
    ds = CropDataset(src, build_augmentation(cfg, (0.5,) * 3, (0.25,) * 3), seed=0)
    good = [i for i in range(len(src)) if not src.describe(i)["path"].endswith("bad.png")][0]
    a = ds[(0, 3, 7, good)]
    b = ds[(0, 5, 7, good)]
    c = ds[(0, 3, 8, good)]
    assert a["global"].shape == (2, 3, 32, 32) and a["local"].shape == (2, 3, 16, 16)
    assert torch.equal(a["global"], b["global"]) and torch.equal(a["local"], b["local"])
    assert a["slot"] == 3 and b["slot"] == 5
    assert not torch.equal(a["global"], c["global"])
    bad = [i for i in range(len(src)) if src.describe(i)["path"].endswith("bad.png")][0]
    skipped = ds[(0, 0, 0, bad)]
    assert isinstance(skipped, Skipped) and skipped.path.startswith(f"#{bad} ")


def test_ibot_masks_do_not_depend_on_the_number_of_processes(tmp_path):
    cfg = _cfg("dinov2_tiny", tmp_path, "train.seed=5")
    full = iteration_masks(cfg, 3, 8, torch.arange(8), (4, 4))
    r0 = iteration_masks(cfg, 3, 8, torch.arange(0, 4), (4, 4))
    r1 = iteration_masks(cfg, 3, 8, torch.arange(4, 8), (4, 4))
    assert full.shape == (16, 16)
    f = full.view(2, 8, 16)
    assert torch.equal(r0.view(2, 4, 16), f[:, :4]) and torch.equal(r1.view(2, 4, 16), f[:, 4:])
    v3 = iteration_masks(_cfg("dinov3_tiny", tmp_path), 3, 8, torch.arange(8), (4, 4))
    assert int(v3.any(dim=1).sum()) == 8  # half of the 2B global crops carry a mask (v3: exact counts)
    assert not torch.equal(full, iteration_masks(cfg, 4, 8, torch.arange(8), (4, 4)))
    # a skipped sample drops its own rows only
    some = iteration_masks(cfg, 3, 8, torch.tensor([0, 2, 5]), (4, 4))
    assert torch.equal(some.view(2, 3, 16), f[:, [0, 2, 5]])
    assert iteration_masks(_cfg("dinov1_tiny", tmp_path), 3, 8, torch.arange(8), (4, 4)) is None


def test_param_groups_layer_decay_and_backbone_flag(tmp_path):
    from meddino.models import build_backbone
    from meddino.pretrain.engine import Trainer
    from meddino.pretrain.distributed import DistEnv

    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray((rng.random((36, 36, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    cfg = _cfg("dinov2_tiny", tmp_path, f"out={tmp_path / 'out'}", "optim.layer_decay=0.5",
               "optim.patch_embed_lr_mult=0.2")
    t = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    t.setup()
    depth = build_backbone("dinov2_tiny").depth
    by_param = {}
    for g in t.optimizer.param_groups:
        for p in g["params"]:
            by_param[id(p)] = g
    named = dict(t.student.named_parameters())
    pe = by_param[id(named["backbone.vit.patch_embed.proj.weight"])]
    assert pe["is_backbone"] and pe["lr_multiplier"] == pytest.approx(0.5 ** (depth + 1) * 0.2)
    b0 = by_param[id(named["backbone.vit.blocks.0.mlp.fc1.weight"])]
    assert b0["lr_multiplier"] == pytest.approx(0.5 ** depth) and b0["wd_multiplier"] == 1.0
    bias = by_param[id(named["backbone.vit.blocks.0.mlp.fc1.bias"])]
    assert bias["wd_multiplier"] == 0.0
    head = by_param[id(named["dino_head.mlp.0.weight"])]
    assert not head["is_backbone"] and head["lr_multiplier"] == 1.0
    last = [g for g in t.optimizer.param_groups if g["is_last_layer"]]
    assert last and all(not g["is_backbone"] for g in last)
    # v2/v3 freeze the prototypes with a zero lr during freeze_last_layer
    t._apply_schedules(0)
    assert all(g["lr"] == 0.0 for g in last)


def test_data_kind_selects_one_kind(tmp_path):
    from meddino.errors import DataError
    from meddino.pretrain.data import build_source

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    assert len(build_source(_cfg("dinov1_tiny", tmp_path))) == 3
    assert len(build_source(_cfg("dinov1_tiny", tmp_path, "data.kind=image"))) == 3
    with pytest.raises(DataError, match="data.kind=video"):
        build_source(_cfg("dinov1_tiny", tmp_path, "data.kind=video"))
