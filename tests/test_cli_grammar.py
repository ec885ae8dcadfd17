"""One CLI grammar: positional inputs, --config, key.sub=value. Old option spellings still work for one
release, with one deprecation line; every verb's help names its arguments and ends with its config keys."""

from __future__ import annotations

import pytest

from meddino.cli import VERBS
from meddino.models import build_backbone, export_backbone


def _warnings(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("meddino: warning:")]


def test_every_positional_argument_has_help():
    missing = [f"{v.path} {a.name}" for v in VERBS for a in v.args if a.positional and not a.help]
    assert missing == []


def test_help_ends_with_the_config_keys_and_their_defaults(cli):
    res = cli("eval", "knn", "--help")
    assert res.returncode == 0
    tail = res.stdout.split("config keys (key.sub=value) and their defaults")[1]
    assert "knn.k" in tail and "data.manifest" in tail and "(recipe seed001_knn sets its own)" in res.stdout


def test_convert_takes_overrides_and_warns_once_per_old_flag(tmp_path, cli):
    src = export_backbone(build_backbone("dinov1_tiny"), tmp_path / "v1")
    new = cli("convert", src, tmp_path / "a", "arch=dinov1_tiny")
    assert new.returncode == 0 and _warnings(new) == [], new.stderr
    old = cli("convert", src, tmp_path / "b", "--arch", "dinov1_tiny")
    assert old.returncode == 0 and _warnings(old) == [
        "meddino: warning: --arch is deprecated and goes in the next release; use arch=NAME"]
    refused = cli("convert", src, tmp_path / "c", "arch=dinov2_tiny")  # the override is checked like the flag
    assert refused.returncode == 2 and "'dinov2_tiny' has v2" in refused.stderr


def test_profile_backbone_override_and_deprecated_flag(tmp_path, cli):
    common = ["head=backbone", "img_size=32", "warmup=0", "repeats=1"]
    new = cli("profile", "backbone=random:dinov2_tiny", *common, f"out={tmp_path / 'a'}")
    assert new.returncode == 0 and _warnings(new) == [], new.stderr
    old = cli("profile", "--backbone", "random:dinov2_tiny", *common, f"out={tmp_path / 'b'}")
    assert old.returncode == 0 and len(_warnings(old)) == 1 and "use backbone=SPEC" in old.stderr


def test_viz_needs_a_backbone_in_one_line(tmp_path, cli):
    res = cli("viz", "pca", tmp_path, f"out={tmp_path / 'v'}")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "give at least one backbone (backbones=[" in lines[0]


def test_unknown_recipe_group_is_one_line_naming_the_groups(cli):
    for group in ("eval", "nonsense"):
        res = cli("recipes", group)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and f"unknown group '{group}'" in lines[0]
        assert "classify, phase, pretrain, seg" in lines[0] and res.stdout == ""
    assert cli("recipes", "seg").returncode == 0


@pytest.mark.parametrize("task", ["seg", "phase"])
def test_predict_takes_model_as_a_key_and_warns_on_the_old_flag(tmp_path, cli, task):
    missing = tmp_path / "no_run"
    new = cli("predict", task, tmp_path, f"model={missing}")
    assert new.returncode == 2 and _warnings(new) == [] and str(missing) in new.stderr, new.stderr
    assert len(new.stderr.strip().splitlines()) == 1
    old = cli("predict", task, tmp_path, "--model", missing)
    assert old.returncode == 2 and _warnings(old) == [
        "meddino: warning: --model is deprecated and goes in the next release; use model=RUN_DIR"], old.stderr
    none = cli("predict", task, tmp_path)
    lines = none.stderr.strip().splitlines()
    assert none.returncode == 2 and len(lines) == 1 and "model" in lines[0], none.stderr
