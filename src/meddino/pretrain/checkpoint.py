"""Training checkpoints: atomic writes, keep the last K, find the latest, weights_only loading.

A checkpoint is ``OUT/checkpoints/checkpoint_<iteration>.pt`` written with ``torch.save`` through a temp
file + rename (a killed run never leaves a half-written file under the final name). It holds only tensors,
numbers, strings, lists and dicts, so ``torch.load(weights_only=True)`` reads it: no pickle of arbitrary
objects. Beside it the teacher backbone is exported (``teacher_backbone_<iteration>.safetensors`` + JSON)
so any checkpoint's features can be evaluated without the training state.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddino.errors import CheckpointError
from meddino.runlog import atomic_path

_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")


def checkpoint_path(folder: Path, iteration: int) -> Path:
    return Path(folder) / f"checkpoint_{iteration:08d}.pt"


def export_path(folder: Path, iteration: int) -> Path:
    return Path(folder) / f"teacher_backbone_{iteration:08d}.safetensors"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every complete checkpoint in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    items = list_checkpoints(folder)
    return items[-1][1] if items else None


def save_checkpoint(folder: Path, iteration: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``state`` atomically as checkpoint ``iteration`` and delete all but the ``keep_last`` newest
    (their teacher exports too)."""
    path = checkpoint_path(folder, iteration)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    prune(folder, keep_last)
    return path


def prune(folder: Path, keep_last: int) -> None:
    items = list_checkpoints(folder)
    for it, p in items[: max(len(items) - keep_last, 0)]:
        p.unlink(missing_ok=True)
        exp = export_path(folder, it)
        exp.unlink(missing_ok=True)
        exp.with_suffix(".json").unlink(missing_ok=True)


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
