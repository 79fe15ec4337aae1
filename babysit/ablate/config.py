"""The ablation config of `babysit ablate` (its format: the docstring of babysit/ablate/run.py),
read and checked whole, every variant's spec included, before anything trains."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from babysit.errors import UsageError
from babysit.schema import Param
from babysit.schema import Stage
from babysit.spec import Spec
from babysit.spec import build_spec
from babysit.spec import load_toml
from babysit.spec import validate
from babysit.spec.parse import apply_set

_MODES = (Stage.FINAL, "full")
_ABLATION_KEYS = ("name", "mode", "params", "repeats")
_VARIANT_KEYS = ("name", "set", "params", "description", "reported")
_PARAM_KEYS = (Param.LR, Param.WEIGHT_DECAY)
# Variant names become study names (<ablation>/<variant>/final) and folder names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class Variant:
    name: str
    change: str
    sets: dict[str, Any]
    params: dict[str, float] | None
    reported: float | None


@dataclass
class Ablation:
    name: str
    mode: str
    repeats: int
    variants: list[Variant]
    # (variant, repeat, spec) for every run, in the order they are trained.
    runs: list[tuple[Variant, int, Spec]]


def run_name(ablation: str, variant: str, repeat: int) -> str:
    return f"{ablation}/{variant}" if repeat == 0 else f"{ablation}/{variant}/r{repeat}"


def _toml_value(value: Any) -> str:
    """A value as a TOML literal, so a variant's override goes through --set's own parser."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, int) else _toml_float(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items())
            + "}"
        )
    raise UsageError(f"cannot use {value!r} as a config value")


def _toml_float(value: float) -> str:
    if value != value:
        return "nan"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return repr(value)


def _table_valued_keys() -> set[str]:
    """Keys whose value is itself a table (overfit.lrs): a variant sets them whole."""
    spec = Spec()
    out: set[str] = set()
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if dataclasses.is_dataclass(value):
            out.update(
                f"{f.name}.{g.name}"
                for g in dataclasses.fields(value)
                if isinstance(getattr(value, g.name), dict)
            )
    return out


def _flatten_sets(table: dict[str, Any], whole: set[str], prefix: str = "") -> dict[str, Any]:
    """``{"model.conv_layers" = 4}`` and ``{model.conv_layers = 4}`` (which TOML reads as
    ``{model = {conv_layers = 4}}``) both become ``{"model.conv_layers": 4}``; a
    table-valued key (overfit.lrs) stays whole."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and full not in whole:
            flat.update(_flatten_sets(value, whole, prefix=f"{full}."))
        else:
            flat[full] = value
    return flat


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else _toml_value(value)


def _params(raw: Any, where: str) -> dict[str, float]:
    if not isinstance(raw, dict) or set(raw) != set(_PARAM_KEYS):
        raise UsageError(
            f"{where} must be a table with exactly lr and weight_decay, "
            f"like {{lr = 1e-4, weight_decay = 5e-4}}; got {raw!r}"
        )
    out: dict[str, float] = {}
    for key in _PARAM_KEYS:
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UsageError(f"{where}.{key} must be a positive number, got {value!r}")
        out[key] = float(value)
    return out


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in table if k not in allowed]
    if unknown:
        raise UsageError(
            f"unknown key '{unknown[0]}' in {where}; known keys: {', '.join(allowed)}"
        )


def load_ablation(config: Path, sets: list[str] | tuple[str, ...] = ()) -> Ablation:
    """Read and check the whole config, every variant's spec included, before anything
    trains: a typo in the last variant is an exit-2 error now, not after hours."""
    data = load_toml(config)
    table = data.get("ablation", {})
    if not isinstance(table, dict):
        raise UsageError(f"{config}: [ablation] must be a table")
    _check_keys(table, _ABLATION_KEYS, "[ablation]")
    base = build_spec(config, sets)
    name = table.get("name", base.name or config.stem)
    if not isinstance(name, str) or not all(_NAME.match(p) for p in name.split("/")):
        raise UsageError(f"ablation.name must be letters, digits, - _ . + (and /), got {name!r}")
    mode = table.get("mode", Stage.FINAL)
    if mode not in _MODES:
        raise UsageError(f"ablation.mode must be one of {', '.join(_MODES)}, got {mode!r}")
    repeats = table.get("repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise UsageError(f"ablation.repeats must be a whole number >= 1, got {repeats!r}")
    if mode == Stage.FINAL:
        if "params" not in table:
            raise UsageError(
                "ablation.mode 'final' trains at fixed parameters: give "
                "ablation.params = {lr = ..., weight_decay = ...}"
            )
        default_params: dict[str, float] | None = _params(table["params"], "ablation.params")
    else:
        if "params" in table:
            raise UsageError("ablation.params is for mode 'final'; mode 'full' searches them")
        default_params = None

    raw_variants = data.get("variants")
    if not raw_variants:
        raise UsageError(
            f"{config} has no variants: add [[variants]] entries, each with a "
            'name and a set = {"model.conv_layers" = 4} table'
        )
    if not isinstance(raw_variants, list) or not all(isinstance(v, dict) for v in raw_variants):
        raise UsageError(f"{config}: variants must be [[variants]] tables")
    whole = _table_valued_keys()
    variants: list[Variant] = []
    runs: list[tuple[Variant, int, Spec]] = []
    for i, raw in enumerate(raw_variants, 1):
        vname = raw.get("name")
        where = f"variant '{vname}'" if isinstance(vname, str) else f"variant #{i}"
        _check_keys(raw, _VARIANT_KEYS, where)
        if not isinstance(vname, str) or not _NAME.match(vname):
            raise UsageError(
                f"{where} needs a name of letters, digits, - _ . + "
                f"(it names the run {name}/<name>), got {vname!r}"
            )
        if any(v.name == vname for v in variants):
            raise UsageError(f"two variants are named '{vname}'")
        raw_set = raw.get("set", {})
        if not isinstance(raw_set, dict):
            raise UsageError(f'{where}: set must be a table like {{"model.conv_layers" = 4}}')
        overrides = _flatten_sets(raw_set, whole)
        if "name" in overrides:
            raise UsageError(f"{where}: set cannot change the run name; it is {name}/{vname}")
        params = default_params
        if "params" in raw:
            if mode != Stage.FINAL:
                raise UsageError(f"{where}: params is for mode 'final'")
            params = _params(raw["params"], f"{where} params")
        reported = raw.get("reported")
        if reported is not None and (
            isinstance(reported, bool) or not isinstance(reported, (int, float))
        ):
            raise UsageError(f"{where}: reported must be a number (an accuracy), got {reported!r}")
        description = raw.get("description")
        if description is not None and not isinstance(description, str):
            raise UsageError(f"{where}: description must be a string")
        change = description or (
            ", ".join(f"{k}={_shown(v)}" for k, v in overrides.items()) or "baseline"
        )
        variant = Variant(
            vname, change, overrides, params, None if reported is None else float(reported)
        )
        variants.append(variant)
        for k in range(repeats):
            spec = build_spec(config, sets)
            for key, value in overrides.items():
                try:
                    apply_set(spec, f"{key}={_toml_value(value)}")
                except UsageError as err:
                    raise UsageError(f"{where}: {err}") from None
            try:
                validate(spec)
            except UsageError as err:
                raise UsageError(f"{where}: {err}") from None
            spec.name = run_name(name, vname, k)
            spec.seed = base.seed + k
            runs.append((variant, k, spec))
    return Ablation(name, mode, repeats, variants, runs)
