"""End-to-end pretraining runs on generated images (tiny ViTs, CPU): each method, resume, corrupt files,
head warm-up, non-finite loss, the online kNN monitor."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meddino.config import load_config
from meddino.models import load_backbone
from meddino.pretrain.checkpoint import list_checkpoints, load_checkpoint
from meddino.pretrain.config import PretrainConfig
from meddino.pretrain.engine import run_pretrain
from meddino.runlog import read_metrics


def make_images(folder: Path, n: int = 16, seed: int = 0) -> Path:
    """Smooth random colour images of varying sizes (structure for the crops to agree on)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = 36 + int(rng.integers(0, 20)), 40 + int(rng.integers(0, 20))
        base = rng.random((4, 4, 3))
        img = np.kron(base, np.ones((h // 4 + 1, w // 4 + 1, 1)))[:h, :w]
        img = (255 * np.clip(img + 0.1 * rng.standard_normal((h, w, 3)), 0, 1)).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:03d}.png")
    return folder


def config(recipe: str, data: Path, out: Path, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, recipe, [f"data.path={data}", f"out={out}", *overrides], "pretrain")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("pretrain_images") / "imgs")


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("dinov1_tiny", []),
        # no init= here: Gram anchoring to the random start must now be asked for explicitly (teacher=random)
        ("dinov3_tiny", ["method.gram.enabled=true", "method.gram.refresh_every=10", "method.gram.teacher=random"]),
    ],
)
def test_method_runs(recipe, extra, images, tmp_path):
    out = tmp_path / "run"
    run_pretrain(config(recipe, images, out, "train.iterations=20", "train.checkpoint_every=10", *extra))
    rows = read_metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert rows[-1]["step"] == 20
    for key in ("lr", "wd", "momentum", "teacher_temp", "images_per_s", "skipped_files"):
        assert key in rows[-1]
    if recipe == "dinov3_tiny":
        assert {"ibot", "koleo", "gram"} <= rows[-1].keys() and rows[-1]["gram_refreshes"] == 2
    else:
        assert "ibot" not in rows[-1] and "koleo" not in rows[-1]
    its = [it for it, _ in list_checkpoints(out / "checkpoints")]
    assert its == [10, 20]
    state = load_checkpoint(out / "checkpoints" / "checkpoint_00000020.pt")
    student, teacher = state["student"], state["teacher"]
    assert student.keys() == teacher.keys()
    diff = max((student[k].float() - teacher[k].float()).abs().max().item() for k in student)
    assert diff > 1e-6, "the EMA teacher should lag behind the student"
    exported = load_backbone(out / "teacher_backbone.safetensors")
    for name, p in exported.vit.state_dict().items():
        assert torch.equal(p, teacher[f"backbone.vit.{name}"]), name
    assert (out / "checkpoints" / "teacher_backbone_00000020.safetensors").is_file()
    assert (out / "config.yaml").is_file()


@pytest.mark.slow
def test_cli_dinov2_and_corrupt_files(cli, tmp_path):
    """The real CLI on a folder with corrupt, truncated, zero-byte and 16-bit images."""
    data = make_images(tmp_path / "imgs", n=12)
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    good = (data / "img_000.png").read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "empty.jpg").write_bytes(b"")
    deep = (np.linspace(0, 60000, 40 * 48).reshape(40, 48)).astype(np.uint16)
    Image.fromarray(deep).save(data / "scan16.png")
    out = tmp_path / "run"
    res = cli("pretrain", "--config", "dinov2_tiny", f"data.path={data}", f"out={out}", "train.iterations=20",
              "train.checkpoint_every=20", "data.batch_size=4")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "skipped 3 unreadable files" in res.stderr
    rows = read_metrics(out)
    assert rows[-1]["skipped_files"] == 3 and np.isfinite(rows[-1]["loss"])
    assert {"dino", "ibot", "koleo"} <= rows[-1].keys()
    state = load_checkpoint(out / "checkpoints" / "checkpoint_00000020.pt")
    assert max((state["student"][k] - state["teacher"][k]).abs().max().item() for k in state["student"]) > 1e-6
    exported = load_backbone(out / "teacher_backbone.safetensors")
    for name, p in exported.vit.state_dict().items():
        assert torch.equal(p, state["teacher"][f"backbone.vit.{name}"]), name


