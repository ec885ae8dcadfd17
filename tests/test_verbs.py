"""Verbs are declared as data by each layer; only ``meddino.cli`` builds the command line from them."""

from __future__ import annotations

import ast
from pathlib import Path

import meddino
from meddino.cli import VERBS, build_parser
from meddino.verbs import Verb, load_attr, load_verb_config

SRC = Path(meddino.__file__).parent


def test_no_module_below_the_cli_imports_it():
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "meddino.cli" or n.startswith("meddino.cli.") for n in names):
                offenders.append(str(path.relative_to(SRC)))
    assert offenders == []


def test_every_declared_verb_resolves_to_a_schema_and_a_runner():
    paths = [v.path for v in VERBS]
    assert len(paths) == len(set(paths)), "two verbs share a command-line path"
    for verb in VERBS:
        assert callable(load_attr(verb.run)), verb.path
        assert hasattr(load_attr(verb.schema), "model_validate"), verb.path
    build_parser()  # argparse accepts every declaration


def test_argument_values_are_set_as_given_and_win_over_overrides():
    verb = next(v for v in VERBS if v.path == "report")
    cfg = load_verb_config(verb, overrides=["runs=elsewhere", "title=x"], values={"runs": "001"})
    assert cfg.runs == "001" and cfg.title == "x"  # a path is not parsed as YAML (it would be the int 1)


def test_prefixed_overrides_collect_into_their_list_key():
    verb = Verb("p", help="", schema="meddino.profile.run:ProfileConfig", run="meddino.profile.commands:run",
                prefixed=(("recipe.", "recipe_overrides"),))
    cfg = load_verb_config(verb, overrides=["img_size=32", "recipe.train.iterations=3"])
    assert cfg.img_size == 32 and cfg.recipe_overrides == ["train.iterations=3"]
