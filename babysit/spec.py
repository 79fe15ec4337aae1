"""The run spec: every knob of a run, with its default and the reason for it.

One place holds the defaults (the dataclasses below); a TOML file (``--config``) overrides
them, ``--set KEY=VALUE`` overrides the file, and explicit flags override ``--set``.
The spec is stored on every stage study as user attrs, so any machine can rebuild the run
from storage alone.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from babysit.errors import UsageError

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
    return Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= n,
                f"a whole number >= {n}")


def _whole(low: int, high: int) -> Rule:
    return Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high,
                f"a whole number from {low} to {high}")


def _number(low: float, high: float = math.inf, *, low_open: bool = False,
            high_open: bool = True) -> Rule:
    def ok(v: Any) -> bool:
        if not _real(v):
            return False
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    if high == math.inf:
        words = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        words = (f"a number in {'(' if low_open else '['}{low:g}, {high:g}"
                 f"{')' if high_open else ']'}")
    return Rule(ok, words)


def _one_of(*choices: Any) -> Rule:
    shown = [str(c) for c in choices]
    words = ", ".join(shown[:-1]) + f" or {shown[-1]}" if len(shown) > 1 else shown[0]
    return Rule(lambda v: type(v) is type(choices[0]) and v in choices, words)


def _choice(*choices: str) -> Rule:
    # Worded as the old messages were: "choose one of: a, b".
    return Rule(lambda v: v in choices, "choose one of: " + ", ".join(choices))


def _log_range() -> Rule:
    return Rule(lambda v: isinstance(v, list) and len(v) == 2 and all(_real(x) for x in v)
                and 0 < v[0] < v[1],
                "[low, high], two finite numbers with 0 < low < high")


def _folds() -> Rule:
    return Rule(lambda v: isinstance(v, list) and len(v) >= 1 and len(set(v)) == len(v)
                and all(isinstance(x, int) and 1 <= x <= 10 for x in v),
                "a non-empty list of distinct FDDB folds, each 1-10")


def _text() -> Rule:
    return Rule(lambda v: isinstance(v, str) and 0 < len(v) <= 1000 and v.isprintable(),
                "a non-empty printable string (no newline or control characters)")


def _lr_lists() -> Rule:
    return Rule(lambda v: isinstance(v, dict) and len(v) > 0 and all(
        k in _OPTIMIZERS and isinstance(lrs, list) and len(lrs) > 0
        and all(_real(x) and x > 0 for x in lrs) for k, lrs in v.items()),
        "a table {optimizer = [lr, ...]} with optimizer sgd or adam and each list a "
        "non-empty list of finite numbers > 0")


def _run_name() -> Rule:
    return Rule(lambda v: isinstance(v, str) and (v == "" or valid_run_name(v)),
                f"{NAME_RULE} (or empty: named after the dataset)")


def _f(default: Any, rule: Rule) -> Any:
    """A field with its rule; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


_OPTIMIZERS = ("sgd", "adam")

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
NAME_RULE = (f"1-{NAME_MAX} characters: ASCII letters, digits and . _ + -, starting with a "
             "letter or digit")


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



_ZERO_OR_SIDE = Rule(lambda v: isinstance(v, int) and not isinstance(v, bool)
                     and (v == 0 or 8 <= v <= 1024), "0 (keep) or a whole number from 8 to 1024")
_FLAG = Rule(lambda v: isinstance(v, bool), "true or false")
_DIVERGE = Rule(lambda v: _real(v) and (v == 0 or v > 1), "0 (off) or a finite number > 1")


