"""Training checkpoints: atomic writes, keep the last K, find the latest, weights_only loading.

A checkpoint is ``OUT/checkpoints/checkpoint_<iteration>.pt`` written with ``torch.save`` through a temp
file + rename (a killed run never leaves a half-written file under the final name). It holds only tensors,
numbers, strings, lists and dicts, so ``torch.load(weights_only=True)`` reads it: no pickle of arbitrary
objects. Beside it the teacher backbone is exported (``teacher_backbone_<iteration>.safetensors`` + JSON)
so any checkpoint's features can be evaluated without the training state.

The training state itself (:func:`training_state`, written by the engine's ``save``) and the resume that
reads it back into student, teachers, centres and optimiser (:func:`restore_training_state`, with
:func:`resume_path` choosing the file and :func:`truncate_metrics` dropping the rows logged after it) live
here too, so :mod:`meddino.pretrain.engine` only orchestrates them. The sharded format
(``checkpoint_<iteration>.dcp/`` folders, ``train.checkpoint_format=sharded``) is written and read by
:mod:`meddino.pretrain.sharded`; listing, pruning and the removal of interrupted writes here cover both.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from meddino.errors import CheckpointError, ConfigError
from meddino.models.checkpoints.dcp import MARKER
from meddino.pretrain.distributed import all_gather_object, full_state_dict, load_full_state_dict
from meddino.runlog import atomic_path, atomic_write, read_metrics

_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")
_SHARDED = re.compile(r"^checkpoint_(\d+)\.dcp$")
_SHARDED_TEMP = re.compile(r"^\.checkpoint_\d+\.dcp\.tmp$")
_EXPORT = re.compile(r"^teacher_backbone_(\d+)\.(safetensors|json)$")
# the temp files of runlog.atomic_write/atomic_path (".NAME.<8 random chars><suffix>") for the files a run
# writes into its folder and checkpoints/: a kill during a write leaves one behind
_TEMP = re.compile(r"^\.(checkpoint_\d+\.pt|teacher_backbone(_\d+)?\.(safetensors|json)|config\.yaml|"
                   r"metrics\.jsonl|results\.json)\.[A-Za-z0-9_]{8}(\.pt|\.safetensors|\.json|\.tmp)$")


def checkpoint_path(folder: Path, iteration: int) -> Path:
    return Path(folder) / f"checkpoint_{iteration:08d}.pt"


def export_path(folder: Path, iteration: int) -> Path:
    return Path(folder) / f"teacher_backbone_{iteration:08d}.safetensors"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every complete checkpoint in ``folder``, oldest first: ``.pt`` files and
    ``.dcp`` folders that hold their completion marker."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
        m = _SHARDED.match(p.name)
        if m and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    items = list_checkpoints(folder)
    return items[-1][1] if items else None


def save_checkpoint(folder: Path, iteration: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``state`` atomically as checkpoint ``iteration`` and delete all but the ``keep_last`` newest
    (their teacher exports too)."""
    path = checkpoint_path(folder, iteration)
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as exc:  # torch's writer reports a full disk as a RuntimeError
        previous = latest_checkpoint(folder)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:160]
        raise CheckpointError(
            f"cannot write checkpoint {path} ({reason}; is the disk full or a file-size limit set?); "
            f"the previous checkpoint is intact: {previous if previous else 'none written yet'}"
        ) from None
    prune(folder, keep_last)
    return path


