"""``meddino export folder RUN`` (issue 14 section 3): a tiny pretraining run becomes a folder that timm
loads offline, by ``local-dir:`` and by ``pretrained_cfg_overlay=dict(file=...)``, giving exactly the
features meddino's own load of the run gives; meddino reads the folder as a backbone spec; the model card
says what the run's files say; mistakes are one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from meddino.cli import main
from meddino.models import build_backbone, load_backbone, resolve_backbone
from meddino.models.model_folder import FILES, write_model_folder
from meddino.runlog import RUN_MARKER, read_metrics
from test_pretrain_engine import make_images


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 6-iteration dinov2_tiny run through the CLI, with a kNN monitor and one unreadable file."""
    root = tmp_path_factory.mktemp("folder_run")
    images = make_images(root / "imgs")
    (images / "broken.png").write_bytes(b"not a png")
    manifest = root / "monitor.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "label", "split"])
        writer.writeheader()
        for i, p in enumerate(sorted(images.glob("img_*.png"))):
            writer.writerow({"image": str(p), "label": "ab"[i % 2], "split": "val" if i % 4 < 2 else "train"})
    out = root / "run"
    assert main(["pretrain", "--config", "dinov2_tiny", f"data.path={images}", f"out={out}",
                 "train.iterations=6", "train.log_every=2", "train.checkpoint_every=6",
                 f"monitor.manifest={manifest}", "monitor.every=3", "monitor.k=3"]) == 0
    return out


def _features(model, x, patches: int = 16):
    """(CLS, patch tokens) of meddino's dict or of timm's [B, prefix + patches, D] (32 px / patch 8: 16)."""
    with torch.no_grad():
        out = model.forward_features(x)
    return (out["cls"], out["patch"]) if isinstance(out, dict) else (out[:, 0], out[:, -patches:])


def test_the_run_records_its_data_and_recipe(run):
    data = json.loads((run / "data_summary.json").read_text())
    assert data["samples"] == 17 and data["by_kind"] == {"image": 17} and data["files"] == 17
    assert data["skipped_files"] == 1 and data["skipped"][0].startswith(str(run.parent / "imgs" / "broken.png"))
    assert json.loads((run / RUN_MARKER).read_text()) == {"verb": "pretrain", "complete": True,
                                                          "recipe": "dinov2_tiny"}


def test_timm_and_meddino_load_the_folder_as_meddino_loads_the_run(run, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["export", "folder", str(run), f"out={out}"]) == 0
    assert "set the license" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, RUN_MARKER])
    cfg = json.loads((out / "config.json").read_text())
    reference = load_backbone(run / "teacher_backbone.safetensors").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = _features(reference, x)
    overlay = timm.create_model("vit_small_patch14_dinov2", pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
                                patch_size=8, embed_dim=64, depth=4, num_heads=4, img_size=32, num_classes=0,
                                dynamic_img_size=True).eval()
    from_config = timm.create_model(cfg["architecture"], pretrained=True,
                                    pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=str(out / "model.safetensors")),
                                    **cfg["model_args"]).eval()
    local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    spec = resolve_backbone(str(out)).eval()  # backbone=FOLDER, as every verb takes it
    for model in (overlay, from_config, local, spec):
        got = _features(model, x)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(spec.mask_token, reference.mask_token)
    random = timm.create_model(f"local-dir:{out}", pretrained=False).eval()
    assert not torch.equal(_features(random, x)[0], want[0])  # the comparison can fail: weights matter
    data_cfg = timm.data.resolve_data_config({}, model=local)
    assert tuple(data_cfg["input_size"]) == (3, 32, 32) and tuple(data_cfg["mean"]) == tuple(reference.mean)

    # the card's own snippet, run as written (both of its create_model calls, its transform, its features)
    card = (out / "README.md").read_text()
    snippet = card.split("## Use it")[1].split("```python\n")[1].split("```")[0]
    scope = {"image": Image.fromarray(np.full((40, 48, 3), 128, np.uint8))}
    exec(snippet.replace("PATH/TO/THIS/FOLDER", str(out)), scope)
    assert torch.equal(_features(scope["model"].eval(), x)[0], want[0])
    assert tuple(scope["data_config"]["mean"]) == tuple(reference.mean)
    assert scope["features"].shape == (1, 17, 64)


