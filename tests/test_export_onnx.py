"""``meddino export onnx``: every DINO family, every segmentation head and the phase frame model, each exported
at a fixed size with a dynamic batch and compared with PyTorch by onnxruntime (here again, independently of
the verb's own check); baked position embeddings / RoPE, the refusals, and ``meddino profile`` on an .onnx."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from meddino.cli import main  # noqa: E402
from meddino.deploy.onnx import ExportForm, OnnxCheckError, bake_input_size, export_onnx  # noqa: E402
from meddino.models import build_backbone, export_backbone, load_backbone  # noqa: E402

FAMILIES = ("dinov1_tiny", "dinov2_tiny_reg", "dinov3_tiny")


def _checkpoint(tmp_path, arch: str, seed: int = 0):
    """A backbone stored at 32 px (random weights, non-zero tokens) as a meddino export."""
    torch.manual_seed(seed)
    backbone = build_backbone(arch, img_size=32)
    with torch.no_grad():
        for p in backbone.parameters():
            if p.ndim >= 1 and p.abs().sum() == 0:  # tokens start at zero: give them content
                p.normal_(0, 0.02)
    return export_backbone(backbone, tmp_path / f"{arch}.safetensors")


def _ort(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _op_types(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _export(args, capsys) -> str:
    code = main(["export", "onnx", *map(str, args)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.mark.parametrize("arch", FAMILIES)
def test_each_backbone_family_exports_baked_with_a_dynamic_batch(tmp_path, capsys, arch):
    ckpt = _checkpoint(tmp_path, arch)
    out = tmp_path / "onnx"
    printed = _export([ckpt, out, "img_size=48"], capsys)  # stored 32 px -> fixed 48 px
    assert "max |diff|" in printed and "limit 0.0001" in printed
    meta = json.loads((out / "model.json").read_text())
    registers = arch != "dinov1_tiny"  # v2 *_reg: 4 registers; v3: 4 storage tokens
    names = ["cls", "patch", "registers"] if registers else ["cls", "patch"]
    assert list(meta["outputs"]) == names and meta["outputs"]["patch"] == ["batch", 36, 64]
    assert meta["input"]["shape"] == ["batch", 3, 48, 48] and meta["positions"] == "baked at 48x48"
    model = onnx.load(str(out / "model.onnx"))
    assert meta["opset"] == 18 == next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert all(v <= 1e-4 for v in meta["check"]["max_abs_diff"].values())
    assert json.loads({p.key: p.value for p in model.metadata_props}["input_size"]) == [48, 48]
    # baked: no bicubic resize of positions, no RoPE trigonometry left in the graph
    assert not {"Resize", "Sin", "Cos"} & _op_types(out / "model.onnx")
    session = _ort(out / "model.onnx")
    assert session.get_inputs()[0].shape[1:] == [3, 48, 48] and not isinstance(session.get_inputs()[0].shape[0], int)
    reference = load_backbone(ckpt).eval()  # stored at 32 px: resamples per forward, as meddino runs it
    for batch in (1, 4):
        x = torch.randn(batch, 3, 48, 48)
        with torch.no_grad():
            ref = reference.forward_features(x)
        got = dict(zip(names, session.run(names, {"image": x.numpy()})))
        for name in names:
            assert np.abs(got[name] - ref[name].numpy()).max() <= 1e-4, (name, batch)


@pytest.mark.parametrize("arch", FAMILIES)
def test_baking_gives_the_same_outputs_as_resampling_per_forward(tmp_path, arch):
    backbone = load_backbone(_checkpoint(tmp_path, arch)).eval()
    baked = bake_input_size(copy.deepcopy(backbone), (40, 56))
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        a, b = backbone.forward_features(x), baked.forward_features(x)
    assert torch.allclose(a["patch"], b["patch"], atol=1e-6) and torch.allclose(a["cls"], b["cls"], atol=1e-6)
    if arch != "dinov3_tiny":
        assert tuple(baked.vit.pos_embed.shape) != tuple(backbone.vit.pos_embed.shape)  # stored at 5x7 now
    else:
        with pytest.raises(ValueError, match="baked for the"):  # another size cannot use the baked RoPE
            baked.forward_features(torch.randn(1, 3, 32, 32))


def _seg_run(tmp_path, head: str, arch: str | None, size=(48, 64), **options):
    """A `meddino eval seg` run folder as training leaves it: model/model.json + a fold's weights."""
    from meddino.tasks.seg.predict import model_meta, save_fold_model
    from meddino.tasks.seg.heads import SegmentationModel

    torch.manual_seed(0)
    backbone = build_backbone(arch, img_size=32) if arch else None  # stored 32 px, trained at `size`
    model = SegmentationModel(backbone, head, 3, **options).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # BatchNorm / zero-initialised parts get content
    record = model.spec.record(model.head, model.options) if model.spec.record else None
    meta = model_meta(model, ["bg", "a", "b"], size, (0.5,) * 3, (0.2,) * 3, 255, "x", eomt=record,
                      monai_channels=options.get("monai_channels"))
    run = tmp_path / f"seg_{head}"
    save_fold_model(run / "model", model, meta, 0, {"best_val_dice": 0.4})
    save_fold_model(run / "model", model, meta, 1, {"best_val_dice": 0.6})
    return run