@pytest.mark.parametrize("workers", [0, 2])
def test_kill_and_resume_is_bit_identical(workers, images, tmp_path):
    common = ["train.iterations=12", "train.checkpoint_every=5", f"data.num_workers={workers}"]
    straight = tmp_path / "straight"
    run_pretrain(config("dinov2_tiny", images, straight, *common))
    resumed = tmp_path / "resumed"
    run_pretrain(config("dinov2_tiny", images, resumed, *common, "train.stop_at=7"))
    assert [it for it, _ in list_checkpoints(resumed / "checkpoints")] == [5, 7]
    assert not (resumed / "teacher_backbone.safetensors").exists()
    with open(resumed / "metrics.jsonl", "a") as fh:  # as if the killed run had logged past its checkpoint
        fh.write(json.dumps({"step": 10, "loss": -1.0}) + "\n")
    run_pretrain(config("dinov2_tiny", images, resumed, *common, "resume=auto"))
    steps = [r["step"] for r in read_metrics(resumed) if "loss" in r]
    assert steps == sorted(set(steps)) and -1.0 not in [r["loss"] for r in read_metrics(resumed)]
    a = load_checkpoint(straight / "checkpoints" / "checkpoint_00000012.pt")
    b = load_checkpoint(resumed / "checkpoints" / "checkpoint_00000012.pt")
    assert _state_equal(a["student"], b["student"])
    assert _state_equal(a["teacher"], b["teacher"])
    assert torch.equal(a["center"], b["center"]) and torch.equal(a["ibot_center"], b["ibot_center"])
    # logged losses after the resume point match too
    la = {r["step"]: r["loss"] for r in read_metrics(straight)}
    lb = {r["step"]: r["loss"] for r in read_metrics(resumed)}
    assert la[10] == lb[10] and la[12] == lb[12]


def test_out_with_checkpoints_needs_resume(images, tmp_path):
    from meddino.errors import ConfigError

    out = tmp_path / "run"
    run_pretrain(config("dinov1_tiny", images, out, "train.iterations=2", "train.checkpoint_every=2"))
    with pytest.raises(ConfigError, match="resume=auto"):
        run_pretrain(config("dinov1_tiny", images, out, "train.iterations=4"))


def test_head_warmup_freezes_then_trains_backbone(images, tmp_path):
    from meddino.models import build_backbone, export_backbone

    torch.manual_seed(3)
    init = export_backbone(build_backbone("dinov2_tiny"), tmp_path / "init.safetensors")
    start = {k: v.clone() for k, v in load_backbone(init).vit.state_dict().items()}
    out = tmp_path / "run"
    run_pretrain(config(
        "dinov2_tiny", images, out, f"init={init}", "train.iterations=6", "train.checkpoint_every=1",
        "train.keep_last=10", "head_warmup.frozen_iters=3", "head_warmup.ramp_iters=2", "head_warmup.backbone_lr=1e-3",
    ))

    def backbone_at(it: int) -> dict:
        s = load_checkpoint(out / "checkpoints" / f"checkpoint_{it:08d}.pt")["student"]
        return {k.removeprefix("backbone.vit."): v for k, v in s.items() if k.startswith("backbone.vit.")}

    def head_at(it: int) -> dict:
        s = load_checkpoint(out / "checkpoints" / f"checkpoint_{it:08d}.pt")["student"]
        return {k: v for k, v in s.items() if k.startswith("dino_head.mlp")}

    def without_patch_embed(state: dict) -> dict:  # FINO (the default mode) keeps the patch embedding trainable
        return {k: v for k, v in state.items() if not k.startswith("patch_embed.")}

    for it in (1, 2, 3):  # iterations 0..2 frozen
        assert _state_equal(without_patch_embed(backbone_at(it)), without_patch_embed(start)), \
            f"backbone moved during the frozen phase (checkpoint {it})"
    assert not torch.equal(backbone_at(1)["patch_embed.proj.weight"], start["patch_embed.proj.weight"])
    assert not _state_equal(head_at(1), head_at(3)), "the heads must train during the warm-up"
    assert not _state_equal(backbone_at(4), start), "the backbone must train after the frozen phase"
    rows = read_metrics(out)
    # backbone lr: 0 while frozen, then ramps linearly to head_warmup.backbone_lr over ramp_iters
    assert all(r["backbone_lr"] == 0.0 for r in rows if r["step"] <= 3)


