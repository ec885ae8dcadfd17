"""Verbs as data: every layer declares its command-line verbs as :class:`Verb` records.

A layer's ``commands.py`` holds a ``VERBS`` tuple and the thin runners it names; :mod:`meddino.cli` alone
turns the declarations into argparse, so no layer imports the CLI. A verb's schema and runner are
``"module:attr"`` paths, imported only when the verb runs (this module itself needs only pydantic and the
config layer), which keeps ``meddino --help`` fast.
:func:`run_verb` is the one way a verb runs: from the command line, or from another verb (the demo).
Every verb reads the same way: positional inputs, ``--config RECIPE`` where it has recipes, options that
fill config keys, and ``key.sub=value`` overrides.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from meddino.config import load_config
from meddino.runlog import (
    claim_run_folder,
    close_open_runs,
    complete_run_folder,
    drop_earlier_metrics,
    release_run_folder,
)
from meddino.tracking import LogConfig, check_backends


@dataclass(frozen=True)
class Arg:
    """A positional argument (``name`` without dashes) or an option (``--name``) that fills config ``key``."""

    name: str
    key: str
    help: str = ""
    nargs: str | None = None  # "+", "?" ... as argparse
    repeat: bool = False  # an option given several times collects a list
    switch: bool = False  # an option without value: true when given
    required: bool = False
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    deprecated: str | None = None  # an old spelling kept one release: the new one, named in a warning line

    @property
    def positional(self) -> bool:
        return not self.name.startswith("-")

    @property
    def dest(self) -> str:
        return "arg_" + self.name.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Verb:
    """One CLI verb: ``meddino [GROUP] NAME [ARGS ...] [--config RECIPE] [key.sub=value ...]``."""

    name: str
    help: str
    schema: str  # "module:Schema", validated before the runner starts
    run: str  # "module:function", called with the validated config; returns the exit code
    group: str | None = None  # "eval", "predict", "data", "viz", "export" or None for a top-level verb
    description: str | None = None
    recipes: str | None = None  # recipe group: the verb takes --config RECIPE (None: schema defaults only)
    # the config key --config fills instead (profile: the pretraining recipe it profiles)
    config_key: str | None = None
    default_recipe: str | None = None
    args: tuple[Arg, ...] = ()
    overrides_help: str = "config overrides"
    # overrides starting with a prefix go, prefix removed, into a list key: ("recipe.", "recipe_overrides")
    prefixed: tuple[tuple[str, str], ...] = ()
    source: str | None = None  # how config errors name the config (default: the recipe file, or "config")
    uses_torch: bool = True  # False: a listing that loads no torch, so no CPU-thread set-up first
    # the config key of the run folder the verb writes: new, empty, a failed attempt of this verb, or
    # (``rerun``) a completed run of this verb (runlog.claim_run_folder)
    run_folder: str | None = None
    # True: running again into its own completed folder is the normal use (it refreshes or reuses it); a
    # config key: only when that key is set (pretrain's ``resume``); False: a second run needs --force
    rerun: bool | str = False

    @property
    def path(self) -> str:
        return f"{self.group} {self.name}" if self.group else self.name


def load_attr(path: str) -> Any:
    """``"package.module:attr"`` -> the attribute (imported on demand)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def config_keys(verb: Verb) -> list[tuple[str, str]]:
    """``(dotted key, default)`` of every leaf field of the verb's schema, in declaration order."""
    out: list[tuple[str, str]] = []

    def walk(model: type, prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            if field.is_required():
                default = "(required)"
            else:
                value = field.get_default(call_default_factory=True)
                default = "null" if value is None else str(value)
            out.append((f"{prefix}{name}", default))

    walk(load_attr(verb.schema), "")
    positional = {a.key for a in verb.args if a.positional}  # shown as arguments already
    return [(k, v) for k, v in out if k not in positional]


def load_verb_config(verb: Verb, recipe: str | None = None, overrides: Iterable[str] = (),
                     values: dict[str, Any] | None = None) -> Any:
    """The validated config of ``verb``: recipe, then ``key=value`` overrides, then ``values`` (typed values
    from positional arguments and options, set as given: a path stays a string)."""
    overrides = list(overrides)
    values = dict(values or {})
    for prefix, key in verb.prefixed:
        values[key] = [o.removeprefix(prefix) for o in overrides if o.startswith(prefix)]
        overrides = [o for o in overrides if not o.startswith(prefix)]
    return load_config(load_attr(verb.schema), recipe or verb.default_recipe, overrides, verb.recipes,
                       values=values, source=verb.source)


def run_verb(verb: Verb, recipe: str | None = None, overrides: Iterable[str] = (),
             values: dict[str, Any] | None = None, force: bool = False) -> int:
    """Validate the config (and that the tracking backends of its ``log`` block are installed), claim the
    run folder (nothing already there is overwritten unless ``force``), then call the verb's runner; returns
    its exit code. A tracked run the runner left open is closed (FAILED when the runner failed)."""
    cfg = load_verb_config(verb, recipe, overrides, values)
    if isinstance(getattr(cfg, "log", None), LogConfig):
        check_backends(cfg.log)
    try:
        code = _run_claimed(verb, cfg, force, recipe)
    except BaseException:
        close_open_runs(failed=True)
        raise
    close_open_runs(failed=code != 0)
    return code


def _run_claimed(verb: Verb, cfg: Any, force: bool, recipe: str | None) -> int:
    folder = None
    if verb.run_folder:
        folder = cfg
        for part in verb.run_folder.split("."):
            folder = getattr(folder, part)
    if not folder:
        return int(load_attr(verb.run)(cfg) or 0)
    path = Path(folder).expanduser()
    fresh = not path.exists() or (path.is_dir() and not any(path.iterdir()))
    rerun = verb.rerun if isinstance(verb.rerun, bool) else bool(getattr(cfg, verb.rerun, None))
    # a verb that reruns through a key (pretrain: resume=) continues only through it, attempts included
    claim_run_folder(path, verb.path, force=force, rerun=rerun, retry=isinstance(verb.rerun, bool),
                     recipe=(recipe or verb.default_recipe) if verb.recipes else None)
    if not fresh and not (rerun and isinstance(verb.rerun, str)):  # a resume keeps (and truncates) its rows
        drop_earlier_metrics(path)
    try:
        code = int(load_attr(verb.run)(cfg) or 0)
    except BaseException:
        if fresh:  # refused before it wrote anything: leave no folder behind (one that wrote stays an attempt)
            release_run_folder(path)
        raise
    if code == 0:
        complete_run_folder(path, verb.path)
    return code
