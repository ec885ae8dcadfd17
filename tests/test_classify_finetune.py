"""Trainable protocols: LoRA and BitFit really train (and only) their parameters on every DINO version (LoRA on
DINOv3's Eva attention included), the gradient check that stops a run whose trainable tensors get no gradient,
layer-wise lr decay, the schedule, and the best-validation weights kept as a real copy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from meddino.models import build_backbone
from meddino.tasks.classify import finetune as ft
from meddino.tasks.classify.config import FinetuneConfig
from meddino.tasks.classify.embed import ImageDataset
from meddino.tasks.classify.finetune import Classifier, configure, layer_id, lr_factor, param_groups


ARCHS = ("dinov1_tiny", "dinov2_tiny", "dinov3_tiny")  # timm VisionTransformer (v1, v2) and Eva (v3)


def _model(mode: str, arch: str = "dinov2_tiny", **kw) -> tuple[Classifier, FinetuneConfig]:
    torch.manual_seed(0)
    fc = FinetuneConfig(mode=mode, lora_r=4, lora_alpha=8, **kw)
    model = Classifier(build_backbone(arch), 3)
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


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_with_b_zero_computes_the_base_model(arch):
    """The adapters (and, on DINOv3, routing qkv through its module) leave the forward unchanged at init."""
    torch.manual_seed(0)
    base = Classifier(build_backbone(arch), 3).eval()
    model = copy.deepcopy(base)  # the same backbone and head weights
    configure(model, "lora", FinetuneConfig(mode="lora", lora_r=4, lora_alpha=8))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert all(not p.any() for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)


def test_lora_qkv_adapters_get_gradients_on_dinov3():
    """timm's Eva attention reads qkv.weight with F.linear; without the fix the qkv adapters got no gradient."""
    model, _ = _model("lora", "dinov3_tiny")
    attns = [b.attn for b in model.backbone.vit.blocks]
    assert all(a.q_bias is not None and a.qkv_bias_separate for a in attns)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _steps(model, 2)
    qkv = [n for n, _ in model.named_parameters() if ".attn.qkv.lora_" in n]
    assert len(qkv) == 4 * 2  # A and B in each of the 4 blocks
    lora = {n for n, _ in model.named_parameters() if "lora_" in n}
    _check_only(model, before, lora | {"head.weight", "head.bias"})  # qkv A/B: non-zero gradient and moved


def _images(root, n: int = 8) -> tuple[ImageDataset, torch.Tensor]:
    paths = []
    for i in range(n):
        paths.append(root / f"{i}.png")
        Image.fromarray(np.full((32, 32, 3), 40 + 25 * i, dtype=np.uint8)).save(paths[-1])
    return ImageDataset(paths, 32, (0.5,) * 3, (0.25,) * 3), torch.tensor([i % 3 for i in range(n)])


