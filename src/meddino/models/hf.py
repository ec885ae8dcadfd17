"""Hugging Face checkpoints -> timm layout.

Reads ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``DINOv3ViTModel`` and ``ViTModel`` (DINOv1) folders
(``config.json`` + ``model.safetensors`` / sharded safetensors / ``pytorch_model.bin``) or bare state dicts,
in both the key names stored on the Hub (transformers 4: ``attention.attention.query``,
``attention.output.dense``, ``intermediate.dense``...) and those transformers 5 writes (``q_proj``,
``o_proj``, ``layers.N``). Separate q/k/v projections are concatenated into timm's fused ``qkv``; the
LayerNorm eps comes from ``config.json`` (``norm_eps``), so e.g. HF's DINOv1 ports (eps 1e-12) give the
same features as in transformers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from meddino.errors import CheckpointError
from meddino.models.checkpoints.read import detect_layout, read_checkpoint

MODEL_PREFIXES = ("dinov2_with_registers.", "dinov2.", "dinov3_vit.", "vit.")

# per-layer renames into a neutral form: <attention part>.{q,k,v,o}, ls1/ls2, mlp parts, norm1/norm2
_LAYER_RENAMES = [
    (r"attention\.attention\.query\.", "attn.q."),
    (r"attention\.attention\.key\.", "attn.k."),
    (r"attention\.attention\.value\.", "attn.v."),
    (r"attention\.output\.dense\.", "attn.o."),
    (r"attention\.q_proj\.", "attn.q."),
    (r"attention\.k_proj\.", "attn.k."),
    (r"attention\.v_proj\.", "attn.v."),
    (r"attention\.o_proj\.", "attn.o."),
    (r"layer_scale1\.lambda1", "ls1"),
    (r"layer_scale2\.lambda1", "ls2"),
    (r"layernorm_before\.", "norm1."),
    (r"layernorm_after\.", "norm2."),
    (r"intermediate\.dense\.", "mlp.fc1."),
    (r"^output\.dense\.", "mlp.fc2."),
    (r"mlp\.weights_in\.", "mlp.w12."),
    (r"mlp\.weights_out\.", "mlp.w3."),
    (r"mlp\.gate_proj\.", "mlp.fc1_g."),
    (r"mlp\.down_proj\.", "mlp.fc2."),
]


def load_hf_folder(path: Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """A Hugging Face model folder -> (timm-layout state, layout name, hints for the architecture).

    A timm Hub folder (``timm.models.push_to_hf_hub`` / ``save_for_hf``: a ``config.json`` naming the
    ``architecture``, no ``model_type``) holds timm's layout already: its weights are returned as they are,
    with the layout their keys show and the head count its ``model_args`` give (the tensors cannot tell it).
    """
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path}: a checkpoint folder needs config.json (Hugging Face or timm) or "
                              "backbone.json (a meddino export)")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{config_path}: not readable JSON") from None
    state = _read_hf_weights(path)
    if isinstance(config, dict) and config.get("architecture") and not config.get("model_type"):
        model_args = config.get("model_args") if isinstance(config.get("model_args"), dict) else {}
        kwargs = {"num_heads": int(model_args["num_heads"])} if "num_heads" in model_args else {}
        return state, detect_layout(state, path), {"layout": f"timm Hub folder ({config['architecture']})",
                                                   "kwargs": kwargs}
    timm_state, hints = hf_state_to_timm(state, config)
    return timm_state, hints["layout"], hints


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin in the folder")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        part = read_checkpoint(file)
        if not isinstance(part, dict):
            raise CheckpointError(f"{file}: not a state dict")
        state.update(part)
    return state


def _model_type(state: dict[str, torch.Tensor], config: dict[str, Any] | None) -> str:
    if config and config.get("model_type"):
        return str(config["model_type"])
    keys = list(state)
    if any(k.startswith(("layer.", "model.layer.")) for k in keys) or "norm.weight" in state:
        return "dinov3_vit"
    if "embeddings.register_tokens" in state:
        return "dinov2_with_registers"
    if any("layer_scale1" in k for k in keys):
        return "dinov2"
    return "vit"


def hf_state_to_timm(
    state: dict[str, torch.Tensor], config: dict[str, Any] | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Convert HF keys to timm keys; returns (state, hints) with hints {layout, family, swiglu, kwargs}."""
    for prefix in MODEL_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    model_type = _model_type(state, config)
    if model_type not in ("dinov2", "dinov2_with_registers", "dinov3_vit", "vit"):
        raise CheckpointError(f"Hugging Face model_type '{model_type}' is not a DINO backbone")
    family = "eva" if model_type == "dinov3_vit" else "vit"
    out: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    ignored = []
    for key, value in state.items():
        m = re.match(r"^(?:encoder\.layer|encoder\.layers|model\.layer|layer|layers)\.(\d+)\.(.+)$", key)
        if m:
            name = m.group(2)
            for pattern, repl in _LAYER_RENAMES:
                name = re.sub(pattern, repl, name)
            layers.setdefault(int(m.group(1)), {})[name] = value
            continue
        key = key.replace("embeddings.patch_embeddings.projection.", "patch_embed.proj.")
        key = key.replace("embeddings.patch_embeddings.", "patch_embed.proj.")
        if key.startswith("pooler."):
            ignored.append(key)
            continue
        key = {"layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}.get(key, key)
        key = key.removeprefix("embeddings.")
        out[key] = value
    swiglu = False
    for i, parts in sorted(layers.items()):
        swiglu |= _convert_layer(i, parts, out, family)
    mask = out.pop("mask_token", None)
    if mask is not None:
        out["mask_token"] = mask.reshape(1, -1)
    regs = out.pop("register_tokens", None)
    pos = out.pop("position_embeddings", None)
    if family == "vit":
        if pos is None:
            raise CheckpointError("Hugging Face DINOv1/v2 checkpoint without position_embeddings")
        if regs is not None and regs.shape[1] > 0:
            out["reg_token"] = regs
            out["cls_token"] = out["cls_token"] + pos[:, :1]
            out["pos_embed"] = pos[:, 1:]
        else:
            out["pos_embed"] = pos
    elif regs is not None and regs.shape[1] > 0:
        out["reg_token"] = regs
    kwargs: dict[str, Any] = {}
    if config:
        if config.get("num_attention_heads"):
            kwargs["num_heads"] = int(config["num_attention_heads"])
        if config.get("layer_norm_eps") is not None:
            kwargs["norm_eps"] = float(config["layer_norm_eps"])
    hints = {"layout": f"huggingface {model_type}", "family": family, "swiglu": swiglu, "kwargs": kwargs,
             "ignored": ignored}
    return out, hints


def _convert_layer(i: int, parts: dict[str, torch.Tensor], out: dict[str, torch.Tensor], family: str) -> bool:
    """One HF layer -> timm block keys; returns True when the MLP is SwiGLU."""
    p = f"blocks.{i}."
    swiglu = False
    q, k, v = (parts.pop(f"attn.{n}.weight") for n in "qkv")
    out[p + "attn.qkv.weight"] = torch.cat([q, k, v])
    qb, kb, vb = (parts.pop(f"attn.{n}.bias", None) for n in "qkv")
    if family == "vit":
        if qb is not None:
            out[p + "attn.qkv.bias"] = torch.cat([qb, kb if kb is not None else torch.zeros_like(qb), vb])
    else:
        if kb is not None and kb.abs().max() > 0:
            raise CheckpointError(f"layer {i}: DINOv3 key bias is not zero; timm's Eva has no key bias")
        if qb is not None:
            out[p + "attn.q_bias"] = qb
            out[p + "attn.v_bias"] = vb if vb is not None else torch.zeros_like(qb)
    for name, value in parts.items():
        if name.startswith("attn.o."):
            name = "attn.proj." + name.removeprefix("attn.o.")
        elif name in ("ls1", "ls2"):
            name = (("gamma_1" if name == "ls1" else "gamma_2") if family == "eva" else f"{name}.gamma")
        elif name.startswith("mlp.w12."):
            swiglu = True
            name = name.replace("mlp.w12.", "mlp.fc1.")
        elif name.startswith("mlp.w3."):
            name = name.replace("mlp.w3.", "mlp.fc2.")
        elif name.startswith("mlp.up_proj."):
            gated = any(n.startswith("mlp.fc1_g.") for n in parts)
            name = name.replace("mlp.up_proj.", "mlp.fc1_x." if gated else "mlp.fc1.")
            swiglu |= gated
        out[p + name] = value
    return swiglu
