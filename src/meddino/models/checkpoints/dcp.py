"""Sharded (torch.distributed.checkpoint) pretraining checkpoints: the format, its checks, and reading
tensors from one on a single process with no process group.

A sharded checkpoint is a folder ``checkpoint_<iteration>.dcp/`` that ``meddino pretrain`` writes with
``train.checkpoint_format=sharded`` (:mod:`meddino.pretrain.sharded`): DCP's ``.metadata`` and one
``__<rank>_0.distcp`` file per rank holding that rank's shards of student, teacher, Gram teacher and AdamW
state, then ``state.pt`` (RNG states, centres: rank 0) and last the completion marker :data:`MARKER`, which
also carries the teacher backbone's export description. The reading lives here, below the loader, so that
``meddino convert CKPT.dcp OUT`` and ``backbone=CKPT.dcp`` read it like any checkpoint.

DCP unpickles ``.metadata`` with plain ``pickle``; here it is read by an unpickler that rebuilds only
DCP's own metadata classes, ``torch.Size``, dtypes and paths, so a planted file cannot run code (the
shard files themselves are read by DCP with ``torch.load(weights_only=True)``). Non-tensor entries (DCP's
``BYTE_IO``, unpickled by DCP with ``weights_only=False``) are never read.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from meddino.errors import CheckpointError, first_line
from meddino.models.checkpoints.read import _torch_reason

MARKER = "meddino_checkpoint.json"
FORMAT = "meddino.pretrain.dcp"
STATE_FILE = "state.pt"
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")


class _MetadataUnpickler(pickle.Unpickler):
    """Only what DCP's ``Metadata`` is made of (seen in torch 2.14's files) may be rebuilt."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            (module in _DCP_MODULES and not name.startswith("__"))
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
            or (module == "torch.serialization" and name == "_get_layout")
            or (module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"))
            or (module == "collections" and name == "OrderedDict")
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refused to unpickle {module}.{name}")
        return super().find_class(module, name)


def safe_reader(path: Path) -> Any:
    """A DCP ``FileSystemReader`` for ``path`` whose ``.metadata`` is read by :class:`_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader  # why: DCP only when a folder is read

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            with open(Path(self.path) / ".metadata", "rb") as fh:
                metadata = _MetadataUnpickler(fh).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _Reader(str(path))


def failure_reason(exc: BaseException) -> str:
    """One line for a DCP failure: DCP gathers the ranks' exceptions into a ``CheckpointException`` (a
    ``BaseException``) whose text is their tracebacks; name the first rank and its own reason."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (inner, _) = sorted(failures.items(), key=lambda item: item[0])[0]
        return f"rank {rank}: {failure_reason(inner)}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _torch_reason(exc)[:160]  # torch.load's own reason for a shard, without its weights_only preamble


def dcp_errors() -> tuple[type[BaseException], ...]:
    """What a DCP save or load raises when a rank fails: any exception, or DCP's ``CheckpointException``."""
    from torch.distributed.checkpoint.api import CheckpointException  # why: DCP only when used

    return (Exception, CheckpointException)


def is_sharded_checkpoint(path: Path) -> bool:
    """A folder that is (or was meant to be) a sharded checkpoint: it holds DCP's ``.metadata`` or the marker."""
    path = Path(path)
    return path.is_dir() and ((path / ".metadata").exists() or (path / MARKER).exists() or path.suffix == ".dcp")


def check_sharded_checkpoint(path: Path) -> tuple[dict[str, Any], Any]:
    """(marker, DCP metadata) of a complete sharded checkpoint; an incomplete or damaged one (no marker, no
    or unreadable ``.metadata``, a shard file missing or shorter than the metadata says) is one line."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"sharded checkpoint not found: {path}")
    marker_path = path / MARKER
    if not marker_path.is_file():
        raise CheckpointError(f"{path}: incomplete sharded checkpoint (no {MARKER}: its write was interrupted); "
                              "resume from an earlier checkpoint")
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{marker_path}: unreadable ({first_line(exc)})") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a meddino sharded checkpoint ({MARKER} is not of format {FORMAT})")
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: damaged sharded checkpoint (no .metadata)")
    try:
        metadata = safe_reader(path).read_metadata()
        files = metadata.storage_data
        entries = metadata.state_dict_metadata
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign pickle raises anything
        raise CheckpointError(f"{path}: damaged sharded checkpoint (.metadata unreadable: {first_line(exc)})") from None
    needed: dict[str, int] = {}
    for info in files.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), int(info.offset) + int(info.length))
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f"{path}: damaged sharded checkpoint (shard file {name} is missing)")
        if shard.stat().st_size < size:
            raise CheckpointError(f"{path}: damaged sharded checkpoint (shard file {name} has "
                                  f"{shard.stat().st_size} bytes, the metadata needs {size})")
    if not entries:
        raise CheckpointError(f"{path}: damaged sharded checkpoint (.metadata lists no tensors)")
    return marker, metadata


def section_keys(metadata: Any, section: str) -> dict[str, str]:
    """{flattened DCP key: the key inside ``section``} for the tensors saved under top-level ``section``
    (``student``, ``teacher``, ``gram_teacher``; ``optimizer`` gives ``state.<param>.<name>`` paths)."""
    out = {}
    for flat, parts in (metadata.planner_data or {}).items():
        if parts and parts[0] == section:
            out[flat] = ".".join(str(p) for p in parts[1:])
    return out


def read_tensors(path: Path, section: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The full (unsharded) CPU tensors saved under ``section`` whose names start with ``prefix``, read on
    this process alone (no process group: DCP's ``no_dist`` load, which reassembles every shard)."""
    import torch.distributed.checkpoint as dcp  # why: DCP only when a folder is read
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    _, metadata = check_sharded_checkpoint(path)
    keys = {flat: name for flat, name in section_keys(metadata, section).items() if name.startswith(prefix)}
    template: dict[str, torch.Tensor] = {}
    for flat, name in keys.items():
        md = metadata.state_dict_metadata[flat]
        if not isinstance(md, TensorStorageMetadata):
            continue
        template[name] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    if not template:
        raise CheckpointError(f"{path}: no '{section}' tensors{f' under {prefix!r}' if prefix else ''} in the "
                              "sharded checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load({section: template}, storage_reader=safe_reader(path), no_dist=True)
    except dcp_errors() as exc:
        raise CheckpointError(f"{path}: cannot read the sharded checkpoint ({failure_reason(exc)})") from None
    return template
