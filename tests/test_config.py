"""Config machinery: recipes, _base_ merging, dotted overrides, one-line validation errors."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field, field_validator, model_validator

from meddino.config import Schema, deep_merge, load_config, parse_overrides
from meddino.errors import ConfigError


class Optim(Schema):
    lr: float = 1e-3
    warmup_iters: int = Field(0, ge=0)
    scaling: Literal["linear256", "sqrt1024", "none"] = "sqrt1024"


class Train(Schema):
    iterations: int = 10
    sizes: list[int] = [224, 96]

    @field_validator("sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(s <= 0 for s in v):
            raise ValueError("crop sizes must be positive")
        return v


class Run(Schema):
    out: str = "runs/x"
    optim: Optim = Optim()
    train: Train = Train()


def test_overrides_parse_yaml_scalars_and_nest():
    assert parse_overrides(["a.b=3", "a.c=1.5", "d=true", "e=[1, 2]", "f=runs/x", "g=random:dinov2_tiny"]) == {
        "a": {"b": 3, "c": 1.5}, "d": True, "e": [1, 2], "f": "runs/x", "g": "random:dinov2_tiny"
    }
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["oops"])


def test_deep_merge_keeps_siblings():
    assert deep_merge({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 5}}) == {"a": {"b": 5, "c": 2}, "d": 1}


def test_yaml_recipe_with_base_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("# base recipe\noptim:\n  lr: 0.5\ntrain:\n  iterations: 7\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain:\n  iterations: 9\n")
    cfg = load_config(Run, str(tmp_path / "child.yaml"), ["optim.warmup_iters=3"])
    assert cfg.optim.lr == 0.5 and cfg.train.iterations == 9 and cfg.optim.warmup_iters == 3
    assert cfg.optim.scaling == "sqrt1024"


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.iteratons=5", "unknown key 'train.iteratons' (did you mean 'train.iterations'?)"),
        ("train.iterations=abc", "key 'train.iterations': "),
        ("optim.warmup_iters=-1", "key 'optim.warmup_iters': Input should be greater than or equal to 0"),
        ("optim.scaling=cubic", "key 'optim.scaling'"),
        ("train.sizes=[224, -1]", "key 'train.sizes': crop sizes must be positive"),
    ],
)
def test_validation_errors_name_the_key_in_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(Run, None, [override])
    text = str(info.value)
    assert message in text and "\n" not in text


class Labels(Schema):
    positive_class: str | None = None
    title: str = ""
    window: str | list[float] | None = None
    count: int = 0


def test_overrides_of_text_fields_keep_their_text():
    """YAML reads `1` as an int and `007` as 7: a field that takes only text gets the text as typed."""
    cfg = load_config(Labels, None, ["positive_class=1", "title=007", "window=2", "count=3"])
    assert cfg.positive_class == "1" and cfg.title == "007" and cfg.count == 3
    assert cfg.window == "2"  # takes text or a list, not a number: the text


def test_errors_of_an_override_blame_the_override_not_the_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text("train:\n  iterations: 3\n")
    for override, expected in [
        ("train.iteratons=5", "override train.iteratons=5: unknown key 'train.iteratons'"),
        ("train.iterations=abc", "override train.iterations=abc: key 'train.iterations'"),
        ("train=5", "override train=5: key 'train'"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(Run, str(tmp_path / "r.yaml"), [override])
        assert str(info.value).startswith(expected) and "r.yaml" not in str(info.value), str(info.value)
    (tmp_path / "bad.yaml").write_text("train:\n  iteratons: 3\n")
    with pytest.raises(ConfigError, match=r"^config bad.yaml: unknown key 'train.iteratons'"):
        load_config(Run, str(tmp_path / "bad.yaml"), ["optim.lr=0.1"])


def test_a_rule_over_several_keys_prints_no_root_key():
    class Pair(Schema):
        a: int = 0
        b: int = 0

        @model_validator(mode="after")
        def _ordered(self):  # noqa: ANN202
            if self.a > self.b:
                raise ValueError("a must not exceed b")
            return self

    with pytest.raises(ConfigError) as info:
        load_config(Pair, None, ["a=2", "b=1"])
    assert str(info.value) == "config: a must not exceed b"


def test_unknown_recipe_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'no_such_recipe'"):
        load_config(Run, "no_such_recipe")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Run, str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, str(tmp_path / "bad.yaml"))


def test_cli_help_and_recipes(cli):
    res = cli("--help")
    assert res.returncode == 0 and "recipes" in res.stdout and "convert" in res.stdout
    res = cli("recipes")
    assert res.returncode == 0


def test_help_does_not_import_torch():
    """`meddino --help` must stay fast: command modules import their layer only when the verb runs."""
    import subprocess
    import sys

    code = "import sys; from meddino.cli import build_parser; build_parser(); print(sorted(m for m in ('torch', 'timm', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "override,named",
    [
        ("train.iteratons=5", "unknown key 'train.iteratons' (did you mean 'train.iterations'?)"),
        ("train.iterations=many", "key 'train.iterations'"),
        ("crops.n_local=-2", "key 'crops.n_local'"),
    ],
)
def test_cli_config_errors_exit_2_naming_the_key(override, named, capsys, tmp_path):
    from meddino.cli import main

    code = main(["pretrain", "--config", "dinov2_tiny", f"data.path={tmp_path}", f"out={tmp_path / 'run'}", override])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and named in err
    assert not (tmp_path / "run").exists()  # nothing written before validation


def test_cli_unknown_recipe_exit_2(capsys):
    from meddino.cli import main

    assert main(["pretrain", "--config", "dinov2_tinyy"]) == 2
    assert "unknown recipe 'dinov2_tinyy' (did you mean dinov2_tiny" in capsys.readouterr().err
