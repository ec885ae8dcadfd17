"""Checkpoint loading, conversion and export.

:func:`load_backbone` reads, detecting the format:

- official DINOv1 / DINOv2 / DINOv3 backbones and training checkpoints (``teacher`` / ``student`` /
  ``model`` wrappers, ``module.`` and ``backbone.`` prefixes, DINOv2 block chunks ``blocks.<chunk>.<i>.``,
  ``register_tokens``, LayerScale ``ls1.gamma``, SwiGLU ``mlp.w12``/``w3`` (v2) or ``w1``/``w2``/``w3`` (v3),
  DINOv3 ``storage_tokens``, masked ``qkv.bias`` and ``rope_embed.periods``); the seeds' SurgeNetXL
  teacher files are such teacher backbones;
- timm state dicts of the same architectures, and meddino's own exports (timm layout + JSON sidecar);
- Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` / ``DINOv3ViTModel`` / ``ViTModel`` folders
  or state dicts (see :mod:`meddino.models.hf`).

Everything is converted to timm's key layout (the layout timm's own checkpoint filters produce: DINOv2
register models fold the CLS position into ``cls_token``, DINOv3 splits the qkv bias into ``q_bias`` and
``v_bias`` and drops the always-zero key bias), the architecture is read from the tensors when ``arch`` is
not given, and the weights are loaded strictly: a missing weight, an unexpected one or a shape mismatch
refuses the load with one line. Pickled files are read with ``weights_only=True`` only.

Position embeddings (v1/v2) keep the grid they were stored at, whatever ``img_size`` asks for: each forward
resamples from that grid to its own in the backbone's ``pos_embed_resample`` mode (see
:mod:`meddino.models.pos_embed`), so released 518 px weights trained with 224 and 98 px crops are resampled
once per crop (518 -> 224, 518 -> 98), never 518 -> 224 -> 98. ``resize_pos_embed=True`` instead resamples
the stored grid once at load to ``img_size`` (same mode), e.g. for an export at a fixed size.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meddino.errors import CheckpointError, first_line
from meddino.models.archs import resolve_arch
from meddino.models.backbone import Backbone, CNNBackbone
from meddino.models.pos_embed import default_mode

EXPORT_FORMAT = "meddino-backbone"
WRAPPER_KEYS = ("teacher", "model_ema", "model", "state_dict", "module", "student", "network")
STRIP_PREFIXES = ("module.", "_orig_mod.")
# keys that belong to training, not to the backbone: dropped and listed in the load report
IGNORED_PATTERNS = (
    r"(^|\.)rope_embed\.periods$",
    r"\.bias_mask$",
    r"^local_cls_norm\.",
    r"^head\.",
    r"^fc_norm\.",
    r"^projectors\.",
)
NUM_HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24, 4096: 32}


@dataclass
class LoadReport:
    """What a load did: the detected layout, the keys it converted away or ignored."""

    path: str
    layout: str
    ignored: list[str] = field(default_factory=list)
    resampled_pos_embed: tuple[int, int] | None = None
    # img_size asked for another grid, the stored one was kept (each forward resamples from it)
    kept_pos_embed_grid: tuple[int, int] | None = None
    pos_embed_resample: str | None = None

    def summary(self) -> str:
        parts = [f"loaded {self.path} ({self.layout} layout)"]
        if self.resampled_pos_embed:
            parts.append(f"position embeddings resampled to grid {self.resampled_pos_embed} ({self.pos_embed_resample})")
        if self.kept_pos_embed_grid:
            parts.append(f"position embeddings kept at their stored grid {self.kept_pos_embed_grid}, "
                         f"resampled per forward ({self.pos_embed_resample})")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} training-only keys (e.g. {self.ignored[0]})")
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------------- reading


def read_checkpoint(path: Path) -> Any:
    """Load a file without executing code: safetensors, or torch.load(weights_only=True)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

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


# ------------------------------------------------------------------------------------------- conversion


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