@pytest.mark.parametrize("mode", ["fino", "requires_grad"])
def test_head_warmup_modes_moments_and_weight_decay(images, tmp_path, mode):
    """FINO: while frozen the backbone gets gradients and AdamW moments but lr 0 and weight decay 0, so its
    weights stay exactly put; the requires_grad variant gives it no gradient and no moment at all."""
    from meddino.config import load_config
    from meddino.pretrain.config import PretrainConfig
    from meddino.pretrain.distributed import init_distributed
    from meddino.pretrain.engine import Trainer

    cfg = load_config(PretrainConfig, "dinov2_tiny", [
        f"data.path={images}", f"out={tmp_path / 'run'}", "train.iterations=6", "data.num_workers=0",
        "head_warmup.frozen_iters=3", "head_warmup.ramp_iters=2", f"head_warmup.mode={mode}"], group="pretrain")
    tr = Trainer(cfg, init_distributed("cpu"))
    tr.setup()
    from meddino.pretrain.data import CropDataset, StepBatchSampler, build_augmentation, make_loader

    ds = CropDataset(tr.source, build_augmentation(cfg, tr.mean, tr.std), cfg.train.seed)
    loader = make_loader(ds, StepBatchSampler(len(tr.source), tr.global_batch, 0, 1, 0, 0, 3), 0, pin_memory=False)
    blocks = dict(tr.student.backbone.named_parameters())
    name = next(n for n in blocks if "blocks.0" in n and n.endswith("fc1.weight"))
    before = blocks[name].detach().clone()
    for it, batch in enumerate(loader):
        tr.train_step(it, batch)
        groups = [g for g in tr.optimizer.param_groups if g["is_backbone"] and not g["is_patch_embed"]]
        assert all(g["lr"] == 0.0 for g in groups)
        patch = [g for g in tr.optimizer.param_groups if g["is_patch_embed"]]
        if mode == "fino":  # FINO: weight decay ramps with the lr; the patch embedding stays trainable
            assert all(g["weight_decay"] == 0.0 for g in groups)
            assert patch and all(g["lr"] == pytest.approx(tr.sched.lr(it) * g["lr_multiplier"]) for g in patch)
            assert it == 0 or all(g["lr"] > 0.0 for g in patch)  # lr(0) is the warm-up's 0
        else:
            assert all(g["lr"] == 0.0 for g in patch)
    p = blocks[name]
    assert torch.equal(p.detach(), before), "the frozen backbone moved"
    state = tr.optimizer.state.get(p, {})
    if mode == "fino":
        assert p.requires_grad and int(state["step"]) == 3 and state["exp_avg"].abs().sum() > 0
    else:
        assert not p.requires_grad and not state


def test_init_patch_size_mismatch_is_one_line(images, tmp_path):
    from meddino.errors import ConfigError
    from meddino.models import build_backbone, export_backbone

    init = export_backbone(build_backbone("dinov2_tiny", patch_size=4), tmp_path / "p4.safetensors")
    with pytest.raises(ConfigError, match="patch size 4"):
        run_pretrain(config("dinov2_tiny", images, tmp_path / "run", f"init={init}", "train.iterations=2"))


def test_init_of_another_dino_version_is_refused(images, tmp_path):
    """dinov2_tiny continued from a DINOv1 export would train a v1 backbone under a v2 config: refused, naming
    the file, the version found and the version asked for."""
    from meddino.errors import CheckpointError
    from meddino.models import build_backbone, export_backbone

    init = export_backbone(build_backbone("dinov1_tiny"), tmp_path / "v1.safetensors")
    with pytest.raises(CheckpointError, match=r"init: .*v1.safetensors holds a DINOv1 backbone but "
                                              r"model.arch=dinov2_tiny is a DINOv2 architecture"):
        run_pretrain(config("dinov2_tiny", images, tmp_path / "run", f"init={init}", "train.iterations=2"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nonfinite_loss_stops_with_one_line(images, tmp_path, capsys):
    """The CLI entry point in-process (same code path as the console script, without the import cost)."""
    from meddino.cli import main

    out = tmp_path / "run"
    code = main(["pretrain", "--config", "dinov2_tiny", f"data.path={images}", f"out={out}", "train.iterations=20",
                 "train.checkpoint_every=1", "optim.lr=1e30", "optim.freeze_last_layer_epochs=0", "optim.clip_grad=0"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("meddino: error")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "loss is nan" in lines[0] or "loss is inf" in lines[0]
    last = lines[0].rsplit("last good checkpoint: ", 1)[1].strip()
    state = load_checkpoint(Path(last))  # intact and loadable with weights_only
    assert state["iteration"] >= 1


def test_online_knn_monitor_is_logged(images, tmp_path):
    rows = []
    for i, p in enumerate(sorted(images.glob("*.png"))):
        rows.append({"image": str(p), "label": "a" if i % 2 else "b", "split": "val" if i % 4 < 2 else "train"})
    manifest = tmp_path / "monitor.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "run"
    run_pretrain(config("dinov1_tiny", images, out, "train.iterations=4", "train.checkpoint_every=4",
                        f"monitor.manifest={manifest}", "monitor.every=2", "monitor.k=3"))
    knn = [r for r in read_metrics(out) if "knn_top1" in r]
    assert [r["step"] for r in knn] == [2, 4]
    assert all(0.0 <= r["knn_top1"] <= 1.0 and r["knn_n_val"] == 8 for r in knn)
    json.dumps(knn)


def test_resume_with_another_architecture_is_one_line(tmp_path, capsys):
    """Changing the model between a run and its resume is a user mistake: one line, exit 2."""
    import numpy as np
    from PIL import Image

    from meddino.cli import main

    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / f"{i}.png")
    common = ["pretrain", "--config", "dinov1_tiny", f"data.path={data}", f"out={tmp_path / 'run'}",
              "data.batch_size=4", "train.checkpoint_every=2"]
    assert main([*common, "train.iterations=2"]) == 0
    capsys.readouterr()
    code = main([*common, "train.iterations=4", "resume=auto", "model.head.hidden_dim=96"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "resume" in err[0] and "(student)" in err[0], err
