"""What each spec field allows, stated once: the sets of choices, the rules that check a
value, and what a run name may be.

The command line (``choices=``, its help), the models and the spec's validation all read
the choices from here, so a new optimizer, loss or pruner is added in one place.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from babysit.errors import UsageError

# ---------------------------------------------------------------------------- choices
# The spec's closed sets. The first of each is not necessarily its default: the defaults
# and the reasons for them stand beside the fields in babysit/spec/fields.py.
# "nesterov" is SGD with Nesterov momentum (``momentum`` as for sgd): one name on the
# command line like the others, not a flag that would mean nothing to adam and adamw.
OPTIMIZERS = ("sgd", "adam", "adamw", "nesterov")
# The optimizer whose overfit.lrs list an optimizer uses when the table has no entry of its
# own: AdamW steps like Adam, Nesterov like SGD (so stored specs keep their two entries).
OVERFIT_LRS_OF = {"adamw": "adam", "nesterov": "sgd"}
# LR decay over a trial's epochs (babysit/training/step.py, lr_factor).
SCHEDULES = ("none", "step", "cosine")
LOSSES = ("ce", "bce")
SAMPLERS = ("random", "tpe")
PRUNERS = ("median", "halving", "none")
NORMALIZATIONS = ("dataset", "imagenet", "none")
# babysit's own networks (anything else is a module:callable reference).
MODELS = ("alexnet",)
# The datasets babysit registers itself (babysit/data); tests check the registry matches.
DATASETS = ("digits", "faces", "cifar10", "fddb", "imagefolder")
# AlexNet's knobs (babysit/training/models.py builds each of them).
CONV_LAYERS = (3, 4, 5)
FC_LAYERS = (1, 2, 3)
ACTIVATIONS = ("relu", "leaky_relu")
BATCH_NORMS = ("none", "first2", "all")
INITS = ("he", "default")
GEOMETRIES = ("cifar32", "alexnet227")
# Not spec fields, but choices the command line offers: where to train, how to export.
DEVICES = ("auto", "cpu", "cuda")
EXPORT_FORMATS = ("csv", "parquet")


def either(choices: tuple[str, ...], last: str = "or") -> str:
    """``a, b or c``: a set of choices as words, for help texts and messages."""
    return ", ".join(choices[:-1]) + f" {last} {choices[-1]}" if len(choices) > 1 else choices[0]


# ---------------------------------------------------------------------------- rules
# What each field allows is stated beside it (``rule=`` in its metadata) and enforced by
# validate() for every way a spec is built: flags, --set, TOML, babysit.run(), a stored spec.


@dataclass(frozen=True)
class Rule:
    """A field's allowed values: ``ok(value)`` and the words that say what is allowed."""

    ok: Callable[[Any], bool]
    allowed: str


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _at_least(n: int) -> Rule:
    return Rule(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= n,
        f"a whole number >= {n}",
    )


def _whole(low: int, high: int) -> Rule:
    return Rule(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high,
        f"a whole number from {low} to {high}",
    )


def _number(
    low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = True
) -> Rule:
    def ok(v: Any) -> bool:
        if not _real(v):
            return False
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    if high == math.inf:
        words = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        words = (
            f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        )
    return Rule(ok, words)


def _one_of(*choices: Any) -> Rule:
    shown = [str(c) for c in choices]
    words = ", ".join(shown[:-1]) + f" or {shown[-1]}" if len(shown) > 1 else shown[0]
    return Rule(lambda v: type(v) is type(choices[0]) and v in choices, words)


def _choice(*choices: str) -> Rule:
    # Worded as the old messages were: "choose one of: a, b".
    return Rule(lambda v: v in choices, "choose one of: " + ", ".join(choices))


def _log_range() -> Rule:
    return Rule(
        lambda v: (
            isinstance(v, list) and len(v) == 2 and all(_real(x) for x in v) and 0 < v[0] < v[1]
        ),
        "[low, high], two finite numbers with 0 < low < high",
    )


def _unit_range() -> Rule:
    return Rule(
        lambda v: (
            isinstance(v, list)
            and (
                len(v) == 0 or (len(v) == 2 and all(_real(x) for x in v) and 0 <= v[0] < v[1] < 1)
            )
        ),
        "[] (not searched) or [low, high] with 0 <= low < high < 1",
    )


def _choices_of(*choices: str) -> Rule:
    return Rule(
        lambda v: (
            isinstance(v, list)
            and all(isinstance(x, str) and x in choices for x in v)
            and len(set(v)) == len(v)
        ),
        f"[] (not searched) or a list of distinct values from {', '.join(choices)}",
    )


def _folds() -> Rule:
    return Rule(
        lambda v: (
            isinstance(v, list)
            and len(v) >= 1
            and len(set(v)) == len(v)
            and all(isinstance(x, int) and 1 <= x <= 10 for x in v)
        ),
        "a non-empty list of distinct FDDB folds, each 1-10",
    )


def _text() -> Rule:
    return Rule(
        lambda v: isinstance(v, str) and 0 < len(v) <= 1000 and v.isprintable(),
        "a non-empty printable string (no newline or control characters)",
    )


