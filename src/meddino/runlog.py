"""The run folder and progress reporting.

A run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON object per logged
step), what the trackers of the config's ``log`` block write there (``tensorboard/``, ``mlruns/``,
``wandb/``, ``tracking.json``), and whatever the task writes (checkpoints/, predictions/, results.json).
Files that must never be half-written go through :func:`atomic_write`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from meddino.config import to_yaml
from meddino.errors import UserError
from meddino.tracking import LogConfig, Tracker, flatten

T = TypeVar("T")


def umask_mode() -> int:
    """The mode a new file gets from ``open()``: 0666 less the process's umask (read without changing it
    where /proc says it, else by the classic set-and-restore)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Write to a temp file in the same folder, fsync, then rename over ``path``: all or nothing. The file
    gets the permissions a plain ``open`` would give (the user's umask), not the temp file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_path(path: str | Path) -> contextlib.AbstractContextManager[Path]:
    """Like :func:`atomic_write` for writers that want a file name (torch.save, safetensors, savefig)."""

    @contextlib.contextmanager
    def _ctx() -> Iterator[Path]:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, umask_mode())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    return _ctx()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=2, default=_json_default)
        fh.write("\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


RUN_MARKER = "meddino_run.json"  # which verb wrote a run folder, and whether that run completed


def claim_run_folder(path: str | Path, verb: str, force: bool = False, rerun: bool = False,
                     retry: bool = True, recipe: str | None = None) -> Path:
    """Make ``path`` this ``verb``'s run folder. It may be new, empty, (``retry``) a run of this verb that
    did not complete (a failed or killed attempt), or (``rerun``) any run of this verb; anything else is
    refused in one line naming what is there, unless ``force`` (then only the files this verb writes are
    overwritten). ``retry=False`` is for a verb whose attempts leave state a plain rerun would destroy
    (pretraining's checkpoints: only ``resume=`` may continue them). :func:`complete_run_folder` marks
    the run complete. ``recipe`` (the ``--config`` the run started from) is recorded in the marker for
    whatever describes the run later (``meddino export folder``'s model card). On ranks other than 0 it
    only returns the path."""
    folder = Path(path).expanduser()
    if not _is_main_process():
        return folder
    if folder.exists() and not folder.is_dir():
        raise UserError(f"out: {folder} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        owner, complete = _run_owner(folder)
        if owner != verb or not (rerun or (retry and not complete)):
            if owner:
                what = f"{'a' if complete else 'an unfinished'} `meddino {owner}` run"
            else:
                names = sorted(p.name for p in folder.iterdir())
                what = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            how = " (resume=auto continues it)" if owner == verb == "pretrain" else ""
            raise UserError(f"out: {folder} already holds {what}{how}; choose a new or empty folder, or add "
                            f"--force to overwrite the files `meddino {verb}` writes there")
    folder.mkdir(parents=True, exist_ok=True)
    marker: dict[str, Any] = {"verb": verb, "complete": False}
    if recipe is not None:
        marker["recipe"] = str(recipe)
    write_json(folder / RUN_MARKER, marker)
    return folder


def complete_run_folder(path: str | Path, verb: str) -> None:
    """Record that ``verb``'s run in ``path`` completed (a later run of it needs rerun or --force); what
    else the marker records (the recipe) stays."""
    folder = Path(path).expanduser()
    if _is_main_process() and folder.is_dir():
        marker = {k: v for k, v in read_run_marker(folder).items() if k not in ("verb", "complete")}
        write_json(folder / RUN_MARKER, {"verb": verb, "complete": True, **marker})


def read_run_marker(folder: str | Path) -> dict[str, Any]:
    """The run folder's marker (verb, complete, recipe), or {} when it has none or it is unreadable."""
    try:
        marker = json.loads((Path(folder).expanduser() / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def drop_earlier_metrics(path: str | Path) -> None:
    """A new run in a folder that held an earlier one (a failed attempt, a rerun, ``--force``) starts its
    ``metrics.jsonl`` empty: rows appended after the earlier run's would read as one run's curves."""
    if _is_main_process():
        with contextlib.suppress(OSError):
            (Path(path).expanduser() / "metrics.jsonl").unlink(missing_ok=True)


def release_run_folder(path: str | Path) -> None:
    """Undo a claim whose run wrote nothing: when the marker is all the folder holds, it goes with the
    folder. A run that failed after writing (a crash after its first checkpoint, a torchrun worker lost)
    keeps its marker: the folder is an unfinished attempt of the verb, which a retry (pretraining: with
    ``resume=auto``, as torchrun's ``--max-restarts`` runs it again) may continue."""
    folder = Path(path).expanduser()
    if not _is_main_process():
        return
    with contextlib.suppress(OSError):
        if any(p.name != RUN_MARKER for p in folder.iterdir()):
            return
        (folder / RUN_MARKER).unlink(missing_ok=True)
        folder.rmdir()


def _run_owner(folder: Path) -> tuple[str | None, bool]:
    """(the verb that wrote ``folder``, whether its run completed); (None, False) without a marker."""
    marker = read_run_marker(folder)
    if "verb" not in marker:
        return None, False
    return str(marker["verb"]), bool(marker.get("complete", True))


class RunDir:
    """A run's output folder: the resolved config, metrics.jsonl, and the trackers of the config's ``log``
    block (TensorBoard, MLflow, W&B: :mod:`meddino.tracking`), opened on rank 0 only.

    ``resume_from``: the last step a continued run keeps (pretraining's resume: its checkpoint's iteration):
    each tracker goes on in the run it started (``tracking.json`` names it) and TensorBoard hides the events
    an earlier attempt logged after that step.
    :meth:`close` logs the ``metrics`` of ``results.json`` as ``results/...`` and ends the tracked run;
    a runner that does not close its RunDir has it closed by :func:`meddino.verbs.run_verb` (or at exit).
    """

    def __init__(self, path: str | Path, config: BaseModel | None = None, resume_from: int | None = None):
        self.path = Path(path).expanduser()
        self.path.mkdir(parents=True, exist_ok=True)
        self.tracker: Tracker | None = None
        log = getattr(config, "log", None)
        if isinstance(log, LogConfig) and log.trackers and _is_main_process():  # first: a refusal writes nothing
            state = _read_json(self.path / TRACKING_STATE)
            self.tracker = Tracker.open(log, self.path, config.model_dump(mode="json"), state, resume_from)
            write_json(self.path / TRACKING_STATE, self.tracker.state())
            _OPEN_RUNS.append(self)
            _close_at_exit()
        if config is not None:
            with atomic_write(self.path / "config.yaml", "w") as fh:
                fh.write(to_yaml(config))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(failed=exc_type is not None)

    @property
    def tracks_images(self) -> bool:
        """Whether a tracker is open that takes images (worth drawing a figure for)."""
        return self.tracker is not None and bool(self.tracker.backends)

    def log(self, step: int, group: Mapping[str, Any] | None = None, **values: Any) -> None:
        """Append one JSON line ``{"step": step, **group, **values}`` (rank 0 only) and send its numbers to
        the trackers; ``group`` (``{"fold": 0}``) names the curves of a part whose steps restart
        (``fold0/train_loss``)."""
        if not _is_main_process():
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: _scalar(v) for k, v in {**(group or {}), **values}.items()})
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row, default=_json_default) + "\n")
        if self.tracker is not None:
            self.tracker.scalars(step, {k: v for k, v in row.items() if k not in ("step", "time")}, group)

    def image(self, tag: str, rgb: Any, step: int | None = None) -> None:
        """An (H, W, 3) uint8 image for the trackers (metrics.jsonl has no place for it)."""
        if self.tracker is not None:
            self.tracker.image(tag, rgb, step)

    def artifact(self, path: str | Path) -> None:
        """A file of this run folder for the trackers that keep files (MLflow, W&B)."""
        if self.tracker is not None:
            self.tracker.artifact(Path(path), self.path)

    def close(self, failed: bool = False) -> None:
        """End the tracked run (FAILED with ``failed``), after the metrics of results.json when it did not
        fail. Idempotent."""
        tracker, self.tracker = self.tracker, None
        if self in _OPEN_RUNS:
            _OPEN_RUNS.remove(self)
        if tracker is None:
            return
        if not failed:
            results = _read_json(self.path / "results.json").get("metrics")
            if isinstance(results, dict):
                tracker.scalars(tracker.last_step, dict(list(flatten(results, "results/").items())[:500]))
        tracker.close(failed)