def prune(folder: Path, keep_last: int) -> None:
    """Keep the ``keep_last`` newest checkpoints, and the teacher exports of exactly those: an export whose
    checkpoint is gone (pruned, or never completed because the run was killed in between) goes too."""
    folder = Path(folder)
    items = list_checkpoints(folder)
    for _, p in items[: max(len(items) - keep_last, 0)]:
        remove_checkpoint(p)
    kept = {it for it, _ in list_checkpoints(folder)}
    for p in folder.iterdir():
        m = _EXPORT.match(p.name)
        if m and int(m.group(1)) not in kept:
            p.unlink(missing_ok=True)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint file or sharded folder; a folder loses its marker first, so a kill halfway
    leaves an incomplete folder that is never resumed from (and is removed at the next start)."""
    path = Path(path)
    if path.is_dir():
        (path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temp_files(*folders: Path) -> list[Path]:
    """Delete what a killed write left in a run's folders (nothing else: only the temp names of the files
    a pretraining run writes, the temp folders of sharded checkpoints and sharded checkpoint folders
    without their completion marker); returns what was removed."""
    removed = []
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for p in Path(folder).iterdir():
            if _TEMP.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
            elif p.is_dir() and (_SHARDED_TEMP.match(p.name)
                                 or (_SHARDED.match(p.name) and not (p / MARKER).is_file())):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def load_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` onto the CPU; unreadable files fail with one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is one user-facing line
        raise CheckpointError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or "iteration" not in state or "student" not in state:
        raise CheckpointError(f"{path} is not a meddino pretraining checkpoint")
    return state


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) RNG states as weights_only-safe values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npv = state["numpy"]
    np.random.set_state((npv[0], npv[1].numpy().astype(np.uint32), npv[2], npv[3], npv[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------- training state
def resume_path(resume: str | None, ckpt_dir: Path, out: Path) -> Path | None:
    """The checkpoint a run resumes from: none for ``resume`` None (refused when ``ckpt_dir`` already holds
    checkpoints), the newest for ``auto`` (none yet: start fresh), else the given path."""
    if resume is None:
        if latest_checkpoint(ckpt_dir) is not None:
            raise ConfigError(
                f"out: {out} already holds checkpoints; continue with resume=auto or choose another out"
            )
        return None
    if resume == "auto":
        return latest_checkpoint(ckpt_dir)  # none yet: start fresh
    return Path(resume).expanduser()


def truncate_metrics(path: Path, iteration: int | None) -> None:
    """On resume, drop the rows a killed run logged after its last checkpoint (they are logged again);
    ``None`` (a fresh start, e.g. ``resume=auto`` before any checkpoint): drop every row."""
    if not path.exists():
        return
    if iteration is None:
        path.unlink()
        return
    rows = [r for r in read_metrics(path) if int(r.get("step", 0)) <= iteration]
    with atomic_write(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def training_state(
    iteration: int,
    student: nn.Module,
    objective: Any,
    optimizer: torch.optim.Optimizer,
    *,
    sharded: bool,
    world_size: int,
    version: str,
    skipped: dict[str, str],
) -> dict[str, Any]:
    """Everything a bit-identical resume needs, as weights_only-safe values. A collective (RNG gather,
    FSDP gathers): every rank calls it."""
    rng = all_gather_object(rng_state())
    gram = objective.gram_teacher
    if sharded:
        # FSDP2 only, like the DCP imports of meddino.pretrain.distributed (absent in torch builds
        # without distributed support)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optim_state = get_optimizer_state_dict(
            student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    else:
        optim_state = optimizer.state_dict()
    return {
        "format": "meddino.pretrain",
        "iteration": iteration,
        "world_size": world_size,
        "version": version,
        "fsdp": sharded,
        "student": full_state_dict(student, sharded),
        "teacher": full_state_dict(objective.teacher, sharded),
        "gram_teacher": full_state_dict(gram, sharded) if gram is not None else None,
        "center": objective.center.detach().cpu(),
        "ibot_center": objective.ibot_center.detach().cpu(),
        "gram_refreshes": objective.gram_refreshes,
        "optimizer": optim_state,
        "rng": rng,
        "skipped": [[k, v] for k, v in sorted(skipped.items())],
    }


@dataclass
class Resumed:
    """What a resume hands back to the engine besides the restored modules and optimiser."""

    iteration: int
    skipped: dict[str, str]
    rng: dict[str, Any] | None  # this rank's RNG state; None when the number of processes changed


def check_same_run_kind(saved: dict[str, Any], path: Path, version: str, sharded: bool) -> None:
    """A checkpoint (its state, or a sharded folder's marker) resumes only a run of the same method
    version and FSDP setting: one line naming what differs otherwise."""
    if saved.get("version") != version:
        raise CheckpointError(f"resume: {path} was written by a {saved.get('version')} run, not {version}")
    if bool(saved.get("fsdp", False)) != sharded:
        raise CheckpointError(f"resume: {path} was written with train.fsdp={saved.get('fsdp', False)}; "
                              "resume with the same setting")


def restore_training_state(
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
    """Load checkpoint ``path`` into student, teachers, centres and optimiser (refused in one line when
    it was written by another method version, FSDP setting or config)."""
    state = load_checkpoint(path)
    check_same_run_kind(state, path, version, sharded)
    try:
        load_full_state_dict(student, state["student"], sharded, f"resume {path} (student)")
        load_full_state_dict(objective.teacher, state["teacher"], sharded, f"resume {path} (teacher)")
        if objective.gram_teacher is not None and state.get("gram_teacher") is not None:
            load_full_state_dict(objective.gram_teacher, state["gram_teacher"], sharded,
                                 f"resume {path} (Gram teacher)")
        if sharded:
            _load_sharded_optimizer(student, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"resume: {path} does not match this config ({str(exc).splitlines()[0][:160]})") from None
    objective.center.copy_(state["center"])
    objective.ibot_center.copy_(state["ibot_center"])
    objective.gram_refreshes = int(state.get("gram_refreshes", 0))
    skipped = {str(k): str(v) for k, v in state.get("skipped", [])}
    rng = state.get("rng") or []
    mine = None
    if int(state.get("world_size", 1)) == world_size and len(rng) == world_size:
        mine = rng[rank]
    return Resumed(int(state["iteration"]), skipped, mine)


def _load_sharded_optimizer(student: nn.Module, optimizer: torch.optim.Optimizer, saved_state: dict[str, Any]) -> None:
    # FSDP2 only, like the DCP imports of meddino.pretrain.distributed (absent in torch builds without
    # distributed support)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: parameters that never had a gradient (DINOv1's frozen prototypes during
    # freeze_last_layer) have no AdamW state yet, exactly as in the uninterrupted run
    set_optimizer_state_dict(student, optimizer, saved_state,
                             options=StateDictOptions(full_state_dict=True, strict=False))
    drop_unsaved_optimizer_state(student, optimizer, set(saved_state["state"].keys()))


def drop_unsaved_optimizer_state(student: nn.Module, optimizer: torch.optim.Optimizer, saved: set[str]) -> None:
    """After ``set_optimizer_state_dict``: its loader creates state for every parameter with a zero-lr
    step; drop it again where the checkpoint had none (``saved``: the names that had), or AdamW's step
    count (bias correction) would differ from the uninterrupted run's."""
    for name, p in student.named_parameters():
        if name not in saved:
            optimizer.state.pop(p, None)
