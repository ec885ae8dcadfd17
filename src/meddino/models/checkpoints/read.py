"""Reading checkpoint files and telling their format, before any key is renamed.

Its own module so that :mod:`meddino.models.factory` (weights for ``timm:<name>@file``) and
:mod:`meddino.models.hf` can read files without importing the loader, which builds models through the
factory: the reading sits below both. Pickled files are read with ``weights_only=True`` only.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from meddino.errors import CheckpointError, first_line

EXPORT_FORMAT = "meddino-backbone"
WRAPPER_KEYS = ("teacher", "model_ema", "model", "state_dict", "module", "student", "network")
STRIP_PREFIXES = ("module.", "_orig_mod.")


def read_checkpoint(path: Path) -> Any:
    """Load a file without executing code: safetensors, or torch.load(weights_only=True)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
    try:
        # DINOv1 full checkpoints store their argparse.Namespace: plain data, safe to rebuild
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = first_line(exc).removeprefix("Weights only load failed. ")
        raise CheckpointError(
            f"{path}: refused to unpickle, the file holds objects that could run code ({reason[:160]}); "
            "re-save only its tensors (state_dict) or export it as safetensors with a trusted tool"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(exc)[:200]})") from None


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def unwrap_state_dict(obj: Any, path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Find the backbone's tensors inside wrappers and prefixes; ``key`` picks a wrapper explicitly."""
    if key:
        if not isinstance(obj, dict) or key not in obj:
            found = ", ".join(sorted(obj)[:8]) if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{path}: no entry '{key}' in the checkpoint (it has: {found})")
        obj = obj[key]
    while isinstance(obj, dict) and not _is_tensor_dict(obj):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
            if tensors:
                obj = tensors
                break
            raise CheckpointError(f"{path}: found no tensors (top-level keys: {', '.join(sorted(obj)[:8])})")
        obj = inner
    if not _is_tensor_dict(obj):
        raise CheckpointError(f"{path}: not a state dict (got {type(obj).__name__})")
    state = dict(obj)
    for prefix in STRIP_PREFIXES:
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    for wrapper in ("teacher.", "student."):  # DINOv2/v3 training checkpoints: model.{student,teacher}.*
        if any(k.startswith(wrapper) for k in state):
            chosen = "teacher." if any(k.startswith("teacher.") for k in state) else wrapper
            state = {k[len(chosen):]: v for k, v in state.items() if k.startswith(chosen)}
            break
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """'hf' | 'official_v3' | 'timm_eva' | 'official_v2' | 'timm_vit' from the key names."""
    keys = state.keys()
    hf_starts = ("embeddings.", "encoder.layer.", "layer.0.", "model.layer.0.")
    if any(k.startswith(hf_starts) or k.split(".", 1)[-1].startswith(hf_starts) for k in keys):
        return "hf"
    if "storage_tokens" in state or any(k.endswith((".bias_mask", "rope_embed.periods")) for k in keys):
        return "official_v3"
    if any(".gamma_1" in k or k.endswith("attn.q_bias") for k in keys) or (
        "reg_token" in state and "pos_embed" not in state
    ):
        return "timm_eva"
    if "register_tokens" in state or "mask_token" in state or any(
        re.match(r"blocks\.\d+\.\d+\.", k) or ".mlp.w12." in k for k in keys
    ):
        return "official_v2"
    if "patch_embed.proj.weight" in state and any(k.startswith("blocks.0.") for k in keys):
        return "timm_vit"
    raise CheckpointError("unrecognised checkpoint layout (no ViT patch embedding or blocks found)")


def export_sidecar(path: Path) -> dict[str, Any] | None:
    """The JSON sidecar of a meddino export (file ``X.safetensors`` + ``X.json``, or a folder with
    ``backbone.json``), with ``_weights`` set to the weights file; None when ``path`` is no export."""
    candidates = [path.with_suffix(".json")] if path.is_file() else [path / "backbone.json"]
    for json_path in candidates:
        if json_path.is_file():
            try:
                meta = json.loads(json_path.read_text())
            except json.JSONDecodeError:
                continue
            if isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT:
                meta["_weights"] = str(path if path.is_file() else path / meta.get("weights", "backbone.safetensors"))
                return meta
    return None