def _pop_ignored(state: dict[str, torch.Tensor]) -> list[str]:
    ignored = [k for k in state if any(re.search(p, k) for p in IGNORED_PATTERNS)]
    for k in ignored:
        state.pop(k)
    return ignored


def official_v2_to_timm(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Official DINOv1/v2 keys -> timm ViT keys (+ ``mask_token``). Returns (state, uses_swiglu)."""
    out: dict[str, torch.Tensor] = {}
    swiglu = False
    state = dict(state)
    if "register_tokens" in state:
        # timm's register models keep no position for CLS: fold it into the token, as timm's filter does
        pos = state.pop("pos_embed")
        out["reg_token"] = state.pop("register_tokens")
        out["cls_token"] = state.pop("cls_token") + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    for key, value in state.items():
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # block chunks
        if ".mlp.w12." in key:
            swiglu = True
            key = key.replace(".mlp.w12.", ".mlp.fc1.")
        key = key.replace(".mlp.w3.", ".mlp.fc2.")
        if key == "mask_token" and value.ndim == 2:
            value = value.reshape(1, -1)
        out[key] = value
    return out, swiglu


def official_v3_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINOv3 keys -> timm Eva keys (+ ``mask_token``); the key part of qkv bias is zero by design."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("attn.qkv.bias"):
            q, _k, v = value.chunk(3, dim=-1)
            out[key.replace("qkv.bias", "q_bias")] = q
            out[key.replace("qkv.bias", "v_bias")] = v
            continue
        key = key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        key = key.replace("storage_tokens", "reg_token")
        key = key.replace(".mlp.w1.", ".mlp.fc1_g.").replace(".mlp.w2.", ".mlp.fc1_x.").replace(".mlp.w3.", ".mlp.fc2.")
        if key == "mask_token":
            value = value.reshape(1, -1)
        out[key] = value
    return out


def infer_arch(state: dict[str, torch.Tensor], family: str, swiglu: bool = False) -> tuple[str, str, dict[str, Any]]:
    """(timm_name, version, timm kwargs) read from timm-layout tensors."""
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError("checkpoint has no patch embedding (patch_embed.proj.weight)")
    proj = state["patch_embed.proj.weight"]
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointError("checkpoint has no transformer blocks")
    depth = max(blocks) + 1
    kwargs: dict[str, Any] = dict(
        embed_dim=dim, depth=depth, num_heads=NUM_HEADS_BY_DIM.get(dim, max(1, dim // 64)), patch_size=patch
    )
    regs = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    if family == "eva":
        if "blocks.0.mlp.fc1_g.weight" in state:
            hidden = int(state["blocks.0.mlp.fc1_g.weight"].shape[0])
            name = "vit_small_plus_patch16_dinov3"
        else:
            hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
            name = "vit_small_patch16_dinov3"
        kwargs["mlp_ratio"] = hidden / dim
        kwargs["num_reg_tokens"] = regs
        if "blocks.0.attn.q_bias" in state:
            name += "_qkvb"
        return name, "v3", kwargs
    layerscale = "blocks.0.ls1.gamma" in state
    version = "v2" if (layerscale or regs or "mask_token" in state) else "v1"
    if "pos_embed" in state:
        n_pos = int(state["pos_embed"].shape[1]) - (0 if regs else 1)
        side = int(round(math.sqrt(n_pos)))
        if side * side != n_pos:
            raise CheckpointError(f"position embedding of {n_pos} patches is not a square grid")
        kwargs["img_size"] = side * patch
    kwargs["qkv_bias"] = "blocks.0.attn.qkv.bias" in state
    if version == "v1":
        return "vit_small_patch16_224", "v1", kwargs
    if swiglu:
        hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
        kwargs["mlp_ratio"] = hidden / dim
        name = "vit_giant_patch14_reg4_dinov2" if regs else "vit_giant_patch14_dinov2"
    else:
        kwargs["mlp_ratio"] = int(state["blocks.0.mlp.fc1.weight"].shape[0]) / dim
        name = "vit_small_patch14_reg4_dinov2" if regs else "vit_small_patch14_dinov2"
    if regs:
        kwargs["reg_tokens"] = regs
    if not layerscale:
        kwargs["init_values"] = None
    return name, version, kwargs


def _check_against_arch(arch: str, inferred: dict[str, Any], version: str, path: Path) -> dict[str, Any]:
    """The user named an architecture: the checkpoint must agree on everything the tensors tell."""
    from meddino.models.factory import build_backbone

    spec = resolve_arch(arch)
    probe = build_backbone(arch, img_size=inferred.get("img_size"))
    wanted = {
        "patch size": (inferred["patch_size"], probe.patch_size),
        "embedding dim": (inferred["embed_dim"], probe.embed_dim),
        "depth": (inferred["depth"], probe.depth),
        "registers": (inferred.get("reg_tokens", inferred.get("num_reg_tokens", 0)), probe.num_registers),
        "DINO version": (version, spec.version),
    }
    for what, (got, expected) in wanted.items():
        if got != expected:
            raise CheckpointError(f"{path}: checkpoint has {what} {got} but architecture '{arch}' has {expected}")
    kwargs = dict(spec.kwargs)
    if "img_size" in inferred:
        kwargs["img_size"] = inferred["img_size"]
    return kwargs


# ----------------------------------------------------------------------------------------------- loading


def load_into_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path | str) -> None:
    """``load_state_dict(strict=True)`` with a one-line refusal naming the first problem."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: weight '{missing[0]}'{more} needed by the architecture is missing")
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{path}: unexpected weight '{unexpected[0]}'{more} (a checkpoint of another architecture?)"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path}: shape of '{key}' is {tuple(value.shape)}, the architecture needs {tuple(expected[key].shape)}"
            )
    module.load_state_dict(state, strict=True)


