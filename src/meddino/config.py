"""Typed configs: YAML recipes shipped in the package, dotted ``key.sub=value`` overrides, validation.

Each layer declares its own schema as a pydantic model deriving from :class:`Schema` (unknown keys are
refused). :func:`load_config` resolves a recipe (a shipped name or a YAML path), merges ``_base_`` recipes
and command-line overrides, and validates the result before any work starts. A mistake becomes a
:class:`~meddino.errors.ConfigError` whose one-line message names the offending key.
"""

from __future__ import annotations

import difflib
import types
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

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


def _error_loc(exc: ValidationError) -> list[str]:
    return [str(p) for p in exc.errors()[0].get("loc", ()) if not str(p).startswith("function-after")]


def describe_validation_error(exc: ValidationError, schema: type[BaseModel], source: str) -> str:
    err = exc.errors()[0]
    loc = _error_loc(exc)
    key = ".".join(loc)
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
    if not key:  # a rule over several keys (a model validator): its message names them
        return f"{source}: {msg}"
    return f"{source}: key '{key}': {msg}{shown}"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config section inside an annotation (``Section`` or ``Section | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (model := _model_in(arg)) is not None:
            return model
    return None


def _annotation_at(schema: type[BaseModel], path: list[str]) -> Any:
    """The annotation of the field at ``path`` (None when there is no such field)."""
    model: Any = schema
    annotation = None
    for part in path:
        field = getattr(model, "model_fields", {}).get(part) if model is not None else None
        if field is None:
            return None
        annotation = field.annotation
        model = _model_in(annotation)
    return annotation


def _fields_at(schema: type[BaseModel], path: list[str]) -> list[str]:
    model = _model_in(_annotation_at(schema, path)) if path else schema
    return list(getattr(model, "model_fields", {}).keys())


def _scalar_types(annotation: Any) -> set[Any]:
    """The plain types a field accepts (unions flattened; a Literal counts as the types of its values)."""
    if get_origin(annotation) is Literal:
        return {type(a) for a in get_args(annotation)}
    if get_origin(annotation) in (Union, types.UnionType):
        return set().union(*(_scalar_types(a) for a in get_args(annotation)))
    return {annotation}


def _takes_text_only(annotation: Any) -> bool:
    """A field that takes strings but none of the numbers or booleans YAML reads ``1`` or ``yes`` as."""
    types = _scalar_types(annotation)
    return str in types and not types & {int, float, bool}


def _overrides_as_typed(schema: type[BaseModel], overrides: list[str]) -> dict[str, Any]:
    """The overrides as a nested dict; where a field takes only text, the text as given (``positive_class=1``
    is the label "1", not the integer 1, and ``title=007`` keeps its zeros)."""
    data = parse_overrides(overrides)
    for item in overrides:
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        node: Any = data
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(parts[-1]), (int, float, bool)) \
                and _takes_text_only(_annotation_at(schema, parts)):
            node[parts[-1]] = raw.strip()
    return data


def _blamed_override(loc: list[str], overrides: list[str]) -> str | None:
    """The command-line override an error is about (its key, a key above it or below it), if any."""
    for item in reversed(overrides):  # the last one given wins
        key = item.partition("=")[0].strip().split(".")
        if loc and (loc[: len(key)] == key or key[: len(loc)] == loc):
            return item
    return None


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
    overrides = list(overrides or [])
    data = deep_merge(data, _overrides_as_typed(schema, overrides))
    for key, value in (values or {}).items():
        set_dotted(data, key, value)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        blamed = _blamed_override(_error_loc(exc), overrides)
        where = source or named
        if blamed:  # the verb's own name for its config, if it has one, then the override
            where = f"{source}: override {blamed}" if source else f"override {blamed}"
        raise ConfigError(describe_validation_error(exc, schema, where)) from None


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


class RecipesConfig(Schema):
    """``meddino recipes [GROUP]``."""

    group: str | None = None


def print_recipes(cfg: RecipesConfig) -> int:
    """The shipped recipes as a table (only ``cfg.group`` when given)."""
    from rich.console import Console  # rich only for this listing
    from rich.table import Table

    groups = list_recipes()
    if cfg.group and cfg.group not in groups:
        raise ConfigError(f"recipes: unknown group '{cfg.group}'; the groups are {', '.join(groups)}")
    table = Table(title="meddino recipes (use with --config NAME)")
    table.add_column("group")
    table.add_column("name")
    table.add_column("description")
    for group, items in groups.items():
        if cfg.group and group != cfg.group:
            continue
        for name, desc in items:
            table.add_row(group, name, desc)
    Console().print(table)
    return 0
