"""From files and plain mappings to validated config dataclasses.

:func:`load_mapping` reads YAML (``3e-4`` is a number, a key given twice is refused), JSON or
TOML; :func:`apply_overrides` applies ``--set section.key=value``; :func:`build` turns a mapping
into a frozen config dataclass, with pydantic checking every field's type and refusing unknown
keys, and turns pydantic's errors into one :class:`~cusa.errors.ConfigError` line that names the
key, the value and the fix. Value ranges are declared on the fields with :func:`in_range` (a
pydantic ``Field`` constraint); :func:`check_ranges` applies the same declarations to a section
built in Python, with the same message.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
import typing
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import (
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)
from pydantic.fields import FieldInfo

from cusa.errors import ConfigError
from cusa.safe_files import MAX_CONFIG_BYTES, read_regular_file, short_path, short_repr

C = TypeVar("C")


# ---- dict -> dataclass, validated by pydantic ----------------------------------------------------

#: Every section refuses a key it does not have (pydantic reads this from each dataclass).
SECTION = ConfigDict(extra="forbid")

#: pydantic's error types, as the one-line fix a config author needs.
_TYPE_MESSAGES = {
    "bool_type": "must be true or false",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
    "dict_type": "must be a mapping",
    "too_long": "has too many items",
}


#: pydantic's two names for a key the dataclass does not have.
_UNKNOWN_KEY = ("unexpected_keyword_argument", "extra_forbidden")


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def build(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """Build a config dataclass from a plain mapping, rejecting unknown keys.

    pydantic checks the types and the declared ranges (:func:`in_range`) of the fields; each
    section's ``__post_init__`` checks what involves several fields.

    Raises:
        ConfigError: an unknown key, a wrongly typed value or a value out of range.
    """
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as exc:
        raise _config_error(exc, cls, data, where) from None


def _section(tp: Any) -> type | None:
    """The config dataclass a field type holds (directly or as the one dataclass of a union)."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    found = [a for a in get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)]
    return found[0] if len(found) == 1 else None


def _config_error(exc: ValidationError, cls: type, data: Any, where: str) -> ConfigError:
    """pydantic's error as one line naming the key, the value and the fix.

    Of several errors the deepest is reported: for a union field (a temperature pair or
    ``"csa"``) that is the form the value was meant as.
    """
    errors = exc.errors(include_url=False)
    error = max(errors, key=lambda e: len(e["loc"]))
    raised = (error.get("ctx") or {}).get("error")
    if isinstance(raised, ConfigError):  # a section's own range check
        return raised
    kind, loc = error["type"], error["loc"]
    if kind in _UNKNOWN_KEY:  # the last part is the unknown key itself
        loc = loc[:-1]
    # Walk the location through the sections; a part that is not a field is a union member's tag.
    names, owners, value = [where] if where else [], [cls], data
    for part in loc:
        section = _section(owners[-1])
        if isinstance(part, int):
            if isinstance(value, (list, tuple)) and part < len(value):
                names[-1] += f"[{part}]"
                value = value[part]
        elif section is not None and part in {f.name for f in dataclasses.fields(section)}:
            names.append(part)
            owners.append(_hints(section)[part])
            value = value.get(part) if isinstance(value, dict) else value
    name = ".".join(names)
    if kind in _UNKNOWN_KEY:
        key = ".".join([*names, str(error["loc"][-1])])
        allowed = ", ".join(f.name for f in dataclasses.fields(_section(owners[-1])))
        return ConfigError(f"unknown config key {key!r}; allowed keys here: {allowed}")
    if loc and isinstance(loc[-1], str) and loc[-1] != names[-1]:  # no form of a union fits
        forms = " / ".join(e["msg"] for e in errors if len(e["loc"]) == len(loc))
        return ConfigError(f"{name}={short_repr(value)} fits none of its forms: {forms}")
    if kind in _RANGE_ERRORS and (declared := _declared_range(owners[-1])) is not None:
        shown = error["input"]
        if isinstance(shown, int) and _is_float_field(owners[-1]):
            shown = float(shown)  # as the section would hold it
        return ConfigError(range_message(declared, name, shown))
    if kind == "literal_error":
        return ConfigError(
            f"{name}={short_repr(value)} is not allowed; use one of {list(get_args(owners[-1]))}"
        )
    if kind == "missing" and isinstance(loc[-1], int):
        return ConfigError(
            f"{name}={short_repr(value)} must have {len(get_args(owners[-1]))} items"
        )
    if kind == "missing":
        return ConfigError(
            f"{'.'.join(names[:-1]) or cls.__name__}: missing required key {names[-1]!r}"
        )
    if kind == "dataclass_type":
        keys = [f.name for f in dataclasses.fields(_section(owners[-1]))]
        return ConfigError(f"{name} must be a mapping of {keys}, got {short_repr(value)}")
    return ConfigError(f"{name}={short_repr(value)} {_TYPE_MESSAGES.get(kind, error['msg'])}")


