"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (missing file, wrong key, corrupt image, checkpoint of
another architecture). The CLI prints its message as one line and exits with code 2; library callers get a
normal exception. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input, reported as one line and exit code 2 by the CLI."""


class ConfigError(UserError):
    """An invalid configuration: unknown key, wrong type, bad value or impossible combination."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded as asked: unreadable, unsafe, or of another architecture."""


class DataError(UserError):
    """Input data that cannot be used: missing file, wrong mask size, label out of range, empty split."""


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite (pretraining or any fine-tuning loop).

    Usually a learning rate too high for the data; the message names the verb, epoch and step (or iteration),
    and the CLI reports it in one line with exit code 2 like every :class:`UserError`.
    """


class NoGradient(UserError):
    """A trainable tensor received no gradient in the first fine-tuning step, so it would never train.

    Raised by the gradient check of ``eval finetune`` (every mode: full, LoRA, BitFit); the one-line message
    names the tensors (a few names and the count) and the CLI exits with code 2.
    """


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type name), for one-line error reports."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def require_file(path: str | Path, what: str = "file") -> Path:
    """Return ``path`` as a Path if it exists, else raise a one-line :class:`DataError` naming it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{what} not found: {p}")
    return p
