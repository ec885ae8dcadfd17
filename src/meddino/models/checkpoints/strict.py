"""The strict state-dict load with a one-line refusal, shared by every loader of weights.

Its own module, below :mod:`meddino.models.factory`: the factory loads ``timm:<name>@file`` weights with it,
and :mod:`meddino.models.checkpoints.load` (which builds models through the factory) loads everything else.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from meddino.errors import CheckpointError


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