def to_dict(obj: Any) -> Any:
    """A config dataclass as plain JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def check_positive(value: float, name: str, fix: str = "use a value > 0") -> None:
    """For a number that is not a config field (a function argument)."""
    if not (value > 0) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is out of range; {fix}")


# ---- value ranges, declared on the fields ------------------------------------------------------

#: pydantic's error types for a value outside a field's declared range.
_RANGE_ERRORS = frozenset(
    {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}
)
_DEFAULT_MESSAGE = "{name}={value!r} is out of range; {fix}"


def in_range(
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    fix: str | None = None,
    message: str | None = None,
    finite: bool = True,
) -> Any:
    """A field's range, for ``Annotated[StrictFloat, in_range(gt=0)]``: a pydantic ``Field``
    constraint (checked when a config is built from a mapping) that :func:`check_ranges` also
    applies to a section built in Python.

    Args:
        gt, ge, lt, le: the bounds.
        fix: how to fix a value outside them (default: the range in words).
        message: the whole message, a format string with ``{name}``, ``{value}`` and ``{fix}``
            (default ``"{name}={value!r} is out of range; {fix}"``).
        finite: refuse ``inf`` and ``nan`` (float fields).
    """
    bounds = {"gt": gt, "ge": ge, "lt": lt, "le": le}
    extra = {
        "fix": fix or _range_words(bounds),
        "message": message or _DEFAULT_MESSAGE,
    }
    kwargs: dict[str, Any] = {k: v for k, v in bounds.items() if v is not None}
    if finite:
        kwargs["allow_inf_nan"] = False
    return Field(json_schema_extra=extra, **kwargs)


def _range_words(bounds: dict[str, float | None]) -> str:
    low = (
        f"[{bounds['ge']}" if bounds["ge"] is not None
        else f"({bounds['gt']}" if bounds["gt"] is not None
        else None
    )  # fmt: skip
    high = (
        f"{bounds['le']}]" if bounds["le"] is not None
        else f"{bounds['lt']})" if bounds["lt"] is not None
        else None
    )  # fmt: skip
    if low and high:
        return f"use a value in {low}, {high}"
    if low:
        return f"use a value {'>=' if low[0] == '[' else '>'} {low[1:]}"
    return f"use a value {'<=' if high[-1] == ']' else '<'} {high[:-1]}"


def range_message(declared: FieldInfo, name: str, value: Any) -> str:
    """The one-line message for ``value`` outside the range ``declared`` for field ``name``."""
    extra: Any = declared.json_schema_extra  # a dict: in_range sets it
    return str(extra["message"]).format(name=name, value=value, fix=extra["fix"])


def _in_declared_range(declared: FieldInfo, value: Any) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    for bound in declared.metadata:
        for attr, ok in (
            ("gt", lambda v, b: v > b),
            ("ge", lambda v, b: v >= b),
            ("lt", lambda v, b: v < b),
            ("le", lambda v, b: v <= b),
        ):
            limit = getattr(bound, attr, None)
            if limit is not None and not ok(value, limit):
                return False
    return True


@functools.cache
def _hints(section: type) -> dict[str, Any]:
    return typing.get_type_hints(section, include_extras=True)


def _declared_range(tp: Any) -> FieldInfo | None:
    """The :func:`in_range` declaration inside a field type (``Annotated``, in a union or tuple)."""
    if typing.get_origin(tp) is typing.Annotated:
        for meta in tp.__metadata__:
            extra = meta.json_schema_extra if isinstance(meta, FieldInfo) else None
            if isinstance(extra, dict) and "message" in extra:
                return meta
        return None
    for arg in get_args(tp):
        found = _declared_range(arg)
        if found is not None:
            return found
    return None


def _is_float_field(tp: Any) -> bool:
    if typing.get_origin(tp) is typing.Annotated:
        return _is_float_field(get_args(tp)[0])
    return tp is float or any(_is_float_field(a) for a in get_args(tp))


def check_ranges(section: Any, where: str) -> None:
    """Check every field of ``section`` against the range declared on it (:func:`in_range`).

    pydantic does the same when a config is built from a mapping; this covers sections built in
    Python (``OptimConfig(lr=-1)``), so both ways give the same message.

    Raises:
        ConfigError: a value outside its field's range, named ``<where>.<field>``.
    """
    hints = _hints(type(section))
    for f in dataclasses.fields(section):
        declared = _declared_range(hints[f.name])
        value = getattr(section, f.name)
        if declared is None or value is None:
            continue
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, item in items:
            number = isinstance(item, (int, float)) and not isinstance(item, bool)
            if number and not _in_declared_range(declared, item):
                name = f"{where}.{f.name}" + ("" if i is None else f"[{i}]")
                raise ConfigError(range_message(declared, name, item))


# ---- files and overrides ----------------------------------------------------------------------


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML scalars) to a config mapping.

    Raises:
        ConfigError: an override without ``=`` or with an empty key.
    """
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"override {item!r} must look like section.key=value, e.g. optim.lr=3e-4"
            )
        try:
            value = yaml.load(raw, Loader=ConfigLoader) if raw.strip() else None
        except yaml.YAMLError:  # not YAML: keep the string
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"duplicate key {key!r}; each key may appear once per section")
        seen[key] = value
    return seen