SEG_CASES = {
    "linear": ("dinov1_tiny", {}),
    "unet": ("dinov2_tiny_reg", {}),
    "eomt": ("dinov3_tiny", {"eomt": {"num_queries": 5, "mask_annealing": True}}),  # plain-ViT inference
    "monai_unet": (None, {"monai_channels": (4, 8, 16)}),
}


@pytest.mark.parametrize("head", list(SEG_CASES))
def test_each_segmentation_head_exports_its_class_scores(tmp_path, capsys, head):
    from meddino.tasks.seg.predict import load_seg_model

    arch, options = SEG_CASES[head]
    run = _seg_run(tmp_path, head, arch, **options)
    out = tmp_path / "onnx"
    _export([run, out], capsys)
    meta = json.loads((out / "model.json").read_text())
    assert meta["kind"] == "seg" and meta["head"] == head and meta["fold"] == 1  # best validation Dice
    assert meta["outputs"] == {"scores": ["batch", 3, 48, 64]} and meta["classes"] == ["bg", "a", "b"]
    assert meta["mean"] == [0.5] * 3 and meta["std"] == [0.2] * 3
    model, _ = load_seg_model(run, 1)
    session = _ort(out / "model.onnx")
    x = torch.randn(3, 3, 48, 64)
    ref = model.class_scores(x).numpy()
    got = session.run(["scores"], {"image": x.numpy()})[0]
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.99


def test_a_chosen_fold_is_exported(tmp_path, capsys):
    run = _seg_run(tmp_path, "linear", "dinov1_tiny", size=(32, 32))
    _export([run, tmp_path / "onnx", "fold=0"], capsys)
    assert json.loads((tmp_path / "onnx" / "model.json").read_text())["fold"] == 0


def test_eomt_with_masked_inference_is_refused(tmp_path, capsys):
    run = _seg_run(tmp_path, "eomt", "dinov3_tiny", size=(32, 32), eomt={"num_queries": 5, "mask_annealing": False})
    assert main(["export", "onnx", str(run), str(tmp_path / "onnx")]) == 2
    err = capsys.readouterr().err
    assert "its inference keeps masked attention" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "onnx").exists()


def _phase_run(tmp_path, stage1: bool):
    """A `meddino eval phase` model/ folder as the run writes it (stage-1 head only when stage 1 ran)."""
    from meddino.tasks.phase.frame_model import FrameClassifier, save_stage1
    from meddino.tasks.phase.mstcn import MSTCN, MSTCNConfig
    from meddino.tasks.phase.train import save_model

    torch.manual_seed(0)
    model = FrameClassifier(build_backbone("dinov2_tiny_reg", img_size=32), 4).eval()
    mstcn = MSTCN(MSTCNConfig(in_dim=64, num_classes=4, num_layers=2, channels=8))
    folder = tmp_path / "phase" / "model"
    if stage1:
        save_stage1(folder, model, "key", {})
    meta = {"phases": ["p0", "p1", "p2", "p3"], "fps": 1.0, "img_size": 48, "mean": [0.4] * 3, "std": [0.3] * 3,
            "feature": "cls", "backbone": "x", "stage1": stage1, "mstcn": mstcn.cfg.to_dict()}
    save_model(folder, model, mstcn, meta, stage1=stage1)
    return folder.parent, model


