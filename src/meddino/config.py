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


def _header(path: Path) -> tuple[str, str]:
    """(description, usage) from a recipe's leading comment block: its first line and the lines that
    continue its sentence (starting in lower case or with a digit), and the ``# usage:`` line."""
    described: list[str] = []
    usage = ""
    ended = False
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line.startswith("#"):
            if line:
                break
            continue
        text = line.lstrip("#").strip()
        if text.lower().startswith("usage:"):
            usage = text[len("usage:"):].strip()
        elif not described:
            described.append(text)
        elif not ended and text and (text[0].islower() or text[0].isdigit()):
            described.append(text)
        else:
            ended = True  # a new sentence or paragraph: notes, not the one-line description
    return " ".join(t for t in described if t), usage


def _description(path: Path) -> str:
    return _header(path)[0]


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
    if len(hits) > 1:  # the same name in several groups: the group must be named
        named = [f"{h.parent.relative_to(root).as_posix()}/{spec}" for h in hits]
        raise ConfigError(f"recipe '{spec}' is in several groups; name one: {' or '.join(named)}")
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
    """``meddino recipes [GROUP] [--json]`` and ``meddino recipes show NAME [--json]``."""

    group: str | None = None  # a recipe group, or "show"
    name: str | None = None  # with show: the recipe (NAME, GROUP/NAME or a YAML path)
    json_output: bool = False


def recipe_entries(group: str | None = None) -> list[dict[str, str | None]]:
    """Every shipped recipe (of ``group``) as a record: group, name, description, usage, its ``_base_``,
    and the file."""
    root = recipes_root()
    out = []
    for path in sorted(root.rglob(f"*{RECIPE_SUFFIX}")):
        g = path.parent.relative_to(root).as_posix()
        if group and g != group:
            continue
        description, usage = _header(path)
        try:
            base = (yaml.safe_load(path.read_text()) or {}).get(BASE_KEY)
        except (yaml.YAMLError, AttributeError):
            base = None
        out.append({"group": g, "name": path.stem, "description": description, "usage": usage or None,
                    "base": None if base is None else str(base), "path": str(path)})
    return out


def print_recipes(cfg: RecipesConfig) -> int:
    """The shipped recipes, one per line under its group (``--json``: a list of records), or (``show
    NAME``) one recipe with its ``_base_`` merged. Plain text, not a table: a table wraps unreadably in an
    80-column terminal and cannot be parsed."""
    import json  # why: only this listing needs it
    import shutil
    import sys
    import textwrap

    if cfg.group == "show":
        return _show_recipe(cfg)
    if cfg.name is not None:
        raise ConfigError(f"recipes: '{cfg.name}' after a group; to print a recipe use `meddino recipes show "
                          f"{cfg.name}`")
    groups = list_recipes()
    if cfg.group and cfg.group not in groups:
        raise ConfigError(f"recipes: unknown group '{cfg.group}'; the groups are {', '.join(groups)}, "
                          "or `show NAME` prints one recipe")
    entries = recipe_entries(cfg.group)
    if cfg.json_output:
        print(json.dumps(entries, indent=2))
        return 0
    # on a terminal each description wraps under itself; piped, one line per recipe (grep, cut)
    width = shutil.get_terminal_size((100000, 24)).columns if sys.stdout.isatty() else 100000
    indent = 2 + max(len(e["name"]) for e in entries) + 2
    print("use a recipe with --config NAME; `meddino recipes show NAME` prints it")
    for group in dict.fromkeys(e["group"] for e in entries):
        print(f"\n{group}")
        for e in entries:
            if e["group"] != group:
                continue
            line = f"  {e['name'].ljust(indent - 4)}  {e['description']}".rstrip()
            print(textwrap.fill(line, width=max(width, indent + 20), subsequent_indent=" " * indent,
                                break_on_hyphens=False) if len(line) > width else line)
    return 0


def _show_recipe(cfg: RecipesConfig) -> int:
    """``recipes show NAME``: the recipe as the verb reads it (``_base_`` merged), as YAML that ``--config``
    takes back; keys it does not set take the verb's defaults."""
    import json  # why: only --json needs it

    if not cfg.name:
        raise ConfigError("recipes show: give a recipe name (see `meddino recipes`), e.g. "
                          "`meddino recipes show dinov2_vits14`")
    group, _, name = cfg.name.rpartition("/")
    path = find_recipe(cfg.name) if cfg.name.endswith((".yaml", ".yml")) or not group else \
        find_recipe(name, group)
    if group and not cfg.name.endswith((".yaml", ".yml")) and path.parent.name != group:
        raise ConfigError(f"recipes show: no recipe '{name}' in group '{group}' (see `meddino recipes {group}`)")
    data = load_yaml(path)
    root = recipes_root()
    shipped = path.resolve().is_relative_to(root.resolve())
    where = f"{path.parent.name}/{path.stem}" if shipped else str(path)
    if cfg.json_output:
        print(json.dumps({"recipe": where, "path": str(path), "config": data}, indent=2))
        return 0
    description, _ = _header(path)
    base = (yaml.safe_load(path.read_text()) or {}).get(BASE_KEY)
    print(f"# recipe {where}" + (f": {description}" if description else ""))
    print(f"# {path}" + (f", with its {BASE_KEY} ({base}) merged in" if base else "")
          + "; the keys it does not set take the verb's defaults (listed by the verb's --help)")
    print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0