def _resample_pos_embed(state: dict[str, torch.Tensor], backbone: Backbone) -> tuple[int, int] | None:
    """Resample ``pos_embed`` once to the module's grid in the backbone's mode (CLS position unchanged).

    Only for ``resize_pos_embed=True``: by default the module is built at the stored grid. With mode
    ``timm`` this is exactly timm's own checkpoint filter.
    """
    from meddino.models.pos_embed import resample_pos_embed

    vit = getattr(backbone, "vit", None)
    if "pos_embed" not in state or getattr(vit, "pos_embed", None) is None:
        return None
    if state["pos_embed"].shape == vit.pos_embed.shape:
        return None
    prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
    old = state["pos_embed"]
    side = int(round(math.sqrt(old.shape[1] - prefix)))
    new_hw = tuple(int(s) for s in vit.patch_embed.grid_size)
    grid = resample_pos_embed(old[:, prefix:], new_hw, backbone.pos_embed_resample, (side, side))
    state["pos_embed"] = torch.cat([old[:, :prefix], grid], dim=1)
    return new_hw


def load_backbone(
    path: str | Path,
    arch: str | None = None,
    img_size: int | None = None,
    key: str | None = None,
    drop_path_rate: float = 0.0,
    verbose: bool = False,
    pos_embed_resample: str | None = None,
    resize_pos_embed: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Load a backbone from any supported checkpoint (see module docstring).

    ``arch``: an alias or timm name the checkpoint must match (else the architecture is read from the
    tensors); ``img_size``: the working resolution; v1/v2 position embeddings keep their stored grid and
    every forward resamples from it (for RoPE models it only sets the nominal size);
    ``resize_pos_embed``: resample the stored grid once to ``img_size`` at load instead;
    ``pos_embed_resample``: the resampling mode (default: the version's, ``dinov2_reg`` for a released
    37 x 37 DINOv2 register checkpoint); ``key``: which wrapper entry to take (``teacher`` by default,
    e.g. ``student``); ``overrides``: timm options the tensors cannot tell (e.g. ``num_heads`` for
    non-standard widths). A path may end in ``#key`` to pick the wrapper entry from a spec string.
    """
    from meddino.models.factory import build_from_timm

    path_str = str(path)
    if key is None and "#" in path_str and not Path(path_str).exists():
        path_str, key = path_str.rsplit("#", 1)
    path = Path(path_str).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")

    sidecar = _export_sidecar(path)
    if sidecar is not None:
        return _load_export(path, sidecar, img_size, drop_path_rate, verbose, pos_embed_resample, resize_pos_embed)
    if path.is_dir():
        from meddino.models.hf import load_hf_folder

        state, layout, hints = load_hf_folder(path)
    else:
        state = unwrap_state_dict(read_checkpoint(path), path, key)
        layout = detect_layout(state)
        hints = {}
        if layout == "hf":
            from meddino.models.hf import hf_state_to_timm

            state, hints = hf_state_to_timm(state, None)
    state = dict(state)
    ignored = list(hints.get("ignored", [])) + _pop_ignored(state)
    swiglu = False
    if layout == "official_v2":
        state, swiglu = official_v2_to_timm(state)
    elif layout == "official_v3":
        state = official_v3_to_timm(state)
    family = "eva" if (layout in ("official_v3", "timm_eva") or hints.get("family") == "eva") else "vit"
    timm_name, version, kwargs = infer_arch(state, family, swiglu or hints.get("swiglu", False))
    kwargs.update(hints.get("kwargs", {}))
    if arch is not None:
        kwargs.update(_check_against_arch(arch, kwargs, version, path))
        timm_name = resolve_arch(arch).timm_name
    kwargs.update(overrides)
    stored_size = kwargs.get("img_size")  # None: no learned position embeddings (RoPE)
    kept = None
    if img_size is not None and int(img_size) != stored_size:
        if stored_size is None or resize_pos_embed:
            kwargs["img_size"] = int(img_size)
        else:  # keep the stored grid: each forward resamples from it
            kept = (stored_size // kwargs["patch_size"],) * 2
    kwargs.setdefault("img_size", 224)
    if family == "vit":
        grid = (stored_size // kwargs["patch_size"],) * 2 if stored_size else None
        regs = int(kwargs.get("reg_tokens", 0))
        kwargs["pos_embed_resample"] = pos_embed_resample or default_mode(version, regs, grid, released=True)
    elif pos_embed_resample is not None:
        kwargs["pos_embed_resample"] = pos_embed_resample  # refused by build_from_timm: RoPE
    backbone = build_from_timm(timm_name, version, kwargs, drop_path_rate)
    mask_token = state.pop("mask_token", None)
    resampled = _resample_pos_embed(state, backbone) if stored_size != kwargs["img_size"] else None
    load_into_strict(backbone.vit, state, path)
    if mask_token is not None:
        _set_mask_token(backbone, mask_token, path)
    backbone.load_report = LoadReport(str(path), hints.get("layout", layout), ignored, resampled, kept,
                                      backbone.pos_embed_resample)
    if verbose:
        print(backbone.load_report.summary(), file=sys.stderr)
    return backbone


def _set_mask_token(backbone: Backbone, value: torch.Tensor, path: Path) -> None:
    value = value.reshape(1, -1)
    if value.shape != backbone.mask_token.shape:
        raise CheckpointError(f"{path}: mask_token has shape {tuple(value.shape)}, expected {tuple(backbone.mask_token.shape)}")
    with torch.no_grad():
        backbone.mask_token.copy_(value)


# ------------------------------------------------------------------------------------------------ export


def _export_sidecar(path: Path) -> dict[str, Any] | None:
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


def _load_export(
    path: Path,
    meta: dict[str, Any],
    img_size: int | None,
    drop_path_rate: float,
    verbose: bool = False,
    pos_embed_resample: str | None = None,
    resize_pos_embed: bool = False,
) -> nn.Module:
    from meddino.models.factory import build_from_timm, build_timm_backbone

    weights = Path(meta["_weights"])
    state = read_checkpoint(weights)
    if meta.get("version") == "cnn":
        model = build_timm_backbone(meta["timm_name"])
        load_into_strict(model.model, state, weights)
        return model
    kwargs = dict(meta.get("timm_kwargs", {}))
    if meta.get("norm_eps") is not None:
        kwargs["norm_eps"] = float(meta["norm_eps"])
    mode = pos_embed_resample or meta.get("pos_embed_resample")  # exports before it was recorded: the default
    if mode is not None:
        kwargs["pos_embed_resample"] = mode
    stored = kwargs.get("img_size")
    has_pos = "pos_embed" in state
    kept = None
    if img_size is not None and int(img_size) != stored:
        if not has_pos or resize_pos_embed or stored is None:
            kwargs["img_size"] = int(img_size)
        else:  # keep the stored grid: each forward resamples from it
            patch = int(meta.get("patch_size") or kwargs.get("patch_size"))
            kept = (int(stored) // patch,) * 2
    backbone = build_from_timm(meta["timm_name"], meta["version"], kwargs, drop_path_rate)
    resampled = _resample_pos_embed(state, backbone) if stored != kwargs.get("img_size") else None
    load_into_strict(backbone.vit, state, weights)
    if meta.get("mask_token") is not None:
        _set_mask_token(backbone, torch.tensor(meta["mask_token"], dtype=torch.float32), weights)
    backbone.load_report = LoadReport(str(weights), "meddino export", [], resampled, kept, backbone.pos_embed_resample)
    if verbose:
        print(backbone.load_report.summary(), file=sys.stderr)
    return backbone


def export_backbone(module: nn.Module, path: str | Path) -> Path:
    """Write ``path`` (.safetensors, timm key layout) and a JSON sidecar describing the architecture.

    Plain timm reads it: ``m = timm.create_model(j["timm_name"], num_classes=0, **j["timm_kwargs"]);
    m.load_state_dict(safetensors.torch.load_file(path))`` (and, when ``j["norm_eps"]`` is set, that eps on
    every LayerNorm, as for Hugging Face DINOv1 ports). Both files are written atomically. The JSON also
    records ``pos_embed_resample``, the mode meddino resamples position embeddings in when an input's grid
    differs from the stored one; plain timm resamples in its own (``timm``) mode, so it reproduces meddino's
    features exactly at the stored size, or everywhere when the mode is ``timm``.
    """
    from safetensors.torch import save_file

    from meddino.runlog import atomic_path, write_json

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if isinstance(module, CNNBackbone):
        target, mask_token = module.model, None
    elif isinstance(module, Backbone):
        target, mask_token = module.vit, module.mask_token.detach().float().reshape(-1).tolist()
    else:
        raise TypeError(f"export_backbone needs a meddino Backbone, got {type(module).__name__}")
    state = {k: v.detach().contiguous().cpu() for k, v in target.state_dict().items()}
    arch = module.arch
    timm_kwargs = dict(arch.get("kwargs", {}))
    norm_eps = timm_kwargs.pop("norm_eps", None)  # not a timm option: applied to every LayerNorm on load
    pos_embed_resample = timm_kwargs.pop("pos_embed_resample", None)  # meddino's, not timm's
    meta = {
        "format": EXPORT_FORMAT,
        "format_version": 1,
        "timm_name": arch["timm_name"],
        "version": arch["version"],
        "timm_kwargs": {**timm_kwargs, **_timm_defaults_note()},
        "norm_eps": norm_eps,
        "pos_embed_resample": pos_embed_resample,
        "embed_dim": module.embed_dim,
        "patch_size": module.patch_size,
        "weights": path.name,
        "mask_token": mask_token,
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": EXPORT_FORMAT, "arch": json.dumps(arch)})
    write_json(path.with_suffix(".json"), meta)
    return path


def _timm_defaults_note() -> dict[str, Any]:
    # the options meddino always builds with, so plain timm rebuilds the same module
    return {"dynamic_img_size": True, "global_pool": "token"}
