"""The ``meddino`` command line, the top layer: builds argparse from the verbs every layer declares.

Each layer's ``commands.py`` declares its verbs as :class:`~meddino.verbs.Verb` records (name, help,
schema, runner, arguments); this module alone turns them into sub-commands, and no module below imports it.
A verb's schema and runner are imported only when it runs, so ``meddino --help`` stays fast. A
:class:`~meddino.errors.UserError` anywhere ends the run with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from collections.abc import Callable

from meddino import __version__, demo
from meddino.config import list_recipes
from meddino.data import commands as data_commands
from meddino.deploy import commands as deploy_commands
from meddino.errors import UserError
from meddino.models import commands as model_commands
from meddino.pretrain import commands as pretrain_commands
from meddino.profile import commands as profile_commands
from meddino.report import commands as report_commands
from meddino.tasks.classify import commands as classify_commands
from meddino.tasks.phase import commands as phase_commands
from meddino.tasks.seg import commands as seg_commands
from meddino.verbs import Arg, Verb, config_keys, run_verb
from meddino.viz import commands as viz_commands

GROUPS = {
    "eval": "evaluate a backbone on a downstream task",
    "predict": "run a trained downstream model on new data",
    "data": "prepare data: extract frames, make patient-level splits",
    "viz": "feature visualisations (PCA maps, attention maps)",
    "export": "export models for use outside meddino: a model folder (timm, the Hub) or ONNX for deployment",
}
RECIPES = Verb(
    "recipes",
    help="list the recipes shipped with meddino",
    schema="meddino.config:RecipesConfig",
    run="meddino.config:print_recipes",
    description="List the shipped recipes by group (one line each; --json for a machine-readable list), or "
    "print one with `meddino recipes show NAME`: its YAML with the _base_ it builds on merged in.",
    args=(
        Arg("group", "group", nargs="?", metavar="GROUP|show",
            help="only this group (" + ", ".join(list_recipes()) + "), or show"),
        Arg("name", "name", nargs="?", metavar="NAME", help="with show: the recipe to print (NAME or GROUP/NAME)"),
        Arg("--json", "json_output", switch=True, help="print JSON instead of text"),
    ),
    uses_torch=False,
)
VERBS: tuple[Verb, ...] = (
    RECIPES,
    *model_commands.VERBS,
    *data_commands.VERBS,
    *pretrain_commands.VERBS,
    *classify_commands.VERBS,
    *seg_commands.VERBS,
    *phase_commands.VERBS,
    *report_commands.VERBS,
    *viz_commands.VERBS,
    *profile_commands.VERBS,
    *deploy_commands.VERBS,
    *demo.VERBS,
)


# an OS error of these kinds is about a path the user chose (read-only, no permission, not a folder, disk
# full, over a quota or file-size limit): one line naming the path, not a traceback
PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENOSPC,
                         errno.EDQUOT, errno.EFBIG, errno.ENAMETOOLONG, errno.EEXIST})


def describe_os_error(exc: OSError) -> str:
    """``PATH: reason`` (both paths of a rename)."""
    where = str(exc.filename) if exc.filename else "a path"
    if exc.filename2:
        where += f" -> {exc.filename2}"
    return f"{where}: {exc.strerror or exc}"


class VerbParser(argparse.ArgumentParser):
    """A verb's parser: its help ends with the config keys the verb takes and their defaults (read from the
    schema only when help is asked for, so building the parser stays light)."""

    verb: Verb | None = None

    def format_help(self) -> str:
        text = super().format_help()
        if self.verb is None:
            return text
        keys = config_keys(self.verb)
        if not keys:
            return text
        width = max(len(k) for k, _ in keys)
        note = f" (recipe {self.verb.default_recipe} sets its own)" if self.verb.default_recipe else ""
        lines = [f"  {k.ljust(width)}  {v}" for k, v in keys]
        return text + f"\nconfig keys (key.sub=value) and their defaults{note}:\n" + "\n".join(lines) + "\n"


class VersionAction(argparse.Action):
    """``--version``: meddino, torch, timm and the device; torch is imported only when it is asked for, so
    building the parser (``meddino --help``) stays torch-free."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None):
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from meddino.devices import describe_versions

        print(describe_versions(__version__))
        parser.exit()


