"""Experiment tracking: the ``log`` block of every run config, and the backends it names.

``metrics.jsonl`` (the ``jsonl`` backend) is always written. ``tensorboard``, ``mlflow`` and ``wandb`` are
asked for in ``log.backends`` and each is used only when its package is installed: asking for one that is
not is one line naming its pip extra (:func:`check_backends`, run by :func:`meddino.verbs.run_verb` before the
run folder is claimed). :class:`Tracker` sends each call to every open backend; :class:`meddino.runlog.RunDir`
owns one, so every verb tracks what its config asks for, on rank 0 only. A backend that fails in the middle
of a run (a tracking server gone away) is dropped with one warning line: a long run is not lost to it, and
``metrics.jsonl`` still has every row. Nothing here imports torch or a backend's package until one opens.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationInfo, field_validator

from meddino.config import Schema
from meddino.errors import ConfigError, UserError, first_line

BACKENDS = ("jsonl", "tensorboard", "mlflow", "wandb")
# the module each backend imports; the pip extra of the same name installs it
_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
_LOCAL_SCHEMES = ("file", "sqlite")


class TrackingError(UserError):
    """A tracking backend that cannot be opened (not installed, no login, a store that cannot be reached)."""


class LogConfig(Schema):
    """``log``: where a run's scalars, resolved config and images go besides ``metrics.jsonl``."""

    # jsonl (metrics.jsonl) is always on; any of tensorboard, mlflow, wandb besides
    backends: list[Literal["jsonl", "tensorboard", "mlflow", "wandb"]] = Field(default_factory=lambda: ["jsonl"])
    experiment: str = Field("meddino", min_length=1)  # the MLflow experiment, the W&B project
    run_name: str | None = None  # default: the run folder's name
    tags: list[str] = Field(default_factory=list)  # W&B tags as given; MLflow tags (key=value, or key alone)
    offline: bool = False  # nothing leaves the machine: W&B offline mode, MLflow in OUT/mlruns
    tracking_uri: str | None = None  # MLflow (default MLFLOW_TRACKING_URI, else a store in OUT/mlruns)

    @field_validator("backends")
    @classmethod
    def _jsonl_first(cls, v: list[str]) -> list[str]:
        return ["jsonl", *dict.fromkeys(b for b in v if b != "jsonl")]

    @field_validator("tracking_uri")
    @classmethod
    def _local_when_offline(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("offline") and _scheme(v) not in (None, *_LOCAL_SCHEMES):
            raise ValueError("log.offline=true keeps tracking on this machine: give a file: or sqlite: URI, "
                             "a folder, or no log.tracking_uri (OUT/mlruns)")
        return v

    @property
    def trackers(self) -> list[str]:
        """The backends besides jsonl."""
        return [b for b in self.backends if b != "jsonl"]


def _scheme(uri: str) -> str | None:
    """``"http"`` of ``http://host``; None for a plain path (a one-letter scheme is a Windows drive)."""
    if uri in ("databricks", "databricks-uc"):  # MLflow's URIs without a colon
        return "databricks"
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):", uri)
    return m.group(1).lower() if m else None


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import, a module set to None in sys.modules
        return False


def check_backends(log: LogConfig) -> None:
    """One line naming the pip extra of the first backend asked for whose package is not installed."""
    for name in log.trackers:
        if not installed(_MODULES[name]):
            raise ConfigError(f"log.backends: {name} is not installed; pip install 'meddino[{name}]' "
                              f"(or leave {name} out of log.backends)")


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b": value}``; lists and tuples become their YAML flow text."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = yaml.safe_dump(list(value), default_flow_style=True, width=10**6).strip()
        else:
            out[name] = value
    return out