@pytest.mark.parametrize("mode", ["full", "lora", "bitfit"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_mode_passes_the_gradient_check_and_trains_every_trainable_tensor(tmp_path, arch, mode):
    model, fc = _model(mode, arch, epochs=1, schedule="constant", hflip=0.0)
    ds, y = _images(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    info = ft.train_model(model, ds, y, ds, y, "multiclass", fc, 1e-3, 4, torch.device("cpu"), seed=0)
    n = len(before)
    check = info["gradient_check"]
    assert check["trainable_tensors"] == check["tensors_with_grad"] == n
    if mode == "lora":  # every A waits for its B to leave zero: it gets its gradient after the first step
        assert check["with_grad_first_backward"] == n - sum("lora_A" in k for k in before)
    else:
        assert check["with_grad_first_backward"] == n
    assert not model.backbone.mask_token.requires_grad  # no mode can give it a gradient: frozen
    for name, p in model.named_parameters():
        if name in before:
            assert not torch.equal(p.detach(), before[name]), f"{arch} {mode}: {name} did not train"


def test_gradient_check_passes_a_branch_that_drop_path_dropped_for_the_whole_batch(tmp_path):
    """Stochastic depth may drop a residual branch for every sample of a batch: no gradient in that backward,
    which the eval-mode re-check after the step tells apart from a tensor that never reaches the loss."""
    torch.manual_seed(0)
    model = Classifier(build_backbone("dinov1_tiny", drop_path_rate=0.9), 3)
    configure(model, "full", FinetuneConfig(mode="full"))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    x, y = torch.randn(1, 3, 32, 32), torch.tensor([1])
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    check = ft.check_gradients(model, named, x, y, "multiclass", torch.device("cpu"), "full")
    assert check["with_grad_first_backward"] < check["tensors_with_grad"] == check["trainable_tensors"] == len(named)
    assert model.training


def _refused_finetune(tmp_path, capsys, backbone: str) -> str:
    from test_classify_cli import make_dataset

    from meddino.cli import main

    manifest = make_dataset(tmp_path / "data")
    code = main(["eval", "finetune", "--config", "finetune_tiny", f"data.manifest={manifest}",
                 f"backbone={backbone}", f"out={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("meddino: error: eval finetune (mode=lora): "), lines[0]
    return lines[0]


def test_gradient_check_stops_a_run_whose_trainable_tensor_gets_no_gradient(tmp_path, capsys, monkeypatch):
    build = ft.build_model

    def with_an_unused_tensor(*args, **kwargs):
        model = build(*args, **kwargs)
        model.head.unused = torch.nn.Parameter(torch.ones(3, device=model.head.weight.device))  # never in forward
        return model

    monkeypatch.setattr(ft, "build_model", with_an_unused_tensor)
    line = _refused_finetune(tmp_path, capsys, "random:dinov2_tiny")
    assert "1 of " in line and "received no gradient in the first step" in line
    assert line.endswith(": head.unused")


def test_gradient_check_catches_the_dinov3_qkv_adapters_without_the_fix(tmp_path, capsys, monkeypatch):
    """The bug itself: undo the qkv routing and the check names the qkv adapters (and counts the rest)."""
    monkeypatch.setattr(ft, "route_qkv_through_module", lambda target: 0)
    line = _refused_finetune(tmp_path, capsys, "random:dinov3_tiny")
    assert "8 of 26 trainable tensors received no gradient in the first step" in line
    assert "backbone.vit.blocks.0.attn.qkv.lora_A.default.weight" in line and "and 4 more" in line
    assert ".mlp." not in line


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
    assert res["trainable_params"] == res["hyperparameters"]["trainable_params"] > 0
    assert res["tensors_with_grad"] == res["trainable_tensors"] > 0
    assert all(u["gradient_check"]["tensors_with_grad"] == res["trainable_tensors"] for u in res["units"])
    best = min(res["sweep"], key=lambda s: s["mean_val_loss"])
    assert res["hyperparameters"]["lr"] == best["lr"]
    with open(tmp_path / "run/predictions/finetune.csv", newline="") as fh:
        preds = list(csv.DictReader(fh))
    assert sorted(r["image"] for r in preds) == sorted(r["image"] for r in rows)  # each sample tested once
    for r in preds:
        assert r["unit"] == f"fold{r['fold']}"


def _swiglu_v3() -> Classifier:
    """A tiny DINOv3 "plus" backbone: timm Eva with a SwiGLU MLP (fc1_g, fc1_x, fc2)."""
    from meddino.models.factory import build_from_timm

    torch.manual_seed(0)
    kwargs = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32)
    return Classifier(build_from_timm("vit_small_plus_patch16_dinov3_qkvb", "v3", kwargs), 3)


def test_lora_fc1_on_a_swiglu_mlp_adapts_both_of_its_first_layers():
    model = _swiglu_v3()
    names = {n for n, _ in model.named_modules()}
    assert any(n.endswith("mlp.fc1_g") for n in names) and not any(n.endswith("mlp.fc1") for n in names)
    configure(model, "lora", FinetuneConfig(mode="lora", lora_r=4, lora_alpha=8))  # the seed's [qkv, fc1, fc2]
    assert model.lora_modules == ["qkv", "fc1_g", "fc1_x", "fc2"]
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"qkv", "fc1_g", "fc1_x", "fc2"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _steps(model, 2)
    lora = {n for n, _ in model.named_parameters() if "lora_" in n}
    _check_only(model, before, lora | {"head.weight", "head.bias"})


def test_a_lora_target_that_matches_no_layer_is_one_config_error():
    from meddino.errors import ConfigError

    model = Classifier(build_backbone("dinov2_tiny"), 3)
    with pytest.raises(ConfigError, match=r"finetune.lora_targets: 'proj_out' matches no Linear layer of the "
                                          r"backbone \(its Linear layers end in: fc1, fc2, proj, qkv\)"):
        configure(model, "lora", FinetuneConfig(mode="lora", lora_targets=["qkv", "proj_out"]))