def build_parser(verbs: tuple[Verb, ...] = VERBS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meddino",
        description="Continued DINO pretraining and downstream evaluation for medical and surgical images.",
    )
    parser.add_argument("--version", action=VersionAction, help="show meddino's, torch's and timm's versions "
                        "and the CUDA device, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=VerbParser)
    places: dict[str | None, argparse._SubParsersAction] = {None: sub}
    for verb in verbs:
        if verb.group not in places:
            group_help = GROUPS[verb.group]
            group_parser = sub.add_parser(verb.group, help=group_help, description=group_help)
            places[verb.group] = group_parser.add_subparsers(dest=f"{verb.group}_command", metavar="TASK",
                                                             parser_class=VerbParser)
            group_parser.set_defaults(handler=_group_help(group_parser))
        add_verb(places[verb.group], verb)
    return parser


def add_verb(sub: argparse._SubParsersAction, verb: Verb) -> argparse.ArgumentParser:
    """One sub-command from its declaration: arguments, ``--config`` where it has recipes, overrides."""
    parser = sub.add_parser(verb.name, help=verb.help, description=verb.description or verb.help)
    parser.verb = verb  # its --help ends with the config keys and their defaults
    for arg in verb.args:
        if arg.positional:
            parser.add_argument(arg.name, metavar=arg.metavar, nargs=arg.nargs, help=arg.help)
        elif arg.switch:
            parser.add_argument(arg.name, dest=arg.dest, action="store_true", help=arg.help)
        else:
            parser.add_argument(arg.name, dest=arg.dest, action="append" if arg.repeat else "store",
                                required=arg.required, choices=arg.choices, help=arg.help,
                                metavar=arg.metavar or (None if arg.choices else arg.name.lstrip("-").upper()))
    if verb.recipes or verb.config_key:
        default = verb.default_recipe
        what = "pretraining recipe to profile" if verb.config_key else "recipe"
        parser.add_argument("--config", "-c", default=default,
                            help=f"{what}: a name (see `meddino recipes`) or a YAML path"
                            + (f"; default {default}" if default else ""))
    if verb.run_folder:
        parser.add_argument("--force", action="store_true",
                            help=f"write into an existing {verb.run_folder}= folder that holds other files "
                            "(only the files this verb writes are overwritten)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help=verb.overrides_help)
    parser.set_defaults(handler=_handler(verb), verb=verb)
    return parser


def _handler(verb: Verb) -> Callable[[argparse.Namespace], int]:
    def handle(args: argparse.Namespace) -> int:
        overrides: list[str] = []
        values = {}
        for arg in verb.args:
            given = getattr(args, arg.name if arg.positional else arg.dest)
            if given is None or given is False:
                continue
            if arg.deprecated:
                print(f"meddino: warning: {arg.name} is deprecated and goes in the next release; "
                      f"use {arg.deprecated}", file=sys.stderr)
            if arg.positional and arg.nargs in ("+", "*"):  # key=value items that argparse gave the list
                overrides += [g for g in given if "=" in g]
                given = [g for g in given if "=" not in g]
            values[arg.key] = given
        recipe = getattr(args, "config", None)
        if verb.config_key:
            if recipe is not None:
                values[verb.config_key] = recipe
            recipe = None
        return run_verb(verb, recipe, overrides + list(args.overrides), values,
                        force=getattr(args, "force", False))

    return handle


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
    if extra:  # key=value overrides given after options (e.g. `viz pca IMG --force out=DIR`)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        verb = getattr(args, "verb", None)
        if verb is not None and verb.uses_torch:  # fit torch's threads to the free cores before parallel work
            configure_cpu_threads()
        code = args.handler(args)
    except UserError as exc:
        print(f"meddino: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of stdout went away (`meddino recipes --json | head`): stop quietly
        with contextlib.suppress(OSError):  # and let the exit's flush of stdout write nowhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a Unix tool the pipe closed on
    except OSError as exc:
        if exc.errno not in PATH_ERRNOS:
            raise
        print(f"meddino: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meddino: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
