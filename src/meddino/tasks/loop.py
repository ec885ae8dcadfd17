"""The small kit every fine-tuning loop shares: best-on-validation snapshot, early stopping, finite-loss check.

Four loops (``eval seg``, both stages of ``eval phase``, ``eval finetune``) keep the weights of their best
validation epoch, and two of them (seg, finetune) stop early; each wrote that out by hand, and a NaN loss
ended one of them with a traceback and went unnoticed in the others. Here it is written once:

- :class:`BestSnapshot`: the best value of a validation metric (``mode="max"`` or ``"min"``), its epoch and a
  REAL copy of the model's state at that epoch (cloned tensors, not references to the weights that keep
  training). A value counts as better only when strictly better, so on a tie the earlier epoch is kept.
  ``start`` is the value to beat: ``None`` takes the first value whatever it is (phase), ``-inf`` / ``inf``
  make the first epoch count only when its value is better than that (a NaN never is; seg, finetune).
- :class:`EarlyStopping`: stop after ``patience`` consecutive epochs without improvement (``None``: never).
- :func:`check_finite`: a NaN / infinite loss raises :class:`~meddino.errors.TrainingDiverged`, which the CLI
  reports in one line with exit code 2, naming where it happened.
- :class:`PlateauScale` and :func:`backbone_warmup`: the lr factors of the segmentation loop. They live here
  rather than in :mod:`meddino.ssl.schedules`, whose schedules are precomputed per-iteration arrays of
  pretraining: the plateau scale reacts to the validation metric epoch by epoch (the same "better than the
  best so far" rule as the snapshot), and the encoder warm-up is a fine-tuning lr factor computed per step.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from meddino.errors import TrainingDiverged

__all__ = ["BestSnapshot", "EarlyStopping", "PlateauScale", "backbone_warmup", "check_finite"]

Mode = Literal["max", "min"]


class BestSnapshot:
    """Best validation value, its epoch and a real copy of the model state at that epoch.

    ``update(value, epoch, model)`` returns True (and copies the state) when ``value`` is strictly better
    than the best so far (or than ``start``; with ``start=None`` the first value is always taken).
    ``cpu=True`` keeps the copy on the CPU (seg, phase), ``cpu=False`` on the model's device (finetune).
    ``restore(model)`` loads the copy back; with no copy (no value ever improved) the model is left as is.
    """

    def __init__(self, mode: Mode = "max", start: float | None = None, cpu: bool = True):
        if mode not in ("max", "min"):
            raise ValueError(f"mode: expected 'max' or 'min', got {mode!r}")
        self.mode, self.cpu = mode, cpu
        self.value: float | None = start
        self.epoch: int | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def improves(self, value: float) -> bool:
        """Whether ``value`` is strictly better than the best so far (ties are not)."""
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def update(self, value: float, epoch: int, model: nn.Module) -> bool:
        if not self.improves(value):
            return False
        self.value, self.epoch = value, epoch
        if self.cpu:
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return True

    def restore(self, model: nn.Module) -> bool:
        """Load the best state into ``model``; False (model untouched) when there is none."""
        if self.state is None:
            return False
        model.load_state_dict(self.state)
        return True


class EarlyStopping:
    """Counts consecutive epochs without improvement; ``step(improved)`` is True once there were ``patience``.

    ``patience=None`` never stops. An improvement resets the count.
    """

    def __init__(self, patience: int | None):
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {patience}")
        self.patience = patience
        self.stale = 0

    def step(self, improved: bool) -> bool:
        self.stale = 0 if improved else self.stale + 1
        return self.patience is not None and self.stale >= self.patience


def check_finite(loss: torch.Tensor | float, where: str, **at: object) -> float:
    """The loss as a float; raises :class:`TrainingDiverged` when it is NaN or infinite.

    ``where`` names the verb (``"eval seg"``), ``at`` the position (``fold=0, epoch=3, step=17``); the
    message is built only on failure, so calling this every step costs one ``float()`` of the loss.
    """
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        pos = ", ".join(f"{k} {v}" for k, v in at.items())
        raise TrainingDiverged(
            f"{where}: loss is {value}{f' at {pos}' if pos else ''}; training diverged (try a lower learning rate)"
        )
    return value


class PlateauScale:
    """Multiplicative lr scale, reduced exactly as ``torch.optim.lr_scheduler.ReduceLROnPlateau(mode, factor,
    patience, threshold=0, cooldown=0)`` would: after more than ``patience`` consecutive epochs without a
    strictly better value (higher for ``mode="max"``, e.g. a validation Dice; lower for ``mode="min"``, e.g.
    seed 000's validation loss) the scale is multiplied by ``factor`` and the count restarts. A NaN is never
    better, so it counts as an epoch without improvement."""

    def __init__(self, patience: int, factor: float = 0.5, mode: Mode = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode: expected 'max' or 'min', got {mode!r}")
        self.patience, self.factor, self.mode = patience, factor, mode
        self.scale, self.bad = 1.0, 0
        self.best = -math.inf if mode == "max" else math.inf

    def step(self, value: float) -> float:
        better = value > self.best if self.mode == "max" else value < self.best
        if better:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
            if self.bad > self.patience:
                self.scale *= self.factor
                self.bad = 0
        return self.scale


def backbone_warmup(step: int, head_steps: int, ramp_steps: int) -> float:
    """EoMT's two-stage warm-up factor of the encoder lr: 0 while the heads train alone, then a linear ramp."""
    if step < head_steps:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - head_steps + 1) / ramp_steps)