_OPEN_RUNS: list[RunDir] = []
_AT_EXIT: list[bool] = []
TRACKING_STATE = "tracking.json"  # the tracked runs of a run folder (MLflow run id, W&B run id)


def close_open_runs(failed: bool = False) -> None:
    """Close every RunDir still open (a runner returned without closing its own)."""
    for run in list(_OPEN_RUNS):
        run.close(failed)


def _close_at_exit() -> None:
    """Close open runs when the interpreter exits: FAILED after an uncaught exception (``sys.last_value``)."""
    if not _AT_EXIT:
        import atexit

        atexit.register(lambda: close_open_runs(failed=getattr(sys, "last_value", None) is not None))
        _AT_EXIT.append(True)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _scalar(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        return v.item()
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (a half-written last line from a killed run is ignored)."""
    rows = []
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# what encloses the current bar (the demo's whole-run ETA): fraction of this bar done -> text before it
_OUTER: list[Callable[[float], str]] = []


@contextlib.contextmanager
def outer_progress(describe: Callable[[float], str]) -> Iterator[None]:
    """Within this block every :class:`Progress` line starts with ``describe(fraction)``, ``fraction`` being
    how much of that bar's own total is done (0 without a total): how ``meddino demo`` shows its whole ETA
    in the line of whichever verb is running."""
    _OUTER.append(describe)
    try:
        yield
    finally:
        _OUTER.pop()


def _outer_text(done: int, total: int | None) -> str:
    if not _OUTER:
        return ""
    return _OUTER[-1](min(done / total, 1.0) if total else 0.0) + " | "


class Progress:
    """A progress bar with rate and ETA: rich on a TTY, a plain line every ``interval`` s otherwise.

    Usage: ``with Progress(total, "pretrain", unit="img") as bar: bar.advance(n, loss=0.3)``.
    Quiet on ranks other than 0 and with ``MEDDINO_QUIET=1``.
    """

    def __init__(self, total: int | None, description: str, unit: str = "it", interval: float = 60.0):
        self.total = total
        self.description = description
        self.unit = unit
        self.interval = interval
        self.done = 0
        self.postfix: dict[str, Any] = {}
        self._quiet = not _is_main_process() or os.environ.get("MEDDINO_QUIET") == "1"
        self._tty = sys.stderr.isatty() and not self._quiet
        self._rich: Any = None
        self._task: Any = None
        self._start = time.perf_counter()
        self._last_line = self._start

    def __enter__(self) -> Progress:
        if self._tty:
            from rich.progress import (  # why: rich only to draw a bar on a TTY
                BarColumn,
                MofNCompleteColumn,
                Progress as RichProgress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[postfix]}"),
                transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task(self.description, total=self.total, rate="", postfix="")
        return self

    def rate(self) -> float:
        elapsed = time.perf_counter() - self._start
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        self.postfix.update(postfix)
        if self._quiet:
            return
        text = " ".join(f"{k}={_fmt(v)}" for k, v in self.postfix.items())
        rate = f"{self.rate():.1f} {self.unit}/s"
        outer = _outer_text(self.done, self.total)
        if self._rich is not None:
            self._rich.update(self._task, advance=n, rate=rate, postfix=text, description=outer + self.description)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.interval:
            self._last_line = now
            eta = ""
            if self.total and self.rate() > 0:
                eta = f" eta {_hms((self.total - self.done) / self.rate())}"
            of = f"/{self.total}" if self.total else ""
            print(f"{outer}{self.description}: {self.done}{of} {rate}{eta} {text}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._rich is not None:
            self._rich.stop()


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate with a :class:`Progress` bar, one step per item."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, description, unit) as bar:
        for item in items:
            yield item
            bar.advance(1)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
