"""The ``meddino`` command line: parses, loads a config, calls one function of a layer below.

Verbs live with their layer: each module in :data:`COMMAND_MODULES` exposes ``register(sub, groups)`` and
adds its sub-commands there (``groups`` holds the shared ``eval``, ``predict`` and ``data`` sub-parsers).
A config-driven verb is declared with :func:`add_config_command`; its schema and runner are imported only
when the verb runs, so ``meddino --help`` stays fast. A :class:`~meddino.errors.UserError` anywhere ends
the run with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from meddino import __version__
from meddino.errors import UserError

COMMAND_MODULES = [
    "meddino.models.commands",
    "meddino.data.commands",
    "meddino.pretrain.commands",
    "meddino.tasks.classify.commands",
    "meddino.tasks.seg.commands",
    "meddino.tasks.phase.commands",
    "meddino.report.commands",
    "meddino.viz.commands",
    "meddino.profile.commands",
    "meddino.demo",
]
GROUPS = {
    "eval": "evaluate a backbone on a downstream task",
    "predict": "run a trained downstream model on new data",
    "data": "prepare data: extract frames, make patient-level splits",
}


def load_attr(path: str) -> Any:
    """``"package.module:attr"`` -> the attribute (imported on demand)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def add_config_command(
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
    schema: str,
    run: str,
    recipe_group: str,
    default_recipe: str | None = None,
    positional: list[tuple[str, str]] | None = None,
) -> argparse.ArgumentParser:
    """A verb of the form ``meddino NAME [POSITIONAL ...] --config RECIPE key.sub=value ...``.

    ``schema`` and ``run`` are ``module:attr`` paths; ``run(cfg)`` receives the validated config.
    ``positional`` maps extra positional arguments onto config keys (e.g. ``[("video", "video")]``).
    """
    parser = sub.add_parser(name, help=help, description=help)
    for arg, _key in positional or []:
        parser.add_argument(arg)
    parser.add_argument(
        "--config",
        "-c",
        default=default_recipe,
        help="recipe name (see `meddino recipes`) or YAML path"
        + (f"; default {default_recipe}" if default_recipe else ""),
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    def handler(args: argparse.Namespace) -> int | None:
        from meddino.config import load_config

        extra = [f"{key}={getattr(args, arg)}" for arg, key in positional or []]
        cfg = load_config(load_attr(schema), args.config, extra + list(args.overrides), recipe_group)
        return load_attr(run)(cfg)

    parser.set_defaults(handler=handler)
    return parser


def _recipes(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from meddino.config import list_recipes

    table = Table(title="meddino recipes (use with --config NAME)")
    table.add_column("group")
    table.add_column("name")
    table.add_column("description")
    for group, items in list_recipes().items():
        if args.group and group != args.group:
            continue
        for name, desc in items:
            table.add_row(group, name, desc)
    Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meddino",
        description="Continued DINO pretraining and downstream evaluation for medical and surgical images.",
    )
    parser.add_argument("--version", action="version", version=f"meddino {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    rec = sub.add_parser("recipes", help="list the recipes shipped with meddino")
    rec.add_argument("group", nargs="?", help="only this group (pretrain, eval, ...)")
    rec.set_defaults(handler=_recipes)
    groups = {}
    for name, help in GROUPS.items():
        group_parser = sub.add_parser(name, help=help, description=help)
        groups[name] = group_parser.add_subparsers(dest=f"{name}_command", metavar="TASK")
        group_parser.set_defaults(handler=_group_help(group_parser))
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that layer is not part of this installation
            raise
        module.register(sub, groups)
    return parser


def _group_help(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show(_: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return show


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from meddino.devices import configure_cpu_threads, set_openmp_wait_policy  # imports no torch

    set_openmp_wait_policy()  # before anything loads torch's OpenMP runtime, which reads it once
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides given after options (e.g. `viz pca IMG --backbone X out=DIR`)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        listing = args.handler is _recipes or (args.command in GROUPS and not getattr(args, f"{args.command}_command"))
        if not listing:  # the verb will load torch: fit its threads to the free cores before parallel work
            configure_cpu_threads()
        code = args.handler(args)
    except UserError as exc:
        print(f"meddino: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meddino: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