@pytest.mark.parametrize("stage1", [True, False])
def test_the_phase_frame_model_exports_features_and_stage1_logits(tmp_path, capsys, stage1):
    run, model = _phase_run(tmp_path, stage1)
    out = tmp_path / "onnx"
    _export([run, out], capsys)
    meta = json.loads((out / "model.json").read_text())
    names = ["features", "logits"] if stage1 else ["features"]
    assert meta["kind"] == "phase" and list(meta["outputs"]) == names and meta["input_size"] == [48, 48]
    assert meta["phases"] == ["p0", "p1", "p2", "p3"] and meta["mean"] == [0.4] * 3
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        features, logits = model(x)
    got = _ort(out / "model.onnx").run(names, {"image": x.numpy()})
    assert np.abs(got[0] - features.numpy()).max() <= 1e-4
    if stage1:
        assert np.abs(got[1] - logits.numpy()).max() <= 1e-4


def test_the_dynamo_exporter_also_bakes_rope(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    out = tmp_path / "onnx"
    _export([_checkpoint(tmp_path, "dinov3_tiny"), out, "img_size=48", "exporter=dynamo"], capsys)
    meta = json.loads((out / "model.json").read_text())
    assert meta["exporter"] == "dynamo" and meta["opset"] >= 18
    assert not {"Sin", "Cos"} & _op_types(out / "model.onnx")
    assert [p.name for p in (out).iterdir() if p.name.startswith("model.onnx")] == ["model.onnx"]  # one file
    x = np.random.default_rng(0).standard_normal((3, 3, 48, 48)).astype(np.float32)
    assert _ort(out / "model.onnx").run(["cls"], {"image": x})[0].shape == (3, 64)


def test_a_difference_above_the_limit_is_refused_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "onnx"
    code = main(["export", "onnx", str(_checkpoint(tmp_path, "dinov2_tiny_reg")), str(out), "max_abs_diff=1e-12"])
    err = capsys.readouterr().err
    assert code == 2 and "above max_abs_diff=1e-12 (fp32); nothing written" in err
    assert len([line for line in err.splitlines() if line.startswith("meddino: error")]) == 1 and not out.exists()


class _NaN(torch.nn.Module):
    def forward(self, image):
        return (image * float("nan"),)


def test_a_nan_output_is_refused(tmp_path):
    form = ExportForm("backbone", _NaN(), ("out",), (8, 8), (0.5,) * 3, (0.2,) * 3)
    with pytest.raises(OnnxCheckError, match="differs from PyTorch by nan in output 'out'"):
        export_onnx(form, tmp_path / "onnx", "x")
    assert list((tmp_path / "onnx").iterdir()) == []  # the temporary folder went with it


def test_bad_backbone_options_are_one_line(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, "dinov1_tiny")
    for extra, says in [
        ("img_size=50", "img_size: 50x50 is not a multiple of the backbone's patch size 8"),
        ("fold=1", "fold=1: only a segmentation run folder has folds"),
        ("opset=21", "opset=21: the torchscript exporter writes opsets 17..20"),
    ]:
        assert main(["export", "onnx", str(ckpt), str(tmp_path / "onnx"), extra]) == 2
        err = capsys.readouterr().err
        assert says in err and err.strip().splitlines()[-1].startswith("meddino: error"), extra
        assert not (tmp_path / "onnx").exists()


def test_a_trained_model_keeps_its_size(tmp_path, capsys):
    run = _seg_run(tmp_path, "linear", "dinov1_tiny", size=(32, 32))
    assert main(["export", "onnx", str(run), str(tmp_path / "onnx"), "img_size=64"]) == 2
    assert "img_size=64: this segmentation model was trained at 32x32" in capsys.readouterr().err


def test_profile_times_onnxruntime_beside_pytorch(tmp_path, capsys):
    out = tmp_path / "onnx"
    _export([_checkpoint(tmp_path, "dinov3_tiny"), out, "img_size=48"], capsys)
    prof = tmp_path / "profile"
    assert main(["profile", f"backbone={out / 'model.onnx'}", f"out={prof}", "warmup=1", "repeats=3",
                 "batch_size=2"]) == 0
    rows = json.loads((prof / "profile.json").read_text())["rows"]
    assert [r["runtime"] for r in rows] == ["pytorch", "onnxruntime"]
    for r in rows:
        assert r["img_size"] == 48 and r["batch_size"] == 2 and r["latency_ms_median"] > 0 and r["repeats"] == 3
        assert r["head"] == "backbone" and r["params_m"] > 0
    assert "onnxruntime" in capsys.readouterr().out
    assert main(["profile", f"backbone={out / 'model.onnx'}", f"out={tmp_path / 'p2'}", "img_size=64"]) == 2
    assert "img_size=64: model.onnx has the fixed input size 48x48 chosen at export" in capsys.readouterr().err