def scalars_of(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a row (text, lists and NaN stay in metrics.jsonl only)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def group_prefix(group: Mapping[str, Any] | None) -> str:
    """``{"fold": 0}`` -> ``"fold0/"``, ``{"config": 1, "unit": "fold2"}`` -> ``"config1/fold2/"``: the
    curves of one fold (draw, stage) apart from the others, whose steps restart."""
    if not group:
        return ""
    return "".join(f"{v}/" if isinstance(v, str) else f"{k}{v}/" for k, v in group.items())


def _tag_pairs(tags: list[str]) -> dict[str, str]:
    return dict((t.split("=", 1) + [""])[:2] for t in tags)


class Tracker:
    """The open backends of one run; ``Tracker.open`` opens those ``log`` asks for."""

    def __init__(self, backends: list[Any]):
        self.backends = backends
        self.last_step = 0

    @classmethod
    def open(cls, log: LogConfig, folder: Path, config: Mapping[str, Any], state: Mapping[str, Any],
             resume_from: int | None) -> Tracker:
        """Open every backend of ``log`` for the run in ``folder``. ``config`` is the resolved config
        (logged as hyperparameters); ``state`` what :meth:`state` returned when the run last opened, so that
        a continued run (``resume_from``: pretraining's resume iteration) goes on in the same tracked run."""
        check_backends(log)
        name = log.run_name or folder.name
        flat = flatten(config)
        opened: list[Any] = []
        try:
            for backend in log.trackers:
                previous = state.get(backend, {}) if resume_from is not None else {}
                kind = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}[backend]
                try:
                    opened.append(kind(log, folder, name, config, flat, previous, resume_from))
                except UserError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the backend's own errors: one line naming it
                    raise TrackingError(f"log.backends {backend}: cannot start the run: {first_line(exc)}"
                                        f"{_HINTS.get(backend, '')}") from exc
        except BaseException:
            for b in opened:
                b.close(failed=True)
            raise
        tracker = cls(opened)
        tracker.last_step = resume_from or 0
        return tracker

    def state(self) -> dict[str, Any]:
        """What identifies each backend's run (``tracking.json``): the MLflow run id, the W&B run id."""
        return {b.name: b.state for b in self.backends if getattr(b, "state", None)}

    def _each(self, method: str, *args: Any) -> None:
        for b in list(self.backends):
            try:
                getattr(b, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker failing mid-run must not end the run
                self.backends.remove(b)
                print(f"meddino: warning: log.backends {b.name}: {first_line(exc)}; it logs nothing more in "
                      "this run (metrics.jsonl has every row)", file=sys.stderr, flush=True)
                try:
                    b.close(failed=True)
                except Exception:  # noqa: BLE001, S110 - already reported
                    pass

    def scalars(self, step: int, values: Mapping[str, Any], group: Mapping[str, Any] | None = None) -> None:
        """The finite numbers of ``values`` at ``step``, tagged with the group's prefix."""
        prefix = group_prefix(group)
        numbers = {f"{prefix}{k}": v for k, v in scalars_of(values).items() if k not in (group or {})}
        self.last_step = max(self.last_step, int(step))
        if numbers:
            self._each("scalars", int(step), numbers, f"{prefix}step")

    def image(self, tag: str, rgb: Any, step: int | None = None) -> None:
        """An (H, W, 3) uint8 image."""
        self._each("image", tag, rgb, self.last_step if step is None else int(step))

    def artifact(self, path: Path, folder: Path) -> None:
        """A file of the run folder (kept by MLflow and W&B; TensorBoard has no place for it)."""
        self._each("artifact", Path(path), folder)

    def close(self, failed: bool = False) -> None:
        for b in self.backends:
            try:
                b.close(failed)
            except Exception as exc:  # noqa: BLE001 - the run itself is done: a warning, not a failure
                print(f"meddino: warning: log.backends {b.name}: closing: {first_line(exc)}", file=sys.stderr)
        self.backends = []


_HINTS = {
    "wandb": " (log in with `wandb login` or WANDB_API_KEY, or set log.offline=true)",
    "mlflow": " (check log.tracking_uri / MLFLOW_TRACKING_URI, or set log.offline=true)",
}


class _TensorBoard:
    """Events in ``OUT/tensorboard``: scalars, the resolved config as text and as HParams, images."""

    name = "tensorboard"

    def __init__(self, log: LogConfig, folder: Path, run_name: str, config: Mapping[str, Any],
                 flat: dict[str, Any], state: Mapping[str, Any], resume_from: int | None):
        from torch.utils.tensorboard import SummaryWriter  # why: the optional extra, only when asked for
        from torch.utils.tensorboard.summary import hparams

        # purge_step: the events of an earlier attempt from this step on are hidden (a resumed run logs those
        # after its checkpoint again; a new run in the same folder replaces all of them)
        first = 0 if resume_from is None else resume_from + 1
        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=first)
        self.state: dict[str, Any] = {}
        text = yaml.safe_dump(dict(config), sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), first)
        values = {k: ("null" if v is None else v) for k, v in flat.items()}
        _, session_start, self._session_end = hparams(values, {})
        self.writer.file_writer.add_summary(session_start)

    def scalars(self, step: int, values: dict[str, float], step_key: str) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, rgb: Any, step: int) -> None:
        self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def artifact(self, path: Path, folder: Path) -> None:
        pass

    def close(self, failed: bool) -> None:
        if not failed:  # a failed run keeps no session end (TensorBoard shows its status as unknown)
            self.writer.file_writer.add_summary(self._session_end)
        self.writer.close()


