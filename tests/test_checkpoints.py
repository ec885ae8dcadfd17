"""Checkpoint loading: every supported key layout against an independent reference model.

Each test writes a checkpoint in the exact layout of one format from a tiny model, loads it with
``load_backbone`` and compares the features with the reference implementation's own features (timm, or
transformers for the Hugging Face formats) to 1e-5.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from meddino.errors import CheckpointError
from meddino.models import build_backbone, export_backbone, load_backbone

TINY = dict(patch_size=8, embed_dim=64, depth=3, num_heads=4, img_size=32, num_classes=0)
ATOL = 1e-5


def _timm(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**TINY, **kw}).eval()
    with torch.no_grad():  # LayerScale starts at 1e-5: make it matter, so a dropped gamma shows
        for n, p in model.named_parameters():
            if "gamma" in n or "bias" in n:
                p.uniform_(-0.5, 0.5)
    return model


def _features(backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = backbone.eval().forward_features(x)
    regs = out.get("registers")
    parts = [out["cls"][:, None]] + ([regs] if regs is not None else []) + [out["patch"]]
    return torch.cat(parts, dim=1)


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


# ------------------------------------------------------------------------------------ official layouts


def timm_vit_to_official_v2(state: dict, registers: bool, chunks: int = 0, swiglu: bool = False) -> dict:
    """Inverse of the official->timm mapping, written out independently for the tests."""
    out = {}
    state = dict(state)
    if registers:
        cls_pos = torch.randn_like(state["cls_token"])
        out["register_tokens"] = state.pop("reg_token")
        out["pos_embed"] = torch.cat([cls_pos, state.pop("pos_embed")], dim=1)
        out["cls_token"] = state.pop("cls_token") - cls_pos
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    per_chunk = -(-depth // chunks) if chunks else 0
    for key, value in state.items():
        if key.startswith("blocks."):
            i = int(key.split(".")[1])
            rest = key.split(".", 2)[2]
            if swiglu:
                rest = rest.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
            key = f"blocks.{i // per_chunk}.{i}.{rest}" if chunks else f"blocks.{i}.{rest}"
        out[key] = value
    out["mask_token"] = torch.randn(1, out["cls_token"].shape[-1])
    return out


def timm_eva_to_official_v3(state: dict) -> dict:
    out = {"rope_embed.periods": torch.arange(4.0)}
    for key, value in state.items():
        if key.endswith("attn.q_bias"):
            v = state[key.replace("q_bias", "v_bias")]
            out[key.replace("q_bias", "qkv.bias")] = torch.cat([value, torch.randn_like(value), v])
            out[key.replace("q_bias", "qkv.bias_mask")] = torch.cat(
                [torch.ones_like(value), torch.zeros_like(value), torch.ones_like(v)]
            )
            continue
        if key.endswith("attn.v_bias") or key.endswith("attn.k_bias"):
            continue
        key = key.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma").replace("reg_token", "storage_tokens")
        out[key] = value
    out["mask_token"] = torch.randn(1, state["cls_token"].shape[-1])
    return out


def test_official_dinov1_full_checkpoint(tmp_path, x):
    ref = _timm("vit_small_patch16_224")
    state = ref.state_dict()
    head = {"head.mlp.0.weight": torch.randn(8, 64), "head.last_layer.weight_g": torch.ones(1, 8)}
    ckpt = {
        "student": {f"module.backbone.{k}": v + 1 for k, v in state.items()} | {f"module.{k}": v for k, v in head.items()},
        "teacher": {f"backbone.{k}": v for k, v in state.items()} | head,
        "optimizer": {}, "epoch": 3, "args": argparse.Namespace(arch="vit_small", patch_size=8),
        "dino_loss": {"center": torch.zeros(1, 8)},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    backbone = load_backbone(path, num_heads=4)
    assert backbone.version == "v1"
    torch.testing.assert_close(_features(backbone, x), ref.forward_features(x), atol=ATOL, rtol=0)
    student = load_backbone(f"{path}#student", num_heads=4)  # the student is a different network
    assert not torch.allclose(_features(student, x), ref.forward_features(x), atol=1e-3)


@pytest.mark.parametrize("registers,chunks", [(False, 0), (True, 0), (True, 2)])
def test_official_dinov2_backbone(tmp_path, x, registers, chunks):
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    ref = _timm(name)
    official = timm_vit_to_official_v2(ref.state_dict(), registers, chunks)
    path = tmp_path / "dinov2.pth"
    torch.save(official, path)
    backbone = load_backbone(path, num_heads=4)
    assert backbone.version == "v2" and backbone.num_registers == (4 if registers else 0)
    torch.testing.assert_close(_features(backbone, x), ref.forward_features(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(backbone.mask_token, official["mask_token"])
    if not chunks:  # timm's own converter agrees
        other = timm.create_model(name, pretrained=False, **TINY).eval()
        from timm.models.vision_transformer import checkpoint_filter_fn

        other.load_state_dict(checkpoint_filter_fn(dict(official), other))
        torch.testing.assert_close(_features(backbone, x), other.forward_features(x), atol=ATOL, rtol=0)


def test_official_dinov2_swiglu_training_checkpoint(tmp_path, x):
    from timm.layers import SwiGLUPacked

    ref = _timm("vit_giant_patch14_dinov2", mlp_ratio=5.0, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    official = timm_vit_to_official_v2(ref.state_dict(), registers=False, chunks=3, swiglu=True)
    model = {f"teacher.backbone.{k}": v for k, v in official.items()}
    model |= {f"student.backbone.{k}": torch.zeros_like(v) for k, v in official.items()}
    model |= {"teacher.dino_head.last_layer.weight": torch.randn(8, 4)}
    path = tmp_path / "model_0001249.rank_0.pth"
    torch.save({"model": model, "iteration": 1249}, path)
    backbone = load_backbone(path, num_heads=4)
    torch.testing.assert_close(_features(backbone, x), ref.forward_features(x), atol=ATOL, rtol=0)


def test_official_dinov3_backbone(tmp_path, x):
    ref = _timm("vit_small_patch16_dinov3_qkvb")
    official = timm_eva_to_official_v3(ref.state_dict())
    path = tmp_path / "dinov3_vits16_pretrain.pth"
    torch.save(official, path)
    backbone = load_backbone(path, num_heads=4)
    assert backbone.version == "v3" and backbone.num_registers == 4
    torch.testing.assert_close(_features(backbone, x), ref.forward_features(x), atol=ATOL, rtol=0)
    other = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, **TINY).eval()
    from timm.models.eva import checkpoint_filter_fn

    other.load_state_dict(checkpoint_filter_fn(dict(official), other))
    torch.testing.assert_close(_features(backbone, x), other.forward_features(x), atol=ATOL, rtol=0)


def test_seed_surgenetxl_teacher_file(tmp_path, x):
    """Seed 000 releases teacher backbones in the native layouts, wrapped as {'teacher': backbone.*}."""
    ref = _timm("vit_small_patch14_reg4_dinov2")
    official = timm_vit_to_official_v2(ref.state_dict(), registers=True)
    teacher = {f"backbone.{k}": v for k, v in official.items()}
    teacher["dino_head.mlp.0.weight"] = torch.randn(8, 64)
    teacher["ibot_head.mlp.0.weight"] = torch.randn(8, 64)
    path = tmp_path / "SurgeNetXL_DINOv2_teacher.pth"
    torch.save({"teacher": teacher}, path)
    torch.testing.assert_close(_features(load_backbone(path, num_heads=4), x), ref.forward_features(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3_qkvb"])
def test_timm_state_dicts(tmp_path, x, name):
    ref = _timm(name)
    path = tmp_path / "timm.safetensors"
    save_file(ref.state_dict(), str(path))
    backbone = load_backbone(path, num_heads=4)
    torch.testing.assert_close(_features(backbone, x), ref.forward_features(x), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------- Hugging Face

HF_OLD_NAMES = [  # transformers 5 name -> name stored on the Hub by transformers 4
    ("attention.q_proj.", "attention.attention.query."),
    ("attention.k_proj.", "attention.attention.key."),
    ("attention.v_proj.", "attention.attention.value."),
    ("attention.o_proj.", "attention.output.dense."),
]


def _hf_model(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
                  patch_size=8, image_size=32)
    if kind == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(**common))
    elif kind == "dinov2_reg":
        model = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(num_register_tokens=4, **common))
    elif kind == "dinov3":
        model = tf.DINOv3ViTModel(tf.DINOv3ViTConfig(num_register_tokens=4, **common))
    else:
        model = tf.ViTModel(tf.ViTConfig(**common), add_pooling_layer=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lambda1" in n or "bias" in n or "register" in n or "cls" in n:
                p.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_reg", "dinov3", "vit"])
def test_huggingface_folders(tmp_path, x, kind):
    model = _hf_model(kind)
    model.save_pretrained(tmp_path / "hf")
    backbone = load_backbone(tmp_path / "hf")
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(_features(backbone, x), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["vit_small_patch16_224.dino", "vit_small_patch14_dinov2.lvd142m",
                                  "vit_small_patch14_reg4_dinov2.lvd142m", "vit_small_patch16_dinov3.lvd1689m"])
@pytest.mark.parametrize("safe", [True, False])
def test_timm_hub_folders(tmp_path, x, name, safe):
    """A folder as timm writes it for the Hub (config.json naming the architecture, model.safetensors or
    pytorch_model.bin in timm's layout) loads with its own head count and gives timm's features."""
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=2,
                              num_heads=2, num_classes=0).eval()  # 2 heads of 32: not what 64 wide implies
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1 or "token" in n:
                p.uniform_(-0.5, 0.5)  # LayerScale, biases, tokens away from their init
    save_for_hf(model, tmp_path / "hub", safe_serialization=safe)
    assert "architecture" in json.loads((tmp_path / "hub" / "config.json").read_text())
    backbone = load_backbone(tmp_path / "hub")
    assert "timm Hub folder" in backbone.load_report.summary()
    with torch.no_grad():
        ref = model.forward_features(x)
    torch.testing.assert_close(_features(backbone, x), ref, atol=ATOL, rtol=0)


def test_huggingface_hub_key_names_state_dict(tmp_path, x):
    """Hub files keep transformers-4 names (attention.attention.query ...); a bare state dict works too."""
    model = _hf_model("dinov2")
    state = {}
    for key, value in model.state_dict().items():
        for new, old in HF_OLD_NAMES:
            key = key.replace(new, old)
        state[f"dinov2.{key}"] = value
    path = tmp_path / "hf_dinov2.safetensors"
    save_file(state, str(path))
    backbone = load_backbone(path, num_heads=4)
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(_features(backbone, x), ref, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------ exports, interpolation


@pytest.mark.parametrize("arch", ["dinov1_tiny", "dinov2_tiny_reg", "dinov3_tiny"])
def test_export_roundtrip_and_plain_timm(tmp_path, x, arch):
    from safetensors.torch import load_file

    backbone = build_backbone(arch).eval()
    with torch.no_grad():
        backbone.mask_token.normal_()
    path = export_backbone(backbone, tmp_path / "teacher_backbone")
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    again = load_backbone(path)
    torch.testing.assert_close(_features(again, x), _features(backbone, x), atol=0, rtol=0)
    torch.testing.assert_close(again.mask_token, backbone.mask_token)
    meta = json.loads(path.with_suffix(".json").read_text())
    plain = timm.create_model(meta["timm_name"], pretrained=False, num_classes=0, **meta["timm_kwargs"]).eval()
    plain.load_state_dict(load_file(str(path)))  # strict
    torch.testing.assert_close(_features(backbone, x), plain.forward_features(x), atol=ATOL, rtol=0)


def test_dinov2_518_checkpoint_loaded_at_224_matches_timm_resampling(tmp_path):
    # The default mode is now the official DINOv2 one (+0.1 offset, no antialias; see tests/test_pos_embed.py)
    # and the stored 37 x 37 grid is kept (resampled per forward): numbers at 224 legitimately differ from
    # timm's filter. With pos_embed_resample="timm" they must still match timm exactly, kept or resized.
    kw = dict(patch_size=14, embed_dim=64, depth=2, num_heads=4, num_classes=0)
    torch.manual_seed(0)
    ref518 = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, **kw)
    official = timm_vit_to_official_v2(ref518.state_dict(), registers=False)
    assert official["pos_embed"].shape[1] == 1 + 37 * 37
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official, path)
    ref224 = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, **kw).eval()
    from timm.models.vision_transformer import checkpoint_filter_fn

    ref224.load_state_dict(checkpoint_filter_fn(dict(official), ref224))
    x = torch.randn(1, 3, 224, 224)
    resized = load_backbone(path, img_size=224, num_heads=4, pos_embed_resample="timm", resize_pos_embed=True)
    assert resized.vit.pos_embed.shape[1] == 1 + 16 * 16
    torch.testing.assert_close(resized.vit.pos_embed, ref224.pos_embed, atol=1e-6, rtol=0)
    torch.testing.assert_close(_features(resized, x), ref224.forward_features(x), atol=ATOL, rtol=0)
    assert resized.load_report.resampled_pos_embed == (16, 16)
    kept = load_backbone(path, img_size=224, num_heads=4, pos_embed_resample="timm")
    assert kept.vit.pos_embed.shape[1] == 1 + 37 * 37 and kept.load_report.kept_pos_embed_grid == (37, 37)
    torch.testing.assert_close(_features(kept, x), ref224.forward_features(x), atol=ATOL, rtol=0)


# -------------------------------------------------------------------------------------------- refusals


def test_missing_block_weight_is_refused(tmp_path):
    state = _timm("vit_small_patch14_dinov2").state_dict()
    del state["blocks.1.attn.proj.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.proj\.weight.*missing"):
        load_backbone(path, num_heads=4)


def test_wrong_patch_size_for_named_arch_is_refused(tmp_path):
    state = _timm("vit_small_patch14_dinov2", patch_size=16).state_dict()
    path = tmp_path / "p16.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="patch size 16 but architecture 'dinov2_tiny' has 8"):
        load_backbone(path, arch="dinov2_tiny")


def test_shape_mismatch_is_refused(tmp_path):
    state = _timm("vit_small_patch14_dinov2").state_dict()
    state["blocks.0.mlp.fc2.weight"] = torch.zeros(64, 100)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="shape of 'blocks.0.mlp.fc2.weight'"):
        load_backbone(path, num_heads=4)


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {"x": torch.zeros(1)}, "evil": _Payload(str(marker))}, fh)
    # sanity: a plain unpickle would run it
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_backbone(path)
    assert not marker.exists()
    torch.save({"evil": _Payload(str(marker))}, tmp_path / "evil_zip.pth")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_backbone(tmp_path / "evil_zip.pth")
    assert not marker.exists()


def test_unreadable_and_empty_files(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file at all")
    with pytest.raises(CheckpointError, match="empty"):
        load_backbone(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_backbone(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone(tmp_path / "absent.pth")


# ------------------------------------------------------------------------------------------------ CLI


def test_convert_cli(tmp_path, cli, x):
    ref = _timm("vit_small_patch16_dinov3_qkvb")
    src = tmp_path / "official.pth"
    torch.save(timm_eva_to_official_v3(ref.state_dict()), src)
    res = cli("convert", src, tmp_path / "out" / "converted", "num_heads=4")
    assert res.returncode == 0, res.stderr
    assert "official_v3" in res.stdout
    backbone = load_backbone(tmp_path / "out" / "converted.safetensors")
    torch.testing.assert_close(_features(backbone, x), ref.forward_features(x), atol=ATOL, rtol=0)
    bad = cli("convert", tmp_path / "nope.pth", tmp_path / "x")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "not found" in bad.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_export_of_hf_dinov1_keeps_its_layernorm_eps(tmp_path, x):
    """HF's DINOv1 ports use LayerNorm eps 1e-12: the export records it outside timm's kwargs."""
    model = _hf_model("vit")
    model.save_pretrained(tmp_path / "hf")
    backbone = load_backbone(tmp_path / "hf")
    path = export_backbone(backbone, tmp_path / "exported")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["norm_eps"] == 1e-12 and "norm_eps" not in meta["timm_kwargs"]
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(_features(load_backbone(path), x), ref, atol=ATOL, rtol=0)
    timm.create_model(meta["timm_name"], pretrained=False, num_classes=0, **meta["timm_kwargs"])  # plain timm builds it


def test_export_of_another_dino_version_is_refused_for_a_named_arch(tmp_path, cli):
    """A DINOv1 export is not a DINOv2 backbone: naming dinov2_tiny refuses it (file, found, asked), in the
    API and through `meddino convert --arch`, and nothing is written."""
    v1 = export_backbone(build_backbone("dinov1_tiny"), tmp_path / "v1_tiny")
    with pytest.raises(CheckpointError, match=r"v1_tiny.safetensors: checkpoint has DINO version v1 but "
                                              r"architecture 'dinov2_tiny' has v2"):
        load_backbone(v1, arch="dinov2_tiny")
    assert load_backbone(v1, arch="dinov1_tiny").version == "v1"
    res = cli("convert", v1, tmp_path / "as_v2", "arch=dinov2_tiny")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "version v1" in res.stderr and "'dinov2_tiny' has v2" in res.stderr
    assert not (tmp_path / "as_v2.safetensors").exists()
