"""Reading checkpoint files and telling their format, before any key is renamed.

Its own module so that :mod:`meddino.models.factory` (weights for ``timm:<name>@file``) and
:mod:`meddino.models.hf` can read files without importing the loader, which builds models through the
factory: the reading sits below both. Pickled files are read with ``weights_only=True`` only.
"""

from __future__ import annotations

import argparse
import io
import json
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any

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
        return _torch_load(path)
    except Exception as exc:  # the weights-only unpickler raises anything (IndexError, KeyError...) on junk
        failure = exc
    if _looks_like_safetensors(path):  # safetensors under another suffix
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
    raise _unreadable(path, failure)


def _torch_load(path: Path) -> Any:
    """torch.load(weights_only=True) without torch's warnings: a refusal is reported in one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4 ... weights_only Unpickler ..."
        # DINOv1 full checkpoints store their argparse.Namespace: plain data, safe to rebuild
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors header: a little-endian u64 length that fits the file, then a JSON object."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size <= path.stat().st_size - 8 and head[8:9] == b"{"


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    """Why torch.load failed, told from the bytes: not a checkpoint at all, a pickle that would call code
    (named), or a torch file torch cannot read (its own reason)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return CheckpointError(f"{path}: not a readable checkpoint (a zip archive cut short or damaged, "
                               "e.g. by an interrupted download or copy)")
    found = _foreign_globals(path)
    if found is None:
        what = "a zip archive, but not one torch.save wrote" if head == b"PK\x03\x04" else (
            "neither a torch zip/pickle nor safetensors")
        return CheckpointError(f"{path}: not a readable checkpoint ({what})")
    if found:
        return CheckpointError(
            f"{path}: refused to unpickle, the file holds objects that could run code (it calls "
            f"{', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); "
            "re-save only its tensors (state_dict) or export it as safetensors with a trusted tool"
        )
    what = "torch.load" if head == b"PK\x03\x04" else "a pickle that torch.load cannot read"
    return CheckpointError(f"{path}: not a readable checkpoint ({what}: {_torch_reason(exc)})")


def _torch_reason(exc: BaseException) -> str:
    """torch's own reason without its boilerplate (the weights_only preamble, the issue/doc pointers)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch 2.6")
    for line in str(exc).splitlines():
        line = line.strip()
        if line and not line.startswith(boilerplate):
            return line.removeprefix("WeightsUnpickler error: ")[:200]
    return first_line(exc)


def _foreign_globals(path: Path) -> list[str] | None:
    """The globals outside torch's weights-only allowlist that the file's pickles reference (what an
    unpickler would import and call), or None when the file holds no well-formed pickle. Parsed with
    pickletools, which runs nothing."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)  # <archive>/data.pkl
                if name is None:
                    return None
                found = _pickle_globals(io.BytesIO(archive.read(name)))
        else:
            with open(path, "rb") as fh:
                found = _pickle_globals(_Bounded(fh, path.stat().st_size))
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return None
    if found is None:
        return None
    allowed = _allowed_globals()
    return list(dict.fromkeys(g for g in found if g not in allowed))


_GLOBAL_NAME = re.compile(r"^[A-Za-z_][\w.]* [A-Za-z_][\w.]*$")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _pickle_globals(fh: IO[bytes] | _Bounded) -> list[str] | None:
    """'module.name' of every GLOBAL / STACK_GLOBAL / INST in the consecutive pickles at the start of
    ``fh`` (a torch legacy file holds several, then raw storages); None when the first is not a pickle."""
    found: list[str] = []
    for count in range(8):
        try:
            names = _one_pickle_globals(fh)
        except Exception:  # not (or no more) pickle: pickletools raises ValueError, UnicodeDecodeError...
            names = None
        if names is None:
            return None if count == 0 else found
        found.extend(names)
    return found


def _one_pickle_globals(fh: IO[bytes] | _Bounded) -> list[str] | None:
    names: list[str] = []
    memo: dict[int, Any] = {}
    recent: list[Any] = []  # values pushed lately (strings, else None): the STACK_GLOBAL operands
    first = True
    stopped = False
    for op, arg, _pos in pickletools.genops(fh):
        if first and op.name != "PROTO" and op.name not in _STRING_OPS | {"GLOBAL", "INST", "MARK"}:
            return None
        first = False
        if op.name in ("GLOBAL", "INST"):
            if not _GLOBAL_NAME.match(str(arg)):
                return None
            names.append(str(arg).replace(" ", "."))
            recent.append(None)
        elif op.name == "STACK_GLOBAL":
            module, name = ([None, None] + recent)[-2:]
            names.append(f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else "<unknown>")
            recent.append(None)
        elif op.name in _STRING_OPS:
            recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = recent[-1] if recent else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            recent.append(memo.get(int(arg)))
        elif op.name == "STOP":
            stopped = True
        elif op.name not in ("FRAME", "PROTO"):
            recent.append(None)
        recent = recent[-2:]
    return names if stopped else None


class _Bounded:
    """A file for pickletools that never reads past its end: a random length field must not allocate."""

    def __init__(self, fh: IO[bytes], size: int):
        self.fh, self.size = fh, size

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.fh.tell()
        return self.fh.read(left if n < 0 else min(n, left))

    def readline(self, limit: int = -1) -> bytes:
        return self.fh.readline(1 << 16)

    def tell(self) -> int:
        return self.fh.tell()


def _allowed_globals() -> set[str]:
    """What torch.load(weights_only=True) rebuilds: its allowlist, the registered safe globals and
    argparse.Namespace (allowed by :func:`read_checkpoint` for DINOv1)."""
    allowed = {"argparse.Namespace", "collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
               "torch._utils._rebuild_parameter"}
    unpickler = getattr(torch, "_weights_only_unpickler", None)
    from_torch = getattr(unpickler, "_get_allowed_globals", None)  # private: may go away
    if from_torch is not None:
        allowed.update(from_torch())
    for obj in torch.serialization.get_safe_globals():
        obj = obj[0] if isinstance(obj, tuple) else obj
        allowed.add(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
    return allowed


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


def detect_layout(state: dict[str, torch.Tensor], path: Path | str | None = None) -> str:
    """'hf' | 'official_v3' | 'timm_eva' | 'official_v2' | 'timm_vit' from the key names; ``path`` only
    names the file in the refusal."""
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
    raise CheckpointError(_not_a_vit(state, path))


def _not_a_vit(state: dict[str, torch.Tensor], path: Path | str | None) -> str:
    """The refusal of a state dict no ViT layout matches: what was found instead, with example keys."""
    where = f"{path}: " if path is not None else ""
    convs = [k for k, v in state.items() if v.ndim == 4]
    if convs:
        return (f"{where}not a ViT checkpoint: a CNN state dict (keys like {', '.join(convs[:2])}); "
                "a timm CNN's weights load as an eval baseline with backbone=timm:<name>@FILE")
    keys = ", ".join(sorted(state)[:3]) + (", ..." if len(state) > 3 else "")
    return f"{where}unrecognised checkpoint layout: no ViT patch embedding or blocks (keys: {keys})"


def export_sidecar(path: Path) -> dict[str, Any] | None:
    """The JSON sidecar of a meddino export (file ``X.safetensors`` + ``X.json``, or a folder with
    ``backbone.json``, or a model folder of ``meddino export folder`` with ``model.json``), with
    ``_weights`` set to the weights file; None when ``path`` is no export."""
    candidates = [path.with_suffix(".json")] if path.is_file() else [path / "backbone.json", path / "model.json"]
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