@dataclass
class ModelSpec:
    # The seed's AlexNet for 32x32 inputs (seeds/003): five convs, three FC layers.
    conv_layers: int = _f(5, _one_of(3, 4, 5))
    # Seed 000 compared 1, 2 and 3 FC layers; 3 is the original.
    fc_layers: int = _f(3, _one_of(1, 2, 3))
    # Width of the hidden FC layers: 4096 in AlexNet and in both seeds.
    # At most 4x AlexNet's: a 16384-wide layer already holds 16384^2 weights (1 GiB as
    # float32); a width of 1e8 failed allocating memory with a traceback.
    fc_width: int = _f(4096, _whole(1, 16384))
    # relu or leaky_relu (seed 000 tried LeakyReLU and lost ~7 points).
    activation: str = _f("relu", _choice("relu", "leaky_relu"))
    # none, "first2" (after the first two convs, as seed 000 did) or "all".
    batch_norm: str = _f("none", _choice("none", "first2", "all"))
    # Dropout before the hidden FC layers, p=0.5 as in AlexNet.
    dropout: float = _f(0.5, _number(0, 1))
    # he (seed 000) or default (PyTorch's own). He keeps the signal alive through AlexNet's
    # eight layers; with PyTorch's default init the 8x8 digits net still predicts one class
    # after 200 overfit steps at every LR tried, with He it memorises 20 examples in 90.
    init: str = _f("he", _choice("he", "default"))
    # cifar32 (seed 003: 3x3 convs, stride 2 first) or alexnet227 (11x11 stride 4 on 227x227).
    geometry: str = _f("cifar32", _choice("cifar32", "alexnet227"))


@dataclass
class DataSpec:
    # Per-dataset mean/std from the train split; "imagenet" is what seed 003 used.
    normalize: str = _f("dataset", _choice("dataset", "imagenet", "none"))
    # Seed 003's augmentation: horizontal + vertical flips and brightness jitter.
    hflip: bool = _f(False, _FLAG)
    vflip: bool = _f(False, _FLAG)
    # ColorJitter-style brightness factor range [max(0, 1-b), 1+b]; seed 003 used b=2.
    brightness: float = _f(0.0, _number(0))
    # Random crop after zero padding by this many pixels (0 = off), the CIFAR habit.
    crop_pad: int = _f(0, _at_least(0))
    # Resize every image to this side on the device (0 = keep; 227 = seed 000's geometry).
    # 0, or 8 (the digits' own side) to 1024: every image is held on the device at this
    # side, and resize=100000 failed allocating 5 TB with a traceback.
    resize: int = _f(0, _ZERO_OR_SIDE)
    # Share of the labelled pool held out for validation / test on datasets without splits.
    val_fraction: float = _f(0.15, _number(0, 1, low_open=True))
    test_fraction: float = _f(0.15, _number(0, 1, low_open=True))
    # CIFAR-10: the official 50k train set is split 45k/5k train/val.
    val_size: int = _f(5000, _at_least(1))
    # FDDB: one photo never feeds two splits, so the splits are whole folds.
    train_folds: list[int] = _f([1, 2, 3, 4, 5, 6, 7, 8], _folds())
    val_folds: list[int] = _f([9], _folds())
    test_folds: list[int] = _f([10], _folds())
    # Side of the square patches cut from FDDB photos (the seed resized to 32x32).
    patch_size: int = _f(32, _whole(2, 1024))
    # Non-face windows per face, all with IoU < 0.3 to every face in the photo.
    negatives_per_face: float = _f(1.0, _number(0))


@dataclass
class SanitySpec:
    # Mean loss over this many batches of the untrained model.
    batches: int = _f(4, _at_least(1))
    # Accept |initial - expected| <= tolerance, in nats, and a logit spread (std across
    # classes) of at most sqrt(2 * tolerance), the spread that alone costs about `tolerance`
    # nats over ln C. Nats mean the same for 2 classes as for 1000: 0.25 nats is the true
    # class getting 0.78x to 1.28x the probability 1/C of a uniform guess, for any C. (A
    # share of ln C, as before, allowed 0.17 nats on 2 classes and 1.7 on 1000.) A healthy
    # net starts within 0.01 nats of ln C; a last layer scaled 10x is off by nats.
    tolerance: float = _f(0.25, _number(0, low_open=True))
    # The L2 penalty used for the "regularisation raises the loss" check (cs231n uses 1e3
    # on a small softmax; AlexNet has ~23M weights, so 1e-3 already adds several nats).
    reg: float = _f(1e-3, _number(0, low_open=True))


