"""Reading spec values: TOML files, ``--set KEY=VALUE`` and mappings (flags, stored specs).

Everything here works on any tree of dataclasses, so it holds no knowledge of the spec's
fields: babysit/spec/fields.py builds the spec and layers defaults, file, --set and flags.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from babysit.errors import UsageError

# Keys read under another name. Stored specs of earlier versions call the network's table
# "arch" (its reference was the top-level string "model"); reading it as "model" keeps every
# stored run loadable and resumable, and a spec given "arch" is written back as "model".
KEY_ALIASES = {"arch": "model"}


def _field_values(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _coerce(key: str, value: Any, current: Any) -> Any:
    """Check ``value`` against the type of the default it replaces."""
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, str):
        if isinstance(value, str):
            return value
    elif isinstance(current, list):
        # A list of choices (coarse.schedule): strings, checked against the field's rule.
        if (
            isinstance(value, list)
            and all(isinstance(v, str) for v in current)
            and all(isinstance(v, str) for v in value)
            and (value or current)
        ):
            return list(value)
        if isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            if current and all(isinstance(v, int) for v in current):
                if all(isinstance(v, int) for v in value):
                    return list(value)
            else:
                return [float(v) for v in value]
    elif isinstance(current, dict):
        if isinstance(value, dict):
            return dict(value)
    expected = type(current).__name__
    raise UsageError(f"config key '{key}' expects {expected} (like {current!r}), got {value!r}")


def apply_mapping(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Set the fields of the dataclass ``obj`` (and of its tables) from ``data``.

    A table with a ``name`` field also takes a bare value as its name: ``model = "x"`` is
    ``model.name = "x"`` (TOML cannot hold both ``model = "x"`` and a ``[model]`` table, and
    ``--model``, ``babysit.run(model=)`` and stored specs of earlier versions give it so).
    """
    fields = _field_values(obj)
    for raw_key, value in data.items():
        key = KEY_ALIASES.get(raw_key, raw_key) if not prefix else raw_key
        full = f"{prefix}{key}"
        if key not in fields:
            raise UsageError(
                f"unknown config key '{prefix}{raw_key}'; known keys: {known_keys_hint(obj)}"
            )
        current = fields[key]
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                if "name" in _field_values(current):
                    value = {"name": value}
                else:
                    raise UsageError(f"config key '{full}' is a table; set its fields as {full}.X")
            apply_mapping(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(full, value, current))


def known_keys_hint(obj: Any) -> str:
    names = []
    for f in dataclasses.fields(obj):
        names.append(f"{f.name}.*" if dataclasses.is_dataclass(getattr(obj, f.name)) else f.name)
    return ", ".join(names)


def all_keys(obj: Any) -> list[str]:
    """Every settable key of ``obj``, dotted, as TOML and --set spell them."""
    keys: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(f"{f.name}.{g.name}" for g in dataclasses.fields(value))
        else:
            keys.append(f.name)
    return keys


def parse_value(text: str) -> Any:
    """Parse the VALUE of --set KEY=VALUE as a TOML value, falling back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_set(obj: Any, assignment: str) -> None:
    """Apply one ``--set KEY=VALUE`` (KEY dotted into tables) to ``obj``."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set expects KEY=VALUE, got '{assignment}'")
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = parse_value(text.strip())
    apply_mapping(obj, nested)


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(
            f"config {path} is a folder; give a TOML file in it, e.g. studies/digits.toml"
        ) from None
    except OSError as err:
        raise UsageError(f"cannot read config file {path}: {err.strerror or err}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"config file {path} is not valid TOML: {err}") from None


def dotted(obj: Any, data: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys ``data`` sets on ``obj`` (a table-valued key such as overfit.lrs
    counts whole; a bare value given to a table, ``model = "x"``, sets ``model.name``)."""
    fields = _field_values(obj)
    keys: list[str] = []
    for raw_key, value in data.items():
        key = KEY_ALIASES.get(raw_key, raw_key) if not prefix else raw_key
        current = fields.get(key)
        if dataclasses.is_dataclass(current):
            if isinstance(value, dict):
                keys.extend(dotted(current, value, f"{prefix}{key}."))
            else:
                keys.append(f"{prefix}{key}.name")
        else:
            keys.append(f"{prefix}{key}")
    return keys
