"""Writing the meddino export: the backbone's weights in timm's key layout as safetensors + a JSON sidecar.

Separate from loading because it needs no reader or converter, only the module; reading an export back is
:func:`meddino.models.checkpoints.load.load_backbone` (the sidecar is found by
:func:`meddino.models.checkpoints.read.export_sidecar`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save
from torch import nn

from meddino.models.backbone import Backbone, CNNBackbone
from meddino.models.checkpoints.read import EXPORT_FORMAT
from meddino.runlog import atomic_path, write_json


def export_backbone(module: nn.Module, path: str | Path) -> Path:
    """Write ``path`` (.safetensors, timm key layout) and a JSON sidecar describing the architecture.

    Plain timm reads it: ``m = timm.create_model(j["timm_name"], num_classes=0, **j["timm_kwargs"]);
    m.load_state_dict(safetensors.torch.load_file(path))`` (and, when ``j["norm_eps"]`` is set, that eps on
    every LayerNorm, as for Hugging Face DINOv1 ports). Both files are written atomically. The JSON also
    records ``pos_embed_resample``, the mode meddino resamples position embeddings in when an input's grid
    differs from the stored one; plain timm resamples in its own (``timm``) mode, so it reproduces meddino's
    features exactly at the stored size, or everywhere when the mode is ``timm``.
    """
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
    meta = export_meta(module, path.name, mask_token)
    arch = module.arch
    data = save(state, metadata={"format": EXPORT_FORMAT, "arch": json.dumps(arch, sort_keys=True)})
    with atomic_path(path) as tmp:
        tmp.write_bytes(sorted_header(data))
    write_json(path.with_suffix(".json"), meta)
    return path


def export_meta(module: nn.Module, weights: str, mask_token: list[float] | None) -> dict[str, Any]:
    """The JSON sidecar of an export of ``module`` whose weights file is ``weights`` (also the description
    a sharded pretraining checkpoint keeps of its teacher backbone, :mod:`.dcp`)."""
    arch = module.arch
    timm_kwargs = dict(arch.get("kwargs", {}))
    norm_eps = timm_kwargs.pop("norm_eps", None)  # not a timm option: applied to every LayerNorm on load
    pos_embed_resample = timm_kwargs.pop("pos_embed_resample", None)  # meddino's, not timm's
    return {
        "format": EXPORT_FORMAT,
        "format_version": 1,
        "timm_name": arch["timm_name"],
        "version": arch["version"],
        "timm_kwargs": {**timm_kwargs, **_timm_defaults_note()},
        "norm_eps": norm_eps,
        "pos_embed_resample": pos_embed_resample,
        "embed_dim": module.embed_dim,
        "patch_size": module.patch_size,
        "weights": weights,
        "mask_token": mask_token,
    }


def sorted_header(data: bytes) -> bytes:
    """A safetensors file with its JSON header's keys in sorted order, so the same weights always give the
    same bytes (safetensors writes the header from a hash map, in an order that changes from process to
    process). The tensor data and the offsets into it are unchanged; the header is padded with spaces to a
    multiple of 8 bytes, as safetensors pads it."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def _timm_defaults_note() -> dict[str, Any]:
    # the options meddino always builds with, so plain timm rebuilds the same module
    return {"dynamic_img_size": True, "global_pool": "token"}
