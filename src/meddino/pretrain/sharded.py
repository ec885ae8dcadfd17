"""Sharded training checkpoints through torch.distributed.checkpoint (``train.checkpoint_format=sharded``).

Under FSDP2 the full format (:mod:`meddino.pretrain.checkpoint`) gathers every tensor (student, teachers,
AdamW moments) onto rank 0 to ``torch.save`` them; here each rank writes only its own shards with
``dcp.save``, as the DINOv3 trainer checkpoints its FSDP runs, so no process ever holds a whole ViT-g
training state. The folder ``checkpoints/checkpoint_<iteration>.dcp/`` holds:

- DCP's ``.metadata`` and ``__<rank>_0.distcp`` files: tensors only, under ``student``, ``teacher``,
  ``gram_teacher`` (when on) and ``optimizer.state`` (the AdamW ``step``, ``exp_avg``, ``exp_avg_sq`` per
  parameter name; the parameter groups are rebuilt from the config, their lr and weight decay are set from
  the schedules every step);
- ``state.pt`` (rank 0, ``torch.load(weights_only=True)``): the RNG states of every rank, the DINO and iBOT
  centres (identical on every rank: all-reduced) and the unreadable files met so far;
- last, the marker ``meddino_checkpoint.json``: iteration, method version, world size, FSDP setting, Gram
  refresh count, the parameters that have AdamW state, and the teacher backbone's export description
  (what ``meddino convert CKPT.dcp OUT`` builds). The data order needs nothing: it is a pure function of
  (seed, iteration) (:class:`meddino.pretrain.data.StepBatchSampler`).

Atomic like the full format: every rank writes into ``.checkpoint_<iteration>.dcp.tmp/``, rank 0 adds
``state.pt`` and the marker once ``dcp.save`` returned on all ranks (its final collective), then renames the
folder. A folder without its marker is never resumed from and is removed at the next start. The checkpoint
folder must be on a file system every node sees (DCP's ``FileSystemWriter``).

Resume is strict: every tensor this run's student, teachers and optimiser hold must be in the checkpoint
with the same shape and dtype, and the checkpoint may hold nothing else, except that AdamW state exists
only for the parameters the marker lists (a parameter that never had a gradient, e.g. DINOv1's frozen
prototypes during ``freeze_last_layer``, has none, exactly as in the uninterrupted run).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meddino.errors import CheckpointError, first_line
from meddino.models.checkpoints.dcp import (
    FORMAT,
    MARKER,
    STATE_FILE,
    check_sharded_checkpoint,
    dcp_errors,
    failure_reason,
    safe_reader,
)
from meddino.pretrain.checkpoint import (
    Resumed,
    check_same_run_kind,
    drop_unsaved_optimizer_state,
    latest_checkpoint,
    prune,
    rng_state,
)
from meddino.pretrain.distributed import all_gather_object, broadcast_object, refuse_load_mismatch
from meddino.runlog import atomic_path, write_json


def sharded_path(folder: Path, iteration: int) -> Path:
    return Path(folder) / f"checkpoint_{iteration:08d}.dcp"


def temp_path(folder: Path, iteration: int) -> Path:
    """The folder every rank writes into before rank 0 renames it (one name all nodes agree on)."""
    return Path(folder) / f".checkpoint_{iteration:08d}.dcp.tmp"


def model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as DCP saves it (DTensor shards under FSDP2, the live tensors otherwise),
    without the alias names of a module registered twice (the shared DINO/iBOT head)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict  # why: DCP only here

    canonical = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    return {k: v for k, v in get_model_state_dict(module).items() if k in canonical}


def _tensor_state(student: nn.Module, objective: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What DCP writes / reads: tensors only (a collective under FSDP2 for the optimiser's layout)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict  # why: DCP only here

    state: dict[str, Any] = {"student": model_state(student), "teacher": model_state(objective.teacher)}
    if objective.gram_teacher is not None:
        state["gram_teacher"] = model_state(objective.gram_teacher)
    optim = get_optimizer_state_dict(student, optimizer)
    state["optimizer"] = {"state": {name: dict(values) for name, values in optim["state"].items()}}
    return state


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """DCP's flattened keys (the path joined with dots) -> tensor."""
    out: dict[str, torch.Tensor] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def save_sharded(
    folder: Path,
    iteration: int,
    student: nn.Module,
    objective: Any,
    optimizer: torch.optim.Optimizer,
    *,
    is_main: bool,
    world_size: int,
    fsdp: bool,
    version: str,
    skipped: dict[str, str],
    backbone: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint ``iteration`` as a DCP folder (see module docstring): a collective, every rank calls
    it; a failed write on any rank is one line on every rank naming the previous checkpoint."""
    import torch.distributed.checkpoint as dcp  # why: DCP only when writing one

    folder = Path(folder)
    final, tmp = sharded_path(folder, iteration), temp_path(folder, iteration)
    rng = all_gather_object(rng_state())
    state = _tensor_state(student, objective, optimizer)
    error = ""
    if is_main:
        try:
            if tmp.exists():  # left by a killed write of the same iteration
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        except OSError as exc:
            error = f"{tmp}: {exc.strerror or first_line(exc)}"
    error = broadcast_object(error)
    if not error:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the single-process notice of a run without a process group
                dcp.save(state, checkpoint_id=str(tmp))
        except dcp_errors() as exc:  # every rank gets every rank's failure
            error = failure_reason(exc)
    if is_main and not error:
        try:
            with atomic_path(tmp / STATE_FILE) as f:
                torch.save({"rng": rng, "center": objective.center.detach().cpu(),
                            "ibot_center": objective.ibot_center.detach().cpu(),
                            "skipped": [[k, v] for k, v in sorted(skipped.items())]}, f)
            write_json(tmp / MARKER, {
                "format": FORMAT, "iteration": iteration, "version": version, "world_size": world_size,
                "fsdp": fsdp, "gram_refreshes": objective.gram_refreshes,
                "optimizer_params": sorted(state["optimizer"]["state"]), "backbone": backbone,
            })
            if final.exists():  # a rerun with --force over an older run's checkpoint
                shutil.rmtree(final)
            os.replace(tmp, final)
        except (OSError, RuntimeError) as exc:
            error = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc, 160)
    error = next((e for e in all_gather_object(error) if e), "")  # a failure on any rank stops every rank
    if error:
        previous = latest_checkpoint(folder)
        raise CheckpointError(
            f"cannot write checkpoint {final} ({error}; is the disk full or a file-size limit set?); "
            f"the previous checkpoint is intact: {previous if previous else 'none written yet'}"
        )
    if is_main:
        prune(folder, keep_last)
    broadcast_object(None)  # the others wait until the folder is renamed and pruned
    return final


def restore_sharded(
    path: Path,
    student: nn.Module,
    objective: Any,
    optimizer: torch.optim.Optimizer,
    *,
    sharded: bool,
    version: str,
    rank: int,
    world_size: int,
) -> Resumed:
    """Load sharded checkpoint ``path`` into student, teachers, centres and optimiser, every rank reading
    its own shards (a collective); refused in one line when incomplete, damaged, or of another method
    version, FSDP setting or architecture."""
    import torch.distributed.checkpoint as dcp  # why: DCP only when reading one
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    marker, metadata = check_sharded_checkpoint(path)
    check_same_run_kind(marker, path, version, sharded)
    state = _tensor_state(student, objective, optimizer)
    stepped = set(marker.get("optimizer_params", []))
    unknown = sorted(stepped - set(state["optimizer"]["state"]))
    state["optimizer"]["state"] = {k: v for k, v in state["optimizer"]["state"].items() if k in stepped}
    ours = _flat(state)
    saved = metadata.state_dict_metadata
    missing = sorted(set(ours) - set(saved))
    unexpected = sorted(set(saved) - set(ours)) + [f"optimizer.state.{k}" for k in unknown]
    wrong = [k for k, t in ours.items() if k in saved and (
        not isinstance(saved[k], TensorStorageMetadata) or tuple(saved[k].size) != tuple(t.shape)
        or saved[k].properties.dtype != t.dtype)]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what} {names[:2]}{' ...' if len(names) > 2 else ''}" for what, names in
                           (("missing", missing), ("unexpected", unexpected), ("other shape or dtype", wrong)) if names)
        raise CheckpointError(f"resume: {path} does not match this config ({detail})")
    try:
        small = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is one user-facing line
        raise CheckpointError(f"resume: {path / STATE_FILE} unreadable ({first_line(exc, 160)})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the single-process notice of a run without a process group
            dcp.load(state, storage_reader=safe_reader(path))
    except dcp_errors() as exc:
        raise CheckpointError(f"resume: cannot read {path} ({failure_reason(exc)})") from None
    # the tensors were loaded in place (the state dicts hold the modules' own parameters and shards); the
    # set_* calls below also cover what a state dict holds as a copy. strict=False only because the alias
    # names of the shared head are left out (model_state); any other key missing or extra is refused
    modules = [("student", student), ("teacher", objective.teacher)]
    if objective.gram_teacher is not None:
        modules.append(("gram_teacher", objective.gram_teacher))
    with torch.no_grad():
        for name, module in modules:
            result = set_model_state_dict(module, state[name], options=StateDictOptions(strict=False))
            refuse_load_mismatch(result, set(state[name]), f"resume: {path} ({name})")
    groups = get_optimizer_state_dict(student, optimizer)["param_groups"]
    set_optimizer_state_dict(student, optimizer, {"state": state["optimizer"]["state"], "param_groups": groups},
                             options=StateDictOptions(strict=False))
    drop_unsaved_optimizer_state(student, optimizer, stepped)
    objective.center.copy_(small["center"])
    objective.ibot_center.copy_(small["ibot_center"])
    objective.gram_refreshes = int(marker.get("gram_refreshes", 0))
    rng = small.get("rng") or []
    mine = rng[rank] if int(marker.get("world_size", 1)) == world_size and len(rng) == world_size else None
    return Resumed(int(marker["iteration"]), {str(k): str(v) for k, v in small.get("skipped", [])}, mine)
