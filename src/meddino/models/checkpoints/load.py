"""Loading any supported checkpoint into a backbone: read, convert, build, load strictly, report.

The top of the checkpoint code (:mod:`~meddino.models.checkpoints.read` <- :mod:`~.convert` /
:mod:`meddino.models.hf` <- this module, which builds through :mod:`meddino.models.factory`), so nothing
below it imports it back. :func:`load_backbone` reads, detecting the format:

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

import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meddino.errors import CheckpointError
from meddino.models.archs import resolve_arch
from meddino.models.backbone import Backbone
from meddino.models.checkpoints.convert import infer_arch, official_v2_to_timm, official_v3_to_timm, pop_ignored
from meddino.models.checkpoints.dcp import check_sharded_checkpoint, is_sharded_checkpoint, read_tensors
from meddino.models.checkpoints.read import detect_layout, export_sidecar, read_checkpoint, unwrap_state_dict
from meddino.models.checkpoints.strict import load_into_strict
from meddino.models.factory import build_backbone, build_from_timm, build_timm_backbone
from meddino.models.hf import hf_state_to_timm, load_hf_folder
from meddino.models.pos_embed import default_mode, resample_pos_embed


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


_announced: set[str] = set()  # the load reports printed in this process (one line per checkpoint)
_quiet = False


def announce(report: LoadReport) -> None:
    """Print a checkpoint's load report on stderr, once per checkpoint and process: a verb (or the demo,
    which runs many in one process) that resolves the same backbone several times says it once."""
    key = f"{report.path}|{report.summary()}"
    if _quiet or key in _announced:
        return
    _announced.add(key)
    print(report.summary(), file=sys.stderr)


@contextlib.contextmanager
def quiet_load_reports() -> Iterator[None]:
    """No load reports inside the block (the demo loads only the checkpoints it wrote or ships)."""
    global _quiet
    before, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = before


def _check_against_arch(arch: str, inferred: dict[str, Any], version: str, path: Path) -> dict[str, Any]:
    """The user named an architecture: the checkpoint must agree on everything the tensors tell."""
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


def _export_geometry(backbone: Backbone) -> dict[str, Any]:
    """What :func:`_check_against_arch` compares, read off a loaded export."""
    return {"patch_size": backbone.patch_size, "embed_dim": backbone.embed_dim, "depth": backbone.depth,
            "reg_tokens": backbone.num_registers, "img_size": backbone.img_size}


def _resample_pos_embed(state: dict[str, torch.Tensor], backbone: Backbone) -> tuple[int, int] | None:
    """Resample ``pos_embed`` once to the module's grid in the backbone's mode (CLS position unchanged).

    Only for ``resize_pos_embed=True``: by default the module is built at the stored grid. With mode
    ``timm`` this is exactly timm's own checkpoint filter.
    """
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
    path_str = str(path)
    if key is None and "#" in path_str and not Path(path_str).exists():
        path_str, key = path_str.rsplit("#", 1)
    path = Path(path_str).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")

    if is_sharded_checkpoint(path):  # meddino pretrain's train.checkpoint_format=sharded folder
        backbone = _load_sharded(path, key, img_size, drop_path_rate, verbose, pos_embed_resample, resize_pos_embed)
        if arch is not None:
            _check_against_arch(arch, _export_geometry(backbone), backbone.version, path)
        return backbone
    sidecar = export_sidecar(path)
    if sidecar is not None:
        backbone = _load_export(path, sidecar, img_size, drop_path_rate, verbose, pos_embed_resample,
                                resize_pos_embed)
        if arch is not None and sidecar.get("version") != "cnn":  # an export must match a named arch too
            _check_against_arch(arch, _export_geometry(backbone), backbone.version, path)
        return backbone
    state, layout, hints, ignored, swiglu = _timm_state(path, key)
    family = "eva" if (layout in ("official_v3", "timm_eva") or hints.get("family") == "eva") else "vit"
    timm_name, version, kwargs = infer_arch(state, family, swiglu or hints.get("swiglu", False))
    kwargs.update(hints.get("kwargs", {}))
    if arch is not None:
        kwargs.update(_check_against_arch(arch, kwargs, version, path))
        timm_name = resolve_arch(arch).timm_name
    kwargs.update(overrides)
    stored_size, kept = _grid_options(kwargs, family, version, img_size, resize_pos_embed, pos_embed_resample)
    backbone = build_from_timm(timm_name, version, kwargs, drop_path_rate)
    mask_token = state.pop("mask_token", None)
    resampled = _resample_pos_embed(state, backbone) if stored_size != kwargs["img_size"] else None
    load_into_strict(backbone.vit, state, path)
    if mask_token is not None:
        _set_mask_token(backbone, mask_token, path)
    backbone.load_report = LoadReport(str(path), hints.get("layout", layout), ignored, resampled, kept,
                                      backbone.pos_embed_resample)
    if verbose:
        announce(backbone.load_report)
    return backbone


def _timm_state(
    path: Path, key: str | None
) -> tuple[dict[str, torch.Tensor], str, dict[str, Any], list[str], bool]:
    """The checkpoint at ``path`` in timm's key layout: (state, detected layout, Hugging Face hints,
    ignored training-only keys, whether the MLP is SwiGLU)."""
    if path.is_dir():
        state, layout, hints = load_hf_folder(path)
    else:
        state = unwrap_state_dict(read_checkpoint(path), path, key)
        layout = detect_layout(state, path)
        hints = {}
        if layout == "hf":
            state, hints = hf_state_to_timm(state, None)
    state = dict(state)
    ignored = list(hints.get("ignored", [])) + pop_ignored(state)
    swiglu = False
    if layout == "official_v2":
        state, swiglu = official_v2_to_timm(state)
    elif layout == "official_v3":
        state = official_v3_to_timm(state)
    return state, layout, hints, ignored, swiglu


def _grid_options(
    kwargs: dict[str, Any],
    family: str,
    version: str,
    img_size: int | None,
    resize_pos_embed: bool,
    pos_embed_resample: str | None,
) -> tuple[int | None, tuple[int, int] | None]:
    """Set ``img_size`` and ``pos_embed_resample`` in the build ``kwargs``; returns (the stored image
    size, None for RoPE; the stored grid kept instead of ``img_size``, or None)."""
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
    return stored_size, kept


def _set_mask_token(backbone: Backbone, value: torch.Tensor, path: Path) -> None:
    value = value.reshape(1, -1)
    if value.shape != backbone.mask_token.shape:
        raise CheckpointError(f"{path}: mask_token has shape {tuple(value.shape)}, expected {tuple(backbone.mask_token.shape)}")
    with torch.no_grad():
        backbone.mask_token.copy_(value)


def _load_export(
    path: Path,
    meta: dict[str, Any],
    img_size: int | None,
    drop_path_rate: float,
    verbose: bool = False,
    pos_embed_resample: str | None = None,
    resize_pos_embed: bool = False,
    state: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A meddino export (``meta``: its JSON sidecar) -> module, as :func:`load_backbone` builds it
    (``state``: its weights already read, from a sharded checkpoint)."""
    weights = Path(meta["_weights"])
    if state is None:
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
    layout = "meddino sharded checkpoint" if weights.is_dir() else "meddino export"
    backbone.load_report = LoadReport(str(weights), layout, [], resampled, kept, backbone.pos_embed_resample)
    if verbose:
        announce(backbone.load_report)
    return backbone