@dataclass
class OverfitSpec:
    # Examples to memorise (the seed used 10 % of the data; 20 is cs231n's habit).
    samples: int = _f(20, _at_least(2))
    # Optimiser steps allowed per learning rate (full-batch steps on the subset).
    steps: int = _f(200, _at_least(1))
    # Learning rates tried in order until one memorises the subset.
    lrs: dict[str, list[float]] = _f(
        {"sgd": [1e-2, 3e-2, 1e-3, 1e-1], "adam": [1e-4, 3e-4, 1e-3, 3e-5]}, _lr_lists()
    )


@dataclass
class SearchSpec:
    trials: int = _f(8, _at_least(1))
    epochs: int = _f(4, _at_least(1))
    # "random" (the protocol's coarse search) or "tpe" (model-based, where it helps).
    sampler: str = _f("tpe", _choice("random", "tpe"))
    # "median" stops a trial whose val accuracy is below the median of earlier trials at
    # the same epoch; "halving" is successive halving (the top third of the trials that
    # reached epoch 1, 3, 9, ... go on); "none" runs every trial in full.
    pruner: str = _f("median", _choice("median", "halving", "none"))
    # Divergence: loss NaN/inf or above this multiple of the initial loss (cs231n's 3x).
    # 0 turns stopping off: every trial runs all its epochs, NaN or not, as the seeds did.
    # Between 0 and 1 every trial would stop at its first step (the loss starts at 1x).
    diverge_factor: float = _f(3.0, _DIVERGE)
    # Train loss moved less than this fraction over the trial: labelled "lr too low".
    flat_tolerance: float = _f(0.01, _number(0, 1))


@dataclass
class CoarseSpec(SearchSpec):
    trials: int = _f(12, _at_least(1))
    epochs: int = _f(3, _at_least(1))
    sampler: str = _f("random", _choice("random", "tpe"))
    # Successive halving: a coarse search only has to find the region, so most trials get
    # one epoch and the best third run on (measured in docs/benchmarks.md).
    pruner: str = _f("halving", _choice("median", "halving", "none"))
    # [low, high] for a log-uniform draw. The fine stage's ranges come from narrowing these.
    lr: list[float] = _f([1e-5, 1.0], _log_range())
    weight_decay: list[float] = _f([1e-6, 1e-2], _log_range())
    # Leslie Smith's LR range test (exponentially growing LR, stopped on divergence) picks
    # the coarse lr range instead of `lr` above; its curve is stored on the coarse study.
    lr_range_test: bool = _f(False, _FLAG)
    # Centre the lr range on the LR that memorised the overfit subset (babysit/learned.py
    # states the rule) unless `lr` above was set by the user.
    lr_from_overfit: bool = _f(True, _FLAG)
    # A best value on an edge of the range widens it and runs a few extra trials, once.
    extend: bool = _f(True, _FLAG)


@dataclass
class NarrowSpec:
    # How many of the best coarse trials define the fine ranges.
    top_k: int = _f(5, _at_least(1))
    # Decades added on each side of the top-k span (log10 units).
    pad: float = _f(0.5, _number(0))
    # A best value within this many decades of a coarse bound is "on the edge".
    edge: float = _f(0.25, _number(0))