#: Numbers YAML 1.2 reads as floats and PyYAML's YAML 1.1 reads as strings: ``3e-4``, ``1.0e5``.
_YAML12_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$")


class ConfigLoader(yaml.SafeLoader):
    """The YAML loader of configs: a ``SafeLoader`` that reads ``3e-4`` as a number and refuses
    a key given twice in one mapping (PyYAML would keep the last)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(
                    f"duplicate key {key!r} at line {line}; each key may appear once per section"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_document(self, node: Any) -> Any:
        # Aliases share nodes, so a few lines can stand for billions of values ("billion
        # laughs"); count the values with every alias expanded, before building anything.
        _check_expanded_size(node)
        return super().construct_document(node)


#: Most values a config (or one ``--set`` value) may hold with its YAML aliases expanded.
MAX_CONFIG_VALUES = 100_000


def _check_expanded_size(root: Any) -> None:
    sizes: dict[int, int] = {}  # id(node) -> values under it, aliases expanded
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:  # iterative post-order: deep nesting cannot overflow the Python stack
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children: list[Any] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if done:
            total = 1 + sum(sizes.get(id(c), 0) for c in children)
            if total > MAX_CONFIG_VALUES:
                line = node.start_mark.line + 1
                raise ConfigError(
                    f"the YAML at line {line} expands to more than {MAX_CONFIG_VALUES:,} values "
                    "through its aliases (*name); a config needs a few hundred — write the values "
                    "out instead of nesting aliases"
                )
            sizes[id(node)] = total
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)


ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789"))


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML, JSON or TOML file into a dict, with errors naming the file."""
    p = Path(path)
    # Regular files up to MAX_CONFIG_BYTES only (cusa.safe_files), checked before any parsing:
    # a FIFO, a folder or /dev/zero is named as what it is, a 1 GB file is never read.
    data, reason = read_regular_file(p, MAX_CONFIG_BYTES, what="config file")
    if data is None:
        if "not found" in str(reason):
            reason = f"config file {short_path(p)} does not exist"
        raise ConfigError(f"{reason}; give the path of a .yaml, .json or .toml file")
    suffix = p.suffix.lower()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {short_path(p)} is not UTF-8 text ({exc.reason})") from None
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=ConfigLoader)  # ConfigLoader is a SafeLoader
        elif suffix == ".json":
            data = json.loads(text, object_pairs_hook=_unique_json_object)
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ImportError as exc:
                    raise ConfigError(
                        f"reading {str(p)!r} needs Python 3.11+ or 'pip install tomli'"
                    ) from exc
            data = tomllib.loads(text)
        else:
            raise ConfigError(
                f"config file {str(p)!r} has suffix {suffix!r}; use .yaml, .yml, .json or .toml"
            )
    except ConfigError:
        raise
    except Exception as exc:  # parse errors of three different libraries
        raise ConfigError(f"cannot parse config file {str(p)!r}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(p)!r} must hold a mapping of sections, got {type(data).__name__}"
        )
    return data
