"""The run spec: every knob of a run, with its default and the reason for it.

One place holds the defaults (the dataclasses below); a TOML file (``--config``) overrides
them, ``--set KEY=VALUE`` overrides the file, and explicit flags override ``--set``.
The spec is stored on every stage study as user attrs, so any machine can rebuild the run
from storage alone.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from babysit.errors import UsageError


@dataclass
class ModelSpec:
    # The seed's AlexNet for 32x32 inputs (seeds/003): five convs, three FC layers.
    conv_layers: int = 5
    # Seed 000 compared 1, 2 and 3 FC layers; 3 is the original.
    fc_layers: int = 3
    # Width of the hidden FC layers: 4096 in AlexNet and in both seeds.
    fc_width: int = 4096
    # relu or leaky_relu (seed 000 tried LeakyReLU and lost ~7 points).
    activation: str = "relu"
    # none, "first2" (after the first two convs, as seed 000 did) or "all".
    batch_norm: str = "none"
    # Dropout before the hidden FC layers, p=0.5 as in AlexNet.
    dropout: float = 0.5
    # he (seed 000) or default (PyTorch's own). He keeps the signal alive through AlexNet's
    # eight layers; with PyTorch's default init the 8x8 digits net still predicts one class
    # after 200 overfit steps at every LR tried, with He it memorises 20 examples in 90.
    init: str = "he"
    # cifar32 (seed 003: 3x3 convs, stride 2 first) or alexnet227 (11x11 stride 4 on 227x227).
    geometry: str = "cifar32"


@dataclass
class DataSpec:
    # Per-dataset mean/std from the train split; "imagenet" is what seed 003 used.
    normalize: str = "dataset"
    # Seed 003's augmentation: horizontal + vertical flips and brightness jitter.
    hflip: bool = False
    vflip: bool = False
    # ColorJitter-style brightness factor range [max(0, 1-b), 1+b]; seed 003 used b=2.
    brightness: float = 0.0
    # Random crop after zero padding by this many pixels (0 = off), the CIFAR habit.
    crop_pad: int = 0
    # Resize every image to this side on the device (0 = keep; 227 = seed 000's geometry).
    resize: int = 0
    # Share of the labelled pool held out for validation / test on datasets without splits.
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    # CIFAR-10: the official 50k train set is split 45k/5k train/val.
    val_size: int = 5000
    # FDDB: one photo never feeds two splits, so the splits are whole folds.
    train_folds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 7, 8])
    val_folds: list[int] = field(default_factory=lambda: [9])
    test_folds: list[int] = field(default_factory=lambda: [10])
    # Side of the square patches cut from FDDB photos (the seed resized to 32x32).
    patch_size: int = 32
    # Non-face windows per face, all with IoU < 0.3 to every face in the photo.
    negatives_per_face: float = 1.0


@dataclass
class SanitySpec:
    # Mean loss over this many batches of the untrained model.
    batches: int = 4
    # Accept |initial - expected| <= tolerance * expected. 0.25 admits the spread of a
    # freshly initialised net (ln 10 = 2.30, seeds saw 2.302) and rejects a broken last
    # layer (a 10x logit scale gives ~4-6 on 10 classes).
    tolerance: float = 0.25
    # The L2 penalty used for the "regularisation raises the loss" check (cs231n uses 1e3
    # on a small softmax; AlexNet has ~23M weights, so 1e-3 already adds several nats).
    reg: float = 1e-3


@dataclass
class OverfitSpec:
    # Examples to memorise (the seed used 10 % of the data; 20 is cs231n's habit).
    samples: int = 20
    # Optimiser steps allowed per learning rate (full-batch steps on the subset).
    steps: int = 200
    # Learning rates tried in order until one memorises the subset.
    lrs: dict[str, list[float]] = field(
        default_factory=lambda: {"sgd": [1e-2, 3e-2, 1e-3, 1e-1], "adam": [1e-4, 3e-4, 1e-3, 3e-5]}
    )


@dataclass
class SearchSpec:
    trials: int = 8
    epochs: int = 4
    # "random" (the protocol's coarse search) or "tpe" (model-based, where it helps).
    sampler: str = "tpe"
    # "median" stops a trial whose val accuracy is below the median of earlier trials at
    # the same epoch; "halving" is successive halving (the top third of the trials that
    # reached epoch 1, 3, 9, ... go on); "none" runs every trial in full.
    pruner: str = "median"
    # Divergence: loss NaN/inf or above this multiple of the initial loss (cs231n's 3x).
    # 0 turns stopping off: every trial runs all its epochs, NaN or not, as the seeds did.
    diverge_factor: float = 3.0
    # Train loss moved less than this fraction over the trial: labelled "lr too low".
    flat_tolerance: float = 0.01


@dataclass
class CoarseSpec(SearchSpec):
    trials: int = 12
    epochs: int = 3
    sampler: str = "random"
    # Successive halving: a coarse search only has to find the region, so most trials get
    # one epoch and the best third run on (measured in docs/benchmarks.md, issue 16).
    pruner: str = "halving"
    # [low, high] for a log-uniform draw. The fine stage's ranges come from narrowing these.
    lr: list[float] = field(default_factory=lambda: [1e-5, 1.0])
    weight_decay: list[float] = field(default_factory=lambda: [1e-6, 1e-2])
    # Leslie Smith's LR range test (exponentially growing LR, stopped on divergence) picks
    # the coarse lr range instead of `lr` above; its curve is stored on the coarse study.
    lr_range_test: bool = False
    # Centre the lr range on the LR that memorised the overfit subset (babysit/learned.py
    # states the rule) unless `lr` above was set by the user.
    lr_from_overfit: bool = True
    # A best value on an edge of the range widens it and runs a few extra trials, once.
    extend: bool = True


@dataclass
class NarrowSpec:
    # How many of the best coarse trials define the fine ranges.
    top_k: int = 5
    # Decades added on each side of the top-k span (log10 units).
    pad: float = 0.5
    # A best value within this many decades of a coarse bound is "on the edge".
    edge: float = 0.25


@dataclass
class FinalSpec:
    # The seeds trained their final model for 20 epochs.
    epochs: int = 20


@dataclass
class Spec:
    name: str = ""
    dataset: str = "digits"
    model: str = "alexnet"
    # Adam: the seed's better optimizer (FDDB 94 % vs 91 % with SGD), and on the 8x8 digits
    # it reaches 94 % validation accuracy in 6 epochs where SGD (momentum 0.9) needs ~3x more.
    optimizer: str = "adam"
    # "ce": softmax cross-entropy (expects ln C at init); "bce": one-hot BCE (expects ln 2).
    loss: str = "ce"
    seed: int = 0
    # 0 = auto: 128 as in the seeds, halved (down to 8) until an epoch has >= 8 steps.
    batch_size: int = 0
    # SGD momentum (the seeds used 0.9).
    momentum: float = 0.9
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


_CHOICES = {
    "optimizer": ("sgd", "adam"),
    "loss": ("ce", "bce"),
}
_ARCH_CHOICES = {
    "activation": ("relu", "leaky_relu"),
    "batch_norm": ("none", "first2", "all"),
    "init": ("he", "default"),
    "geometry": ("cifar32", "alexnet227"),
}


def validate(spec: Spec) -> None:
    for key, choices in _CHOICES.items():
        if getattr(spec, key) not in choices:
            raise UsageError(
                f"unknown {key} '{getattr(spec, key)}'; choose one of: {', '.join(choices)}"
            )
    for key, choices in _ARCH_CHOICES.items():
        if getattr(spec.arch, key) not in choices:
            raise UsageError(
                f"unknown model.{key} '{getattr(spec.arch, key)}'; "
                f"choose one of: {', '.join(choices)}"
            )
    if spec.arch.conv_layers not in (3, 4, 5):
        raise UsageError("model.conv_layers must be 3, 4 or 5")
    if spec.arch.fc_layers not in (1, 2, 3):
        raise UsageError("model.fc_layers must be 1, 2 or 3")
    for stage in ("coarse", "fine"):
        search: SearchSpec = getattr(spec, stage)
        if search.trials < 1 or search.epochs < 1:
            raise UsageError(f"{stage}.trials and {stage}.epochs must be at least 1")
        if search.sampler not in ("random", "tpe"):
            raise UsageError(f"{stage}.sampler must be 'random' or 'tpe'")
        if search.pruner not in ("median", "halving", "none"):
            raise UsageError(f"{stage}.pruner must be 'median', 'halving' or 'none'")
    for pname in ("lr", "weight_decay"):
        bounds = getattr(spec.coarse, pname)
        if len(bounds) != 2 or not 0 < bounds[0] < bounds[1]:
            raise UsageError(
                f"coarse.{pname} must be [low, high] with 0 < low < high, got {bounds}"
            )
    if spec.final.epochs < 1:
        raise UsageError("final.epochs must be at least 1")
    if spec.batch_size < 0:
        raise UsageError("batch_size must be at least 1 (or 0 for auto)")
    if spec.overfit.samples < 2:
        raise UsageError("overfit.samples must be at least 2")
    if spec.optimizer not in spec.overfit.lrs:
        raise UsageError(f"overfit.lrs has no entry for optimizer '{spec.optimizer}'")
    if spec.data.normalize not in ("dataset", "imagenet", "none"):
        raise UsageError("data.normalize must be 'dataset', 'imagenet' or 'none'")