@dataclass
class FinalSpec:
    # The seeds trained their final model for 20 epochs.
    epochs: int = _f(20, _at_least(1))
    # Stop once validation has not improved (higher accuracy, or equal accuracy at a lower
    # loss) for this many epochs; the best epoch's weights are the ones tested. 0 = off.
    # 5: measured on digits (20-epoch finals, Adam, docs/benchmarks.md "final plateau"):
    # at lr 1e-2 improvements came up to 4 epochs apart before a later better one, and 5
    # rides over that gap; at lr 1e-3 the best accuracy (0.993) came at epoch 11 and
    # nothing beat it for 8 epochs, so 5 stops at epoch 16 with the same best.
    patience: int = _f(5, _at_least(0))
    # Checkpoints may take at most this share of the final's time: after the first epoch
    # (always written), a checkpoint is written once the training since the last write has
    # taken at least (1 / share) x as long as that write did, and always after the last
    # epoch. The default AlexNet's checkpoint with Adam state is 279 MB, 1.5 to 6.4 s to
    # write on the (loaded) project VM, against a 2.3 s digits epoch (docs/benchmarks.md):
    # a write after every epoch could cost more than the training. A kill loses at most
    # ~(write time / share) of training.
    checkpoint_share: float = _f(0.1, _number(0, 1, low_open=True, high_open=False))