def test_config_json_and_the_model_card_say_what_the_run_did(run, tmp_path):
    out = tmp_path / "card"
    assert main(["export", "folder", str(run), f"out={out}", "name=tiny-chest"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "vit_small_patch14_dinov2" and cfg["num_classes"] == 0
    assert cfg["model_args"]["embed_dim"] == 64 and cfg["model_args"]["img_size"] == 32
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [3, 32, 32] and pc["mean"] == [0.485, 0.456, 0.406] and pc["license"] is None
    meta = cfg["meddino"]
    assert meta["num_registers"] == 0 and meta["layer_norm_eps"] == 1e-6 and meta["dino_version"] == "v2"
    assert meta["iterations"] == 6 and meta["pos_embed_resample"] == "dinov2"

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] is None and front["library_name"] == "timm" and "dinov2" in front["tags"]
    assert card.splitlines()[11] == "# tiny-chest"
    rows = read_metrics(run)
    last_health = [r for r in rows if "effective_rank" in r][-1]
    knn = [r for r in rows if "knn_top1" in r]
    assert [r["step"] for r in knn] == [3, 6]
    for says in (
        "| samples | 17 |", "| &nbsp;&nbsp;images | 17 |", "| unreadable files skipped | 1 |", "broken.png",
        "| recipe (`--config`) | `dinov2_tiny` |", "| start (`init`) | random `dinov2_tiny` |",
        "DINO (CLS) + iBOT", "| iterations | 6 of 6 (`train.iterations`) |",
        f"| {knn[-1]['step']} | {knn[-1]['knn_top1']:.4f} |", "(8 images)",
        f"At the last log step (iteration {last_health['step']})",
        f"| effective rank of the CLS features | {last_health['effective_rank']:.4g} |",
        f"| teacher information (nats) | {last_health['teacher_information']:.4g} |",
        f"| prototype usage | {last_health['prototype_usage']:.4g} |",
        f"{last_health['teacher_entropy']:.4g} / {last_health['ln_k']:.4g}",
        "| registers | 0 |", "| LayerNorm eps | 1e-06 |", 'timm.create_model("local-dir:', "## License",
    ):
        assert says in card, says
    config_text = (run / "config.yaml").read_text()
    assert f"```yaml\n{config_text}```" in card  # the resolved config, whole


def test_v3_and_register_backbones_load_in_timm_too(tmp_path):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for arch, registers in (("dinov3_tiny", 4), ("dinov2_tiny_reg", 4)):
        torch.manual_seed(0)
        backbone = build_backbone(arch, img_size=32).eval()
        out = write_model_folder(backbone, tmp_path / arch)
        assert json.loads((out / "config.json").read_text())["meddino"]["num_registers"] == registers
        local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        with torch.no_grad():
            want = backbone.forward_features(x)
            got = local.forward_features(x)
        assert torch.equal(got[:, 0], want["cls"]) and torch.equal(got[:, 1 + registers:], want["patch"])
        assert "| registers | 4 |" in (out / "README.md").read_text()


def test_exports_are_byte_reproducible_and_a_second_one_needs_force(run, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["export", "folder", str(run), f"out={a}", "name=x"]) == 0
    assert main(["export", "folder", str(run), f"out={b}", "name=x"]) == 0
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    capsys.readouterr()
    assert main(["export", "folder", str(run), f"out={a}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a `meddino export folder` run" in err
    assert main(["export", "folder", str(run), f"out={a}", "--force"]) == 0


def test_export_folder_mistakes_are_one_line(run, tmp_path, capsys):
    knn = tmp_path / "knn"
    knn.mkdir()
    (knn / RUN_MARKER).write_text(json.dumps({"verb": "eval knn", "complete": True}))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / RUN_MARKER).write_text(json.dumps({"verb": "pretrain", "complete": False}))
    (tmp_path / "file").write_text("")
    cases = [
        ([str(tmp_path / "nowhere")], "run folder not found"),
        ([str(tmp_path / "file")], "is a file; give the folder `meddino pretrain` wrote"),
        ([str(knn)], "holds a `meddino eval knn` run, not a pretraining run"),
        ([str(unfinished)], "the pretraining run has not finished (no teacher_backbone.safetensors yet)"),
        ([str(run), f"out={run}"], "is the run folder itself; give the model a new folder"),
        ([str(run), f"out={knn}"], "already holds a `meddino eval knn` run"),  # out= is claimed like any verb's
    ]
    for args, says in cases:
        capsys.readouterr()
        assert main(["export", "folder", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, (args, err)
    assert not (tmp_path / "nowhere").exists() and sorted(p.name for p in knn.iterdir()) == [RUN_MARKER]
    assert not (unfinished / "model").exists()  # refused before writing: no folder left behind
