"""Trainable protocols: LoRA and BitFit really train (and only) their parameters, layer-wise lr decay, the
schedule, and the best-validation weights kept as a real copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from meddino.models import build_backbone
from meddino.tasks.classify import finetune as ft
from meddino.tasks.classify.config import FinetuneConfig
from meddino.tasks.classify.embed import ImageDataset
from meddino.tasks.classify.finetune import Classifier, configure, layer_id, lr_factor, param_groups


def _model(mode: str, **kw) -> tuple[Classifier, FinetuneConfig]:
    torch.manual_seed(0)
    fc = FinetuneConfig(mode=mode, lora_r=4, lora_alpha=8, **kw)
    model = Classifier(build_backbone("dinov2_tiny"), 3)
    configure(model, mode, fc)
    return model, fc


def _steps(model: Classifier, n: int = 2) -> None:
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, 1e-2, 0.0)])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    y = torch.tensor([0, 1, 2, 0])
    model.train()
    for _ in range(n):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _check_only(model: Classifier, before: dict[str, torch.Tensor], trainable: set[str]) -> None:
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.requires_grad, name
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
            assert not torch.equal(p.detach(), before[name]), f"{name} did not change"
        else:
            assert not p.requires_grad, name
            assert p.grad is None, name
            assert torch.equal(p.detach(), before[name]), f"frozen {name} changed"


def test_lora_adapters_train_and_nothing_else():
    model, _ = _model("lora")
    names = {n for n, _ in model.named_parameters()}
    lora = {n for n in names if "lora_" in n}
    # one A and one B per targeted layer: qkv, fc1, fc2 in each of the 4 blocks
    assert len(lora) == 4 * 3 * 2
    assert all(any(f".{t}.lora_" in n for t in ("qkv", "fc1", "fc2")) for n in lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out0 = model.backbone(x)
    _steps(model, 2)  # B starts at zero, so A receives a gradient from the second step on
    _check_only(model, before, lora | {"head.weight", "head.bias"})
    with torch.no_grad():
        assert not torch.allclose(model.backbone(x), out0)  # the adapters change the features


def test_bitfit_trains_only_biases():
    model, _ = _model("bitfit")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, _ in model.named_parameters() if n.endswith("bias") or n.startswith("head.")}
    assert any(n.startswith("backbone.vit.blocks.") for n in trainable)
    _steps(model, 1)
    _check_only(model, before, trainable)


def test_lora_targets_must_exist():
    from meddino.errors import ConfigError

    with pytest.raises(ConfigError, match="lora_targets"):
        _model("lora", lora_targets=["no_such_layer"])


def test_layerwise_lr_decay_groups():
    model, _ = _model("full")
    depth = 4
    assert layer_id("backbone.vit.patch_embed.proj.weight", depth) == 0
    assert layer_id("backbone.vit.blocks.2.mlp.fc1.weight", depth) == 3
    assert layer_id("backbone.vit.norm.weight", depth) == 5
    groups = param_groups(model, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    lr_of = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["names"]}
    assert lr_of["backbone.vit.patch_embed.proj.weight"] == (0.5**5, 0.1)
    assert lr_of["backbone.vit.blocks.0.attn.qkv.weight"] == (0.5**4, 0.1)
    assert lr_of["backbone.vit.blocks.3.mlp.fc2.weight"] == (0.5**1, 0.1)
    assert lr_of["backbone.vit.blocks.3.mlp.fc2.bias"] == (0.5**1, 0.0)
    assert lr_of["backbone.vit.pos_embed"] == (0.5**5, 0.0)
    assert lr_of["head.weight"] == (1.0, 0.1)
    assert "backbone.mask_token" not in lr_of  # not used by classification: frozen


def test_lr_schedule_hand_computed():
    assert lr_factor(0, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(1, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)
    assert lr_factor(7, 10, 0, "constant") == 1.0


def test_best_validation_weights_are_a_real_copy(tmp_path, monkeypatch):
    """Scripted validation losses (best at epoch 1 of 4): the model must end with the epoch-1 weights,
    not the last ones -- what a reference to the live state dict would give."""
    paths = []
    for i in range(8):
        arr = np.full((32, 32, 3), 40 + 25 * i, dtype=np.uint8)
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    model, fc = _model("full", epochs=4, schedule="constant", hflip=0.0)
    ds = ImageDataset(paths, 32, (0.5,) * 3, (0.25,) * 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    script = iter([1.0, 0.5, 0.9, 0.8])
    monkeypatch.setattr(ft, "predict", lambda *a, **k: (next(script), np.zeros((8, 3))))
    snapshots = []
    info = ft.train_model(model, ds, y, ds, y, "multiclass", fc, 1e-3, 4, torch.device("cpu"), seed=0,
                          log=lambda **_: snapshots.append({k: v.clone() for k, v in model.state_dict().items()}))
    assert info["best_epoch"] == 1 and info["best_val_loss"] == 0.5 and len(snapshots) == 4
    final = model.state_dict()
    key = "backbone.vit.blocks.0.attn.qkv.weight"
    assert not torch.equal(snapshots[1][key], snapshots[3][key])  # training moved on after epoch 1
    for k, v in final.items():
        assert torch.equal(v, snapshots[1][k]), k


def test_seed002_style_cv_sweep(tmp_path):
    """Fixed folds + MLP head + BCE + lr sweep: every sample is tested once, the sweep choice is the lowest mean
    validation loss, and the result summarises the folds."""
    import csv
    import json

    from meddino.config import load_config
    from meddino.tasks.classify.config import ClassifyConfig

    rows = []
    for p in range(9):
        label = p % 2
        for j in range(2):
            rel = f"{p}_{j}.png"
            Image.fromarray(np.full((32, 32, 3), 60 + 120 * label + 5 * j, dtype=np.uint8)).save(tmp_path / rel)
            rows.append({"image": rel, "label": label, "patient": f"P{p}", "fold": p % 3})
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "label", "patient", "fold"])
        w.writeheader()
        w.writerows(rows)
    cfg = load_config(ClassifyConfig, "seed002_binary_cv", [
        f"data.manifest={manifest}", "backbone=random:dinov2_tiny", f"out={tmp_path / 'run'}", "data.img_size=32",
        "finetune.mode=bitfit", "finetune.lrs=[0.01,0.0001]", "finetune.batch_sizes=[8]", "finetune.epochs=1",
        "finetune.head_hidden=16",
    ], group="classify")
    assert cfg.finetune.head == "mlp" and cfg.data.scheme == "folds"
    ft.run_finetune(cfg)
    res = json.loads((tmp_path / "run/results.json").read_text())
    assert [u["name"] for u in res["units"]] == ["fold0", "fold1", "fold2"]
    assert len(res["metrics"]["auroc"]["values"]) == 3 and res["problem"] == "binary"
    assert len(res["sweep"]) == 2
    best = min(res["sweep"], key=lambda s: s["mean_val_loss"])
    assert res["hyperparameters"]["lr"] == best["lr"]
    with open(tmp_path / "run/predictions/finetune.csv", newline="") as fh:
        preds = list(csv.DictReader(fh))
    assert sorted(r["image"] for r in preds) == sorted(r["image"] for r in rows)  # each sample tested once
    for r in preds:
        assert r["unit"] == f"fold{r['fold']}"
