"""Issue 14 section 4, the small things users expect: ``meddino recipes --json``, ``meddino recipes show
NAME`` (its ``_base_`` merged), a listing that reads in an 80-column terminal, and ``meddino --version``
naming torch, timm and the device."""

from __future__ import annotations

import json
import sys

import yaml

from meddino.config import RecipesConfig, find_recipe, list_recipes, load_config, load_yaml, print_recipes
from meddino.pretrain.config import PretrainConfig


def test_recipes_json_lists_every_recipe_with_its_description_and_usage(cli):
    res = cli("recipes", "--json")
    assert res.returncode == 0, res.stderr
    entries = json.loads(res.stdout)
    shipped = {(g, n) for g, items in list_recipes().items() for n, _ in items}
    assert {(e["group"], e["name"]) for e in entries} == shipped and len(entries) == len(shipped)
    eomt = next(e for e in entries if e["name"] == "cholecseg8k_eomt")
    # a description over three comment lines is joined, the usage line is its own field
    assert eomt["description"].startswith("Seed 000: EoMT on CholecSeg8k") and "13 queries" in eomt["description"]
    assert "usage" not in eomt["description"] and eomt["usage"].startswith("meddino eval seg")
    tiny = next(e for e in entries if e["name"] == "dinov2_tiny")
    assert tiny["base"] == "dinov2_vits14" and tiny["group"] == "pretrain"
    # notes after the description (a new sentence) are not part of it
    binary = next(e for e in entries if e["name"] == "seed002_binary_cv")
    assert "fold column" not in binary["description"]
    seg = json.loads(cli("recipes", "seg", "--json").stdout)
    assert {e["group"] for e in seg} == {"seg"} and len(seg) == len(list_recipes()["seg"])


def test_recipes_piped_give_one_line_per_recipe(cli):
    res = cli("recipes")
    assert res.returncode == 0
    sections: dict[str, list[str]] = {}
    for line in res.stdout.splitlines()[1:]:
        if line and not line.startswith(" "):
            sections[line] = []
        elif line:
            sections[list(sections)[-1]].append(line)
    assert list(sections) == list(list_recipes())
    for group, items in list_recipes().items():
        assert len(sections[group]) == len(items)  # not wrapped: one line each, to grep or cut
        for line, (name, description) in zip(sections[group], items):
            assert line.startswith(f"  {name} ") and line.endswith(f"  {description}")


def test_recipes_on_an_80_column_terminal_wrap_under_the_description(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    capsys.readouterr()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert print_recipes(RecipesConfig()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    names = [n for items in list_recipes().values() for n, _ in items]
    starts = [line.split()[0] for line in lines if line.startswith("  ") and not line.startswith("   ")]
    assert starts == names  # every recipe starts its own line, in order; continuation lines are indented
    indent = {len(line) - len(line.lstrip()) for line in lines if line.startswith("   ")}
    assert len(indent) == 1  # one column for every description


def test_recipes_show_prints_the_recipe_with_its_base_merged(cli, tmp_path):
    res = cli("recipes", "show", "dinov2_tiny")
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(res.stdout)
    assert shown == load_yaml(find_recipe("dinov2_tiny", "pretrain")) and "_base_" not in shown
    assert shown["model"]["arch"] == "dinov2_tiny"  # the recipe's own key
    assert shown["method"]["koleo_weight"] == 0.1 and shown["method"]["version"] == "v2"  # from its base
    assert res.stdout.startswith("# recipe pretrain/dinov2_tiny: DINOv2 tiny ViT")
    # what it prints is a recipe --config takes back, giving the same config
    (tmp_path / "mine.yaml").write_text(res.stdout)
    assert load_config(PretrainConfig, str(tmp_path / "mine.yaml")) == load_config(
        PretrainConfig, "dinov2_tiny", group="pretrain")
    as_json = json.loads(cli("recipes", "show", "seg/seed001_linear", "--json").stdout)
    assert as_json["recipe"] == "seg/seed001_linear" and as_json["config"]["head"] == "linear"


def test_recipes_show_mistakes_are_one_line(cli):
    cases = {
        ("show", "seed001_linear"): "is in several groups; name one: classify/seed001_linear or seg/seed001_linear",
        ("show", "classify/seg_tiny"): "no recipe 'seg_tiny' in group 'classify'",
        ("show",): "recipes show: give a recipe name",
        ("show", "dinov2_tiyn"): "unknown recipe 'dinov2_tiyn' (did you mean dinov2_tiny",
        ("seg", "seg_tiny"): "to print a recipe use `meddino recipes show seg_tiny`",
    }
    for args, says in cases.items():
        res = cli("recipes", *args)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and says in lines[0], (args, res.stderr)
        assert res.stdout == ""


def test_version_names_torch_timm_and_the_device(cli):
    import timm
    import torch

    res = cli("--version")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("meddino ")
    assert f"torch {torch.__version__}" in lines[1] and f"timm {timm.__version__}" in lines[1]
    if torch.cuda.is_available():
        assert lines[2].startswith("device: CUDA") and torch.cuda.get_device_name(0) in lines[2]
    else:
        assert lines[2].startswith("device: ") and "no CUDA device" in lines[2]


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    """`meddino recipes --json | head`: the reader goes away, meddino stops without a traceback."""
    import meddino.config
    from meddino.cli import main

    def closed(_cfg):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(meddino.config, "print_recipes", closed)
    assert main(["recipes", "--json"]) == 141
    assert capsys.readouterr().err == ""