def mlflow_uri(log: LogConfig, folder: Path) -> str:
    """``log.tracking_uri`` (a plain path as a file: URI); else MLFLOW_TRACKING_URI unless offline; else a
    file store in ``OUT/mlruns``."""
    if log.tracking_uri:
        return log.tracking_uri if _scheme(log.tracking_uri) else Path(log.tracking_uri).expanduser().resolve().as_uri()
    if not log.offline and os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return (folder / "mlruns").resolve().as_uri()


class _MLflow:
    """One MLflow run: the config as params, scalars as metrics, images and files as artifacts."""

    name = "mlflow"
    _MAX_VALUE = 6000  # MLflow's longest param value

    def __init__(self, log: LogConfig, folder: Path, run_name: str, config: Mapping[str, Any],
                 flat: dict[str, Any], state: Mapping[str, Any], resume_from: int | None):
        from mlflow.entities import Param, RunStatus  # why: the optional extra, only when asked for
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri(log, folder)
        if _scheme(uri) == "file":  # MLflow 3 refuses its file store unless told that it is wanted
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = None
        if state.get("run_id") and state.get("tracking_uri") == uri:  # a resumed run goes on in its run
            try:
                self.client.update_run(state["run_id"], status=RunStatus.to_string(RunStatus.RUNNING))
                self.run_id = state["run_id"]
            except MlflowException:
                self.run_id = None
        params = {k: str(v)[: self._MAX_VALUE] for k, v in flat.items()}
        if self.run_id is None:
            tags = {"meddino.run_folder": str(folder.resolve()), **_tag_pairs(log.tags)}
            run = self.client.create_run(self._experiment(log.experiment), run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
        else:  # an MLflow param cannot change: a resumed run adds new keys only (config.yaml is current)
            logged = self.client.get_run(self.run_id).data.params
            params = {k: v for k, v in params.items() if k not in logged}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        self.state = {"run_id": self.run_id, "tracking_uri": uri}

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # created by a run starting at the same time
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def scalars(self, step: int, values: dict[str, float], step_key: str) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def image(self, tag: str, rgb: Any, step: int) -> None:
        self.client.log_image(self.run_id, rgb, artifact_file=f"{tag}.png")

    def artifact(self, path: Path, folder: Path) -> None:
        parent = path.parent.relative_to(folder).as_posix() if path.parent != folder else None
        self.client.log_artifact(self.run_id, str(path), parent)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class _WandB:
    """One W&B run (its files in ``OUT/wandb``): the nested config, scalars against their own step, images."""

    name = "wandb"

    def __init__(self, log: LogConfig, folder: Path, run_name: str, config: Mapping[str, Any],
                 flat: dict[str, Any], state: Mapping[str, Any], resume_from: int | None):
        import wandb  # why: the optional extra, only when asked for

        self._wandb = wandb
        kwargs: dict[str, Any] = {"project": log.experiment, "name": run_name, "tags": list(log.tags),
                                  "dir": str(folder)}
        if log.offline:
            kwargs["mode"] = "offline"
        if state.get("id") and state.get("project") == log.experiment:  # a resumed run goes on in its run
            kwargs.update(id=state["id"], resume="allow")
        self.run = wandb.init(**kwargs)
        self.run.config.update(dict(config), allow_val_change=True)
        self.defined: set[str] = set()
        self.state = {"id": self.run.id, "project": log.experiment}

    def scalars(self, step: int, values: dict[str, float], step_key: str) -> None:
        # each curve against its own step key (a fold's steps restart; W&B's own step may only grow)
        for tag in [step_key, *values]:
            if tag not in self.defined:
                if tag == step_key:
                    self.run.define_metric(tag)
                else:
                    self.run.define_metric(tag, step_metric=step_key)
                self.defined.add(tag)
        self.run.log({**values, step_key: step})

    def image(self, tag: str, rgb: Any, step: int) -> None:
        self.run.log({tag: self._wandb.Image(rgb)})

    def artifact(self, path: Path, folder: Path) -> None:
        self.run.save(str(path), base_path=str(folder), policy="now")

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


__all__ = ["BACKENDS", "LogConfig", "Tracker", "TrackingError", "check_backends", "flatten", "group_prefix",
           "installed", "mlflow_uri", "scalars_of"]
