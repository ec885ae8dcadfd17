"""Typed configs: YAML recipes shipped in the package, dotted ``key.sub=value`` overrides, validation.

Each layer declares its own schema as a pydantic model deriving from :class:`Schema` (unknown keys are
refused). :func:`load_config` resolves a recipe (a shipped name or a YAML path), merges ``_base_`` recipes
and command-line overrides, and validates the result before any work starts. A mistake becomes a
:class:`~meddino.errors.ConfigError` whose one-line message names the offending key.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from meddino.errors import ConfigError

RECIPE_SUFFIX = ".yaml"
BASE_KEY = "_base_"

S = TypeVar("S", bound="Schema")


class Schema(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def recipes_root() -> Path:
    return Path(str(resources.files("meddino") / "configs"))


def list_recipes() -> dict[str, list[tuple[str, str]]]:
    """``{group: [(name, one-line description), ...]}`` for every shipped recipe."""
    out: dict[str, list[tuple[str, str]]] = {}
    root = recipes_root()
    for path in sorted(root.rglob(f"*{RECIPE_SUFFIX}")):
        group = path.parent.relative_to(root).as_posix()
        out.setdefault(group, []).append((path.stem, _description(path)))
    return out


def _description(path: Path) -> str:
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line:
            break
    return ""


def find_recipe(spec: str, group: str | None = None) -> Path:
    """A YAML path, or the name of a shipped recipe (searched in ``group`` first, then everywhere)."""
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    root = recipes_root()
    if group and (root / group / f"{spec}{RECIPE_SUFFIX}").is_file():
        return root / group / f"{spec}{RECIPE_SUFFIX}"
    hits = sorted(root.rglob(f"{spec}{RECIPE_SUFFIX}"))
    if len(hits) == 1:
        return hits[0]
    names = [n for g, items in list_recipes().items() if group in (None, g) for n, _ in items]
    close = difflib.get_close_matches(spec, names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else " (see `meddino recipes`)"
    raise ConfigError(f"unknown recipe '{spec}'{hint}")


def load_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe, resolving ``_base_: NAME_OR_PATH`` (the base is merged under this file)."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"recipe {path} includes itself through {BASE_KEY}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config {path}{where}: not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping of keys")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    group = path.parent.name
    base_path = (path.parent / base) if str(base).endswith(RECIPE_SUFFIX) else find_recipe(str(base), group)
    return deep_merge(load_yaml(base_path, _seen + (path,)), data)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values of ``over`` win, mappings are merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "out=runs/x"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(out, key, value, f"override '{item}'")
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any, what: str | None = None) -> None:
    """``data["a"]["b"] = value`` for ``key="a.b"``, creating the mappings on the way."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what or key}: '{part}' is given both a value and sub-keys")
    node[parts[-1]] = value


def validate(schema: type[S], data: dict[str, Any], source: str = "config") -> S:
    """Build ``schema`` from ``data``; the first problem becomes one line naming the key."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, schema, source)) from None


def describe_validation_error(exc: ValidationError, schema: type[BaseModel], source: str) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if not str(p).startswith("function-after")]
    key = ".".join(loc) or "<root>"
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        fields = _fields_at(schema, loc[:-1])
        close = difflib.get_close_matches(loc[-1], fields, n=1) if loc else []
        hint = f" (did you mean '{'.'.join(loc[:-1] + close)}'?)" if close else ""
        return f"{source}: unknown key '{key}'{hint}"
    if kind == "missing":
        return f"{source}: required key '{key}' is missing"
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    given = err.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
    return f"{source}: key '{key}': {msg}{shown}"


def _fields_at(schema: type[BaseModel], path: list[str]) -> list[str]:
    model: Any = schema
    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}).keys())


def load_config(
    schema: type[S],
    spec: str | None,
    overrides: list[str] | None = None,
    group: str | None = None,
    values: dict[str, Any] | None = None,
    source: str | None = None,
) -> S:
    """Recipe (name or path, may be None for schema defaults) + overrides -> validated config.

    ``values`` (dotted key -> value, e.g. a positional path) are set last and as given, not parsed as YAML.
    ``source`` names the config in error messages (default: the recipe file, or "config").
    """
    data: dict[str, Any] = {}
    named = "config"
    if spec:
        path = find_recipe(spec, group)
        data = load_yaml(path)
        named = f"config {path.name}"
    data = deep_merge(data, parse_overrides(list(overrides or [])))
    for key, value in (values or {}).items():
        set_dotted(data, key, value)
    return validate(schema, data, source or named)


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


class RecipesConfig(Schema):
    """``meddino recipes [GROUP]``."""

    group: str | None = None


def print_recipes(cfg: RecipesConfig) -> int:
    """The shipped recipes as a table (only ``cfg.group`` when given)."""
    from rich.console import Console  # rich only for this listing
    from rich.table import Table

    table = Table(title="meddino recipes (use with --config NAME)")
    table.add_column("group")
    table.add_column("name")
    table.add_column("description")
    for group, items in list_recipes().items():
        if cfg.group and group != cfg.group:
            continue
        for name, desc in items:
            table.add_row(group, name, desc)
    Console().print(table)
    return 0
