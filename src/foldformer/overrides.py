"""Typed configuration values: one reader for the command line, TOML/JSON files and Python.

A value is checked against its dataclass field's type by pydantic, in lax mode: on the command
line "3e-4" is a float, "no"/"false"/"0" a bool, "a,b" a list, "none" None where the field allows
it. A value that does not fit is a ConfigError naming the field and the value. ``train`` and
``compare`` read overrides through `apply_overrides`, so both accept the same syntax.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from foldformer.config import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type (the dataclasses' annotations are strings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def _adapter(tp: Any) -> TypeAdapter:
    return TypeAdapter(tp)


def _allows_none(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) is list


def type_name(tp: Any) -> str:
    if isinstance(tp, type) and not isinstance(tp, types.GenericAlias):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def parse_value(tp: Any, value: Any, where: str) -> Any:
    """`value` (a command-line string, a file's value or a Python one) as type `tp`."""
    given = value
    if isinstance(value, str):
        if value.lower() in ("none", "null") and _allows_none(tp):
            return None
        if _is_list(tp):
            value = [part for part in value.split(",") if part]
    numeric = tp in (int, float) or set(typing.get_args(tp)) & {int, float}
    try:
        if isinstance(value, bool) and numeric:  # True is no step count
            raise ValueError
        parsed = _adapter(tp).validate_python(value)
        if isinstance(parsed, float) and not math.isfinite(parsed):
            raise ValueError
    except (ValidationError, ValueError):
        kind = type_name(tp).replace("float", "finite float")
        raise ConfigError(f"{where}={given!r} is not {_article(kind)} {kind}") from None
    return parsed


def typed(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    """`values` with each field of `cls` parsed by its type; unknown names are left as they are
    for `cls.from_dict` to reject by name."""
    types_ = field_types(cls)
    return {
        name: parse_value(types_[name], value, f"{section}.{name}") if name in types_ else value
        for name, value in values.items()
    }


def resolve_key(key: str, sections: dict[str, type]) -> tuple[str, str]:
    """`section.name` (the longest section that matches: `overrides.rmt.memory_len`) or a bare
    name that exactly one section has."""
    key = key.replace("-", "_")
    owners = {s: set(field_types(c)) for s, c in sections.items()}
    section, _, name = key.rpartition(".")
    if section in sections:
        if name in owners[section]:
            return section, name
        raise ConfigError(  # the wording of a misspelt field in a file (JsonConfig.from_dict)
            f"unknown option --{key}: unknown {sections[section].__name__} field(s) {[name]}; "
            f"known fields: {sorted(owners[section])}"
        )
    if not section:
        found = [s for s, names in owners.items() if key in names]
        if len(found) == 1:
            return found[0], key
        if len(found) > 1:
            raise ConfigError(f"--{key} is ambiguous: write one of {[f'{s}.{key}' for s in found]}")
    raise ConfigError(f"unknown option --{key}: no field of that name in {', '.join(sections)}")


def apply_overrides(
    values: dict[str, Any],
    overrides: dict[str, Any],
    sections: dict[str, type],
    as_given: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Set each `key: value` of `overrides` into `values` (nested dicts, one per section; a
    dotted section such as `overrides.rmt` is a dict inside a dict), parsed by the field's type.
    `sections` maps each section to its dataclass; the sections in `as_given` take the value as
    it is, for their dataclass to parse (compare's [eval] reads sizes such as "4K"). Returns
    `values`."""
    for key, raw in overrides.items():
        section, name = resolve_key(key, sections)
        target = values
        for part in section.split("."):
            target = target.setdefault(part, {})
        if section in as_given:
            target[name] = raw
        else:
            tp = field_types(sections[section])[name]
            target[name] = parse_value(tp, raw, f"{section}.{name}")
    return values


def read_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """A TOML (or .json) file of sections; a syntax error is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    kind = "JSON" if path.suffix == ".json" else "TOML"
    try:
        text = path.read_text()
        loaded = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid {kind}: {error}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold sections ([train], ...), got {type(loaded).__name__}")
    for section, fields in loaded.items():
        if not isinstance(fields, dict):
            raise ConfigError(f"[{section}] in {path} must be a table, got {fields!r}")
    return loaded


def field_comments(cls: type) -> dict[str, str]:
    """The `# comment` after each field in the class's source: the field's help text."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^\s+(\w+): [^#\n]*=[^#\n]*#\s*(.+)$", source, flags=re.MULTILINE)
    return dict(found)
