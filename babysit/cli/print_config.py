"""``--print-config``: the resolved spec, each value with where it came from and why.

The reasons are the comments written beside each field in babysit/spec/fields.py (one place
states a default and its reason); the allowed values are the field's rule. Nothing here
touches storage, the data or torch: it answers before anything runs.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

from babysit.errors import UsageError
from babysit.spec import Spec
from babysit.spec import all_keys
from babysit.spec import default_run_name
from babysit.spec import load_toml
from babysit.spec import rules

_FIELD = re.compile(r"\s+(\w+)\s*:\s*[^=]+=")


def _comments(cls: type) -> dict[str, str]:
    """{field: the comment block written just above it} for a dataclass and its bases."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # no source (a frozen install): values without reasons
            continue
        block: list[str] = []
        for line in lines:
            text = line.strip()
            if text.startswith("#"):
                block.append(text.lstrip("#").strip())
                continue
            match = _FIELD.match(line)
            if match and block:
                found[match.group(1)] = " ".join(block)
            block = []
    return found


def _fields(spec: Spec) -> list[tuple[str, Any, Any, str]]:
    """(dotted key, value, rule, reason) for every settable key, as TOML and --set spell it."""
    rows = []
    tables = {f.name: f.name for f in dataclasses.fields(spec)}
    for key in all_keys(spec):
        if key == "model.name":
            continue  # the same field as the top-level `model`
        table, _, name = key.rpartition(".")
        obj = getattr(spec, tables[table]) if table else spec
        field = next(f for f in dataclasses.fields(obj) if f.name == name)
        rows.append(
            (
                key,
                getattr(obj, name),
                field.metadata.get("rule"),
                _comments(type(obj)).get(name, ""),
            )
        )
    return rows


def _key_of(given: str, keys: set[str]) -> str | None:
    """The settable key a TOML, --set or flag key names (``overfit.lrs.adam`` is
    ``overfit.lrs``; ``model.name`` is ``model``)."""
    if given in ("model", "model.name"):
        return "model"
    while given and given not in keys:
        given = given.rpartition(".")[0]
    return given or None