def _lr_lists() -> Rule:
    return Rule(
        lambda v: (
            isinstance(v, dict)
            and len(v) > 0
            and all(
                k in OPTIMIZERS
                and isinstance(lrs, list)
                and len(lrs) > 0
                and all(_real(x) and x > 0 for x in lrs)
                for k, lrs in v.items()
            )
        ),
        f"a table {{optimizer = [lr, ...]}} with optimizer {either(OPTIMIZERS)} and each list "
        "a non-empty list of finite numbers > 0",
    )


def _run_name() -> Rule:
    return Rule(
        lambda v: isinstance(v, str) and (v == "" or valid_run_name(v)),
        f"{NAME_RULE} (or empty: named after the dataset)",
    )


def _f(default: Any, rule: Rule) -> Any:
    """A field with its rule; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


# Run names. A name becomes: study names "<name>/<stage>" (Optuna's study_name column is
# VARCHAR(512) on PostgreSQL and MySQL), file names "<name>-final-epoch<E>-<N>" in the
# artifact store and report-<name>/ folders (255 bytes on ext4, APFS, NTFS), argv of
# worker processes and shell commands printed for the user. ASCII letters, digits and
# . _ + - are safe in all of these without quoting; a first letter or digit keeps a name
# from reading as a flag (-x) or a hidden file (.x); 128 characters leave room for every
# suffix babysit adds (the longest, an ablation's "/<variant>/r<k>" and an artifact's
# "-final-epoch<E>-<N>", stay far below 255). '/' is kept for ablations, whose runs are
# named <ablation>/<variant>[/r<k>], so a run given --name never collides with them.
NAME_MAX = 128
_NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
NAME_RULE = (
    f"1-{NAME_MAX} characters: ASCII letters, digits and . _ + -, starting with a letter or digit"
)


def valid_run_name(name: str, composed: bool = False) -> bool:
    """``name`` follows NAME_RULE; ``composed`` also allows '/' between parts (ablations)."""
    if not isinstance(name, str) or not 0 < len(name) <= NAME_MAX:
        return False
    parts = name.split("/") if composed else [name]
    return all(_NAME_PART.fullmatch(p) for p in parts)


def check_run_name(name: str, composed: bool = False) -> None:
    """UsageError (one line) unless ``name`` is a valid run name."""
    if not valid_run_name(name, composed):
        raise UsageError(f"run name {_show(name)} is not allowed; a run name is {NAME_RULE}")


def default_run_name(dataset: str) -> str:
    """The name of a run given no --name: the dataset reference with other characters as '-'."""
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", dataset).strip("-._+")[:NAME_MAX]
    return name or "run"


def _show(value: Any) -> str:
    """A value for a one-line message: repr (so a newline shows as \\n), cut to 80."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------- durations
# `--budget`, TOML's `budget = "10m"`, `babysit.run(budget="10m")`: hours, minutes and
# seconds in that order, each at most once ("1h30m", "10m", "90s", "1h"), or bare seconds
# ("600"). At least BUDGET_MIN_S (a shorter budget fits no protocol) and at most a week.
DURATION_FORMS = "like 10m, 1h30m, 90s or 600 (seconds)"
BUDGET_MIN_S = 1.0
BUDGET_MAX_S = 7 * 24 * 3600.0
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str) -> float:
    """Seconds in ``text`` (DURATION_FORMS); a UsageError of one line when it is not one."""
    shown = _show(text)
    raw = text.strip().lower() if isinstance(text, str) else ""
    seconds: float | None = None
    if re.fullmatch(r"\d+(?:\.\d+)?", raw):
        seconds = float(raw)
    else:
        m = _DURATION.fullmatch(raw)
        if raw and m is not None and any(m.groups()):
            h, mins, s = (float(g) if g else 0.0 for g in m.groups())
            seconds = h * 3600 + mins * 60 + s
    if seconds is None or not BUDGET_MIN_S <= seconds <= BUDGET_MAX_S:
        raise UsageError(
            f"budget {shown} is not a duration from 1s to 168h; give one {DURATION_FORMS}"
        )
    return seconds


def _duration() -> Rule:
    def ok(v: Any) -> bool:
        if v == "":
            return True
        try:
            parse_duration(v)
        except UsageError:
            return False
        return True

    return Rule(ok, f"empty (no budget) or a duration from 1s to 168h, {DURATION_FORMS}")


_ZERO_OR_SIDE = Rule(
    lambda v: isinstance(v, int) and not isinstance(v, bool) and (v == 0 or 8 <= v <= 1024),
    "0 (keep) or a whole number from 8 to 1024",
)
_FLAG = Rule(lambda v: isinstance(v, bool), "true or false")
_DIVERGE = Rule(lambda v: _real(v) and (v == 0 or v > 1), "0 (off) or a finite number > 1")


def check_rules(obj: Any, prefix: str = "") -> None:
    """Every field of ``obj`` (and its tables) against the rule stated beside it; the first
    that fails is a UsageError of one line naming the key, the value and what is allowed."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_rules(value, f"{prefix}{f.name}.")
            continue
        rule = f.metadata.get("rule")
        if rule is None:
            continue
        try:
            ok = rule.ok(value)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            key = f"{prefix}{f.name}"
            if rule.allowed.startswith("choose one of"):
                raise UsageError(f"unknown {key} {_show(value)}; {rule.allowed}")
            raise UsageError(
                f"{key} = {_show(value)} is not allowed; {key} must be {rule.allowed}"
            )