def _load_sharded(
    path: Path,
    key: str | None,
    img_size: int | None,
    drop_path_rate: float,
    verbose: bool,
    pos_embed_resample: str | None,
    resize_pos_embed: bool,
) -> nn.Module:
    """The teacher (or ``key=student``) backbone of a sharded pretraining checkpoint, read on this process
    alone: only that backbone's tensors are read, built from the export description in its marker."""
    marker, _ = check_sharded_checkpoint(path)
    section = key or "teacher"
    if section not in ("teacher", "student"):
        raise CheckpointError(f"{path}: key={section}: a sharded pretraining checkpoint holds the backbones "
                              "'teacher' (default) and 'student'")
    meta = marker.get("backbone")
    if not isinstance(meta, dict) or "timm_name" not in meta:
        raise CheckpointError(f"{path}: its marker describes no backbone (written by another meddino version?)")
    tensors = read_tensors(path, section, "backbone.")
    state = {k[len("backbone.vit."):]: v for k, v in tensors.items() if k.startswith("backbone.vit.")}
    meta = {**meta, "_weights": str(path), "mask_token": None}
    backbone = _load_export(path, meta, img_size, drop_path_rate, False, pos_embed_resample, resize_pos_embed,
                            state=state)
    if "backbone.mask_token" in tensors:
        _set_mask_token(backbone, tensors["backbone.mask_token"], path)
    if verbose:
        announce(backbone.load_report)
    return backbone