def _dotted(data: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            out.extend(_dotted(value, f"{prefix}{key}."))
        else:
            out.append(f"{prefix}{key}")
    return out


def sources(
    config: Path | None, sets: list[str] | tuple[str, ...], flags: dict[str, Any]
) -> dict[str, str]:
    """{key: where its value came from} for every key not left at its default, in the order
    build_spec applies them (a later source wins)."""
    keys = set(all_keys())
    found: dict[str, str] = {}
    if config is not None:
        data = load_toml(config)
        data.pop("ablation", None)
        data.pop("variants", None)
        for given in _dotted(data):
            key = _key_of(given, keys)
            if key:
                found[key] = f"TOML file {config}"
    for assignment in sets:
        key = _key_of(assignment.partition("=")[0].strip(), keys)
        if key:
            found[key] = f"--set {assignment.strip()}"
    for name, value in flags.items():
        if value is not None:
            found[name] = f"flag --{name.replace('_', '-')}"
    return found


def _learned(spec: Spec, key: str, given: dict[str, str]) -> str | None:
    """The value a rule will decide at run time, from what the run measures."""
    if key == "coarse.lr" and key not in given:
        if spec.coarse.lr_range_test:
            return "learned: the LR range test replaces it when the run gets there"
        if spec.coarse.lr_from_overfit:
            return (
                "learned: replaced by a range around the LR that memorises the overfit "
                "subset (coarse.lr_from_overfit), when one does"
            )
    if key == "batch_size" and spec.batch_size == 0:
        return "learned: from the size of the training split, when the run starts"
    if key == "name" and not spec.name:
        return f"default: the dataset's name, {default_run_name(spec.dataset)}"
    return None


def _show(value: Any) -> str:
    """A value as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_show(v)}" for k, v in value.items()) + "}"
    return f"{value:g}" if isinstance(value, float) else str(value)


# Settings that only some runs use: (keys, whom they serve, when they apply).
_FDDB_KEYS = (
    "data.train_folds",
    "data.val_folds",
    "data.test_folds",
    "data.patch_size",
    "data.negatives_per_face",
)
_FRACTION_KEYS = ("data.val_fraction", "data.test_fraction")
# The datasets split from one labelled pool by data.val_fraction / data.test_fraction.
_POOLED = ("digits", "faces", "imagefolder")


def _user_model(spec: Spec) -> bool:
    return ":" in spec.model.name


def _left_out(spec: Spec) -> list[tuple[tuple[str, ...], str]]:
    """The settings this run does not use, in groups: (keys, why not)."""
    out: list[tuple[tuple[str, ...], str]] = []
    if _user_model(spec):
        knobs = tuple(k for k in all_keys(spec) if k.startswith("model.") and k != "model.name")
        out.append((knobs, "babysit's AlexNet only, and the model is the user's"))
    if spec.optimizer != "sgd":
        out.append((("momentum",), f"SGD only, and the optimizer is {spec.optimizer}"))
    if spec.dataset != "fddb":
        out.append((_FDDB_KEYS, "FDDB only"))
    if spec.dataset != "cifar10":
        out.append((("data.val_size",), "CIFAR-10 only"))
    if spec.dataset not in _POOLED:
        out.append((_FRACTION_KEYS, f"datasets split from one pool ({', '.join(_POOLED)})"))
    return out


def check_choices(spec: Spec) -> None:
    """The choices a run checks only when it loads the data and builds the network (the
    dataset's name, a user's module:callable, imported as the run imports it), checked the
    same way, so that --print-config refuses what the run would refuse."""
    if ":" not in spec.dataset and spec.dataset not in rules.DATASETS:
        raise UsageError(
            f"unknown dataset '{spec.dataset}'; choose one of: "
            f"{', '.join(sorted(rules.DATASETS))}, or give module:callable"
        )
    for ref, what in ((spec.model.name, "model"), (spec.dataset, "dataset")):
        if ":" in ref:
            from babysit.refs import resolve

            resolve(ref, what)


def _model_lines(spec: Spec, given: dict[str, str]) -> list[str]:
    """What network will run: babysit's AlexNet (with the model.* knobs below) or the
    user's module:callable."""
    source = given.get("model", "default")
    if _user_model(spec):
        what = (
            f"the user's network, built by {spec.model.name} for the data's classes, "
            "channels and image size, its output shape checked before any trial"
        )
    else:
        what = f"babysit's {spec.model.name}, shaped by the model.* settings below"
    return [f"model = {_show(spec.model.name)}  ({source})", f"    what runs: {what}"]


def spec_lines(
    spec: Spec, config: Path | None, sets: list[str] | tuple[str, ...], flags: dict[str, Any]
) -> list[str]:
    """What will run: the model, then the resolved spec's settings this run uses, each as
    ``key = value  (source)`` with why and what is allowed; last, the settings left out."""
    check_choices(spec)
    given = sources(config, sets, flags)
    lines = [
        f"# what will run, resolved from defaults < {'the TOML file < ' if config else ''}"
        "--set < flags; `key = value  (source)`, why, what is allowed"
    ]
    skipped = {k for keys, _ in _left_out(spec) for k in keys}
    for key, value, rule, reason in _fields(spec):
        if key in skipped:
            continue
        source = _learned(spec, key, given) or given.get(key, "default")
        lines.append(f"{key} = {_show(value)}  ({source})")
        if reason:
            lines.append(f"    why: {reason}")
        if rule is not None:
            lines.append(f"    allowed: {rule.allowed}")
        if key == "dataset":
            lines += _model_lines(spec, given)
    for keys, why in _left_out(spec):
        lines.append(f"# not used by this run ({why}): {', '.join(keys)}")
    return lines