@dataclass
class Spec:
    name: str = _f("", _run_name())
    dataset: str = _f("digits", _text())
    model: str = _f("alexnet", _text())
    # Adam: the seed's better optimizer (FDDB 94 % vs 91 % with SGD), and on the 8x8 digits
    # it reaches 94 % validation accuracy in 6 epochs where SGD (momentum 0.9) needs ~3x more.
    optimizer: str = _f("adam", _choice(*_OPTIMIZERS))
    # "ce": softmax cross-entropy (expects ln C at init); "bce": one-hot BCE (expects ln 2).
    loss: str = _f("ce", _choice("ce", "bce"))
    seed: int = _f(0, _at_least(0))
    # 0 = auto: 128 as in the seeds, halved (down to 8) until an epoch has >= 8 steps.
    batch_size: int = _f(0, _at_least(0))
    # SGD momentum (the seeds used 0.9).
    momentum: float = _f(0.9, _number(0, 1))
    arch: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    sanity: SanitySpec = field(default_factory=SanitySpec)
    overfit: OverfitSpec = field(default_factory=OverfitSpec)
    coarse: CoarseSpec = field(default_factory=CoarseSpec)
    narrow: NarrowSpec = field(default_factory=NarrowSpec)
    fine: SearchSpec = field(default_factory=SearchSpec)
    final: FinalSpec = field(default_factory=FinalSpec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Spec:
        spec = cls()
        _apply_mapping(spec, data, prefix="")
        return spec

    def identity(self) -> dict[str, Any]:
        """The fields that define a run; two specs with equal identity are the same run."""
        return self.to_dict()


# TOML and --set name the architecture table "model" (model.conv_layers = 3) while the
# top-level "model" key names the network (alexnet, or module:callable).
_TABLE_ALIASES = {"model": "arch"}


def _field_types(obj: Any) -> dict[str, Any]:
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
    raise UsageError(
        f"config key '{key}' expects {expected} (like {current!r}), got {value!r}"
    )


def _apply_mapping(obj: Any, data: dict[str, Any], prefix: str) -> None:
    fields = _field_types(obj)
    if isinstance(obj, Spec) and isinstance(data.get("model"), dict) and "name" in data["model"]:
        # TOML cannot hold both `model = "x"` and a [model] table, so the table takes the
        # network's name as `name`.
        data = dict(data)
        table = dict(data["model"])
        name = table.pop("name")
        if not isinstance(name, str):
            raise UsageError(f"config key 'model.name' expects str, got {name!r}")
        obj.model = name
        data["model"] = table
    for raw_key, value in data.items():
        key = raw_key
        if dataclasses.is_dataclass(obj) and isinstance(obj, Spec) and isinstance(value, dict):
            key = _TABLE_ALIASES.get(raw_key, raw_key)
        full = f"{prefix}{raw_key}"
        if key not in fields:
            raise UsageError(f"unknown config key '{full}'; known keys: {known_keys_hint(obj)}")
        current = fields[key]
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UsageError(f"config key '{full}' is a table; set its fields as {full}.X")
            _apply_mapping(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(full, value, current))


def known_keys_hint(obj: Any) -> str:
    names = []
    for f in dataclasses.fields(obj):
        if dataclasses.is_dataclass(getattr(obj, f.name)):
            shown = "model" if f.name == "arch" else f.name
            names.append(f"{shown}.*")
        else:
            names.append(f.name)
    return ", ".join(names)


def all_keys(spec: Spec | None = None) -> list[str]:
    """Every settable key, dotted, as TOML and --set spell them."""
    spec = spec or Spec()
    keys: list[str] = []
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if dataclasses.is_dataclass(value):
            table = "model" if f.name == "arch" else f.name
            keys.extend(f"{table}.{g.name}" for g in dataclasses.fields(value))
            if table == "model":
                keys.append("model.name")
        else:
            keys.append(f.name)
    return keys


def parse_value(text: str) -> Any:
    """Parse the VALUE of --set KEY=VALUE as a TOML value, falling back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_set(spec: Spec, assignment: str) -> None:
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
    _apply_mapping(spec, nested, prefix="")


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"config file {path} is not valid TOML: {err}") from None


def build_spec(
    config: Path | None = None,
    sets: list[str] | tuple[str, ...] = (),
    flags: dict[str, Any] | None = None,
) -> Spec:
    """Defaults, then the TOML file, then --set, then flags (None values are ignored)."""
    spec = Spec()
    explicit: set[str] = set()
    if config is not None:
        data = load_toml(config)
        data.pop("ablation", None)
        data.pop("variants", None)
        _apply_mapping(spec, data, prefix="")
        explicit.update(_dotted(data))
    for assignment in sets:
        apply_set(spec, assignment)
        explicit.add(assignment.partition("=")[0].strip())
    for key, value in (flags or {}).items():
        if value is not None:
            _apply_mapping(spec, {key: value}, prefix="")
            explicit.update(_dotted({key: value}))
    validate(spec)
    # Which keys the user gave (not a field: it is not part of the run's identity), so a
    # rule that adapts a default (the coarse lr anchored on the overfit LR) leaves them be.
    spec.explicit_keys = frozenset(explicit)
    return spec


def _dotted(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("lrs",):
            keys.extend(_dotted(value, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _rule_errors(obj: Any, prefix: str) -> None:
    """Every field of ``obj`` (and its tables) against the rule stated beside it."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        table = "model" if f.name == "arch" else f.name
        if dataclasses.is_dataclass(value):
            _rule_errors(value, f"{prefix}{table}.")
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
            raise UsageError(f"{key} = {_show(value)} is not allowed; {key} must be "
                             f"{rule.allowed}")


def validate(spec: Spec) -> None:
    """Every field's type and range, then the rules that join fields; the first problem is
    a UsageError of one line naming the field, the value and what is allowed."""
    _rule_errors(spec, "")
    if spec.data.val_fraction + spec.data.test_fraction >= 1:
        raise UsageError(
            f"data.val_fraction + data.test_fraction = {spec.data.val_fraction:g} + "
            f"{spec.data.test_fraction:g} leaves no training data; their sum must be < 1")
    folds = {"train": spec.data.train_folds, "val": spec.data.val_folds,
             "test": spec.data.test_folds}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sorted(set(folds[a]) & set(folds[b]))
        if shared:
            raise UsageError(f"data.{a}_folds and data.{b}_folds share fold(s) "
                             f"{shared}; a fold may feed one split only")
    if spec.optimizer not in spec.overfit.lrs:
        raise UsageError(f"overfit.lrs has no entry for optimizer '{spec.optimizer}'; "
                         f"give overfit.lrs.{spec.optimizer} = [lr, ...]")
