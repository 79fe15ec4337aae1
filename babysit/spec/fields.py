"""The run spec: every knob of a run, with its default and the reason for it.

One place holds the defaults (the dataclasses below); a TOML file (``--config``) overrides
them, ``--set KEY=VALUE`` overrides the file, and explicit flags override ``--set``.
The spec is stored on every stage study as user attrs, so any machine can rebuild the run
from storage alone.

What each field allows (the choices, the rules, run names) is in babysit/spec/rules.py, and
reading TOML, --set and mappings in babysit/spec/parse.py; their public names are importable
from here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from babysit.errors import UsageError
from babysit.spec.parse import all_keys as keys_of
from babysit.spec.parse import apply_mapping
from babysit.spec.parse import apply_set
from babysit.spec.parse import dotted
from babysit.spec.parse import known_keys_hint  # noqa: F401
from babysit.spec.parse import load_toml
from babysit.spec.parse import parse_value  # noqa: F401
from babysit.spec.rules import _DIVERGE
from babysit.spec.rules import _FLAG
from babysit.spec.rules import _ZERO_OR_SIDE
from babysit.spec.rules import ACTIVATIONS
from babysit.spec.rules import BATCH_NORMS
from babysit.spec.rules import CONV_LAYERS
from babysit.spec.rules import FC_LAYERS
from babysit.spec.rules import GEOMETRIES
from babysit.spec.rules import INITS
from babysit.spec.rules import LOSSES
from babysit.spec.rules import MODELS
from babysit.spec.rules import NAME_MAX  # noqa: F401
from babysit.spec.rules import NAME_RULE  # noqa: F401
from babysit.spec.rules import NORMALIZATIONS
from babysit.spec.rules import OPTIMIZERS
from babysit.spec.rules import OVERFIT_LRS_OF
from babysit.spec.rules import PRUNERS
from babysit.spec.rules import SAMPLERS
from babysit.spec.rules import SCHEDULES
from babysit.spec.rules import Rule  # noqa: F401
from babysit.spec.rules import _at_least
from babysit.spec.rules import _choice
from babysit.spec.rules import _choices_of
from babysit.spec.rules import _duration
from babysit.spec.rules import _f
from babysit.spec.rules import _folds
from babysit.spec.rules import _log_range
from babysit.spec.rules import _lr_lists
from babysit.spec.rules import _number
from babysit.spec.rules import _one_of
from babysit.spec.rules import _run_name
from babysit.spec.rules import _text
from babysit.spec.rules import _unit_range
from babysit.spec.rules import _whole
from babysit.spec.rules import check_rules
from babysit.spec.rules import check_run_name  # noqa: F401
from babysit.spec.rules import default_run_name  # noqa: F401
from babysit.spec.rules import either
from babysit.spec.rules import valid_run_name  # noqa: F401


@dataclass
class ModelSpec:
    # The network: babysit's "alexnet" (the knobs below) or a user's module:callable, which
    # the knobs do not touch. TOML, --set and --model may give it as `model = "..."`.
    name: str = _f("alexnet", _text())
    # The babysitting report's AlexNet for 32x32 inputs: five convs, three FC layers.
    conv_layers: int = _f(5, _one_of(*CONV_LAYERS))
    # The ablation lab compared 1, 2 and 3 FC layers; 3 is the original.
    fc_layers: int = _f(3, _one_of(*FC_LAYERS))
    # Width of the hidden FC layers: 4096 in AlexNet and in both reference reports.
    # At most 4x AlexNet's: a 16384-wide layer already holds 16384^2 weights (1 GiB as
    # float32); a width of 1e8 failed allocating memory with a traceback.
    fc_width: int = _f(4096, _whole(1, 16384))
    # relu or leaky_relu (the ablation lab tried LeakyReLU and lost ~7 points).
    activation: str = _f("relu", _choice(*ACTIVATIONS))
    # none, "first2" (after the first two convs, as the ablation lab did) or "all".
    batch_norm: str = _f("none", _choice(*BATCH_NORMS))
    # Dropout before the hidden FC layers, p=0.5 as in AlexNet.
    dropout: float = _f(0.5, _number(0, 1))
    # he (the ablation lab) or default (PyTorch's own). He keeps the signal alive through AlexNet's
    # eight layers; with PyTorch's default init the 8x8 digits net still predicts one class
    # after 200 overfit steps at every LR tried, with He it memorises 20 examples in 90.
    init: str = _f("he", _choice(*INITS))
    # cifar32 (the babysitting report: 3x3 convs, stride 2 first) or alexnet227 (11x11 stride 4 on 227x227).
    geometry: str = _f("cifar32", _choice(*GEOMETRIES))


@dataclass
class DataSpec:
    # Per-dataset mean/std from the train split; "imagenet" is what the babysitting report used.
    normalize: str = _f("dataset", _choice(*NORMALIZATIONS))
    # the babysitting report's augmentation: horizontal + vertical flips and brightness jitter.
    hflip: bool = _f(False, _FLAG)
    vflip: bool = _f(False, _FLAG)
    # ColorJitter-style brightness factor range [max(0, 1-b), 1+b]; the babysitting report used b=2.
    brightness: float = _f(0.0, _number(0))
    # Random crop after zero padding by this many pixels (0 = off), the CIFAR habit.
    crop_pad: int = _f(0, _at_least(0))
    # Resize every image to this side on the device (0 = keep; 227 = the ablation lab's geometry).
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
    sampler: str = _f("tpe", _choice(*SAMPLERS))
    # "median" stops a trial whose val accuracy is below the median of earlier trials at
    # the same epoch; "halving" is successive halving (the top third of the trials that
    # reached epoch 1, 3, 9, ... go on); "none" runs every trial in full.
    pruner: str = _f("median", _choice(*PRUNERS))
    # Divergence: loss NaN/inf or above this multiple of the initial loss (cs231n's 3x).
    # 0 turns stopping off: every trial runs all its epochs, NaN or not, as the reference reports did.
    # Between 0 and 1 every trial would stop at its first step (the loss starts at 1x).
    diverge_factor: float = _f(3.0, _DIVERGE)
    # Train loss moved less than this fraction over the trial: labelled "lr too low".
    flat_tolerance: float = _f(0.01, _number(0, 1))


@dataclass
class CoarseSpec(SearchSpec):
    trials: int = _f(12, _at_least(1))
    epochs: int = _f(3, _at_least(1))
    sampler: str = _f("random", _choice(*SAMPLERS))
    # Successive halving: a coarse search only has to find the region, so most trials get
    # one epoch and the best third run on (measured in docs/benchmarks.md).
    pruner: str = _f("halving", _choice(*PRUNERS))
    # [low, high] for a log-uniform draw. The fine stage's ranges come from narrowing these.
    lr: list[float] = _f([1e-5, 1.0], _log_range())
    weight_decay: list[float] = _f([1e-6, 1e-2], _log_range())
    # Leslie Smith's LR range test (exponentially growing LR, stopped on divergence) picks
    # the coarse lr range instead of `lr` above; its curve is stored on the coarse study.
    lr_range_test: bool = _f(False, _FLAG)
    # Centre the lr range on the LR that memorised the overfit subset (babysit/stages/learned.py
    # states the rule) unless `lr` above was set by the user.
    lr_from_overfit: bool = _f(True, _FLAG)
    # A best value on an edge of the range widens it and runs a few extra trials, once;
    # so does a first round in which every trial diverged, below where they did.
    extend: bool = _f(True, _FLAG)
    # Before the search, probe the top of the lr range for a few steps and bring it down
    # while it diverges (babysit/stages/learned.py, PROBE_RULE). Only for a range babysit chose
    # (the default or anchored one), never for a coarse.lr the user set.
    probe: bool = _f(True, _FLAG)
    # Dropout searched uniformly in [low, high] (cs231n: "regularization strength (L2
    # penalty, dropout strength)"); fine narrows it like lr. [] = not searched: every trial
    # keeps model.dropout. babysit's AlexNet takes it on its classifier; a user's network
    # must have Dropout layers (their p is set). Not searched by default: on digits (10
    # epochs, Adam, lr 1e-3, one seed, docs/benchmarks.md "LR schedules, AdamW and
    # dropout") the fixed 0.5 was the best of 0, 0.25 and 0.5 (best val accuracy 0.944,
    # 0.955, 0.959), so a search would spend trials below the value already used, and each
    # dimension added spreads the 12 coarse trials thinner over lr and weight_decay.
    dropout: list[float] = _f([], _unit_range())
    # LR schedules drawn per trial (a categorical; fine keeps those of the best coarse
    # trials). [] = not searched: every trial uses the spec's `schedule`. Not searched by
    # default, for the reason given for `schedule`.
    schedule: list[str] = _f([], _choices_of(*SCHEDULES))


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
    # The reference reports trained their final model for 20 epochs.
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
    # Adam: the seed's better optimizer (FDDB 94 % vs 91 % with SGD), and on the 8x8 digits
    # it reaches 94 % validation accuracy in 6 epochs where SGD (momentum 0.9) needs ~3x more.
    # Not adamw: on digits (10 epochs, lr 1e-3, weight_decay 1e-5, one seed) AdamW's test
    # accuracy was 0.963 against Adam's 0.959, within the seed spread (docs/benchmarks.md).
    optimizer: str = _f("adam", _choice(*OPTIMIZERS))
    # "ce": softmax cross-entropy (expects ln C at init); "bce": one-hot BCE (expects ln 2).
    loss: str = _f("ce", _choice(*LOSSES))
    seed: int = _f(0, _at_least(0))
    # 0 = auto: 128 as in the reference reports, halved (down to 8) until an epoch has >= 4 steps.
    batch_size: int = _f(0, _at_least(0))
    # SGD momentum (the reference reports used 0.9), for sgd and nesterov.
    momentum: float = _f(0.9, _number(0, 1))
    # A wall-clock budget for the whole protocol ("10m", "1h30m", "90s", "600"); empty: the
    # spec's trial and epoch counts hold. With one, the stages' trials and epochs are planned to fit it
    # (babysit/stages/budget.py, BUDGET_RULE). Not part of the run's identity: a resumed run
    # may be given another budget and re-plans what is left.
    budget: str = _f("", _duration())
    # LR decay over each trial's epochs, searches and final alike: "none", "step" (x0.1 at
    # half and at three quarters of the epochs) or "cosine" (per epoch, towards 0). "none"
    # by default: on digits (10 epochs, Adam, lr 1e-3, one seed; docs/benchmarks.md "LR
    # schedules, AdamW and dropout") cosine's best val accuracy was 0.974 against 0.959
    # (step: 0.955), 4 of 270 validation images, the size of the spread over seeds; a
    # default that changes no result for certain is not worth making stored runs (whose
    # specs have no schedule and trained without one) read as something else.
    schedule: str = _f("none", _choice(*SCHEDULES))
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    sanity: SanitySpec = field(default_factory=SanitySpec)
    overfit: OverfitSpec = field(default_factory=OverfitSpec)
    coarse: CoarseSpec = field(default_factory=CoarseSpec)
    narrow: NarrowSpec = field(default_factory=NarrowSpec)
    fine: SearchSpec = field(default_factory=SearchSpec)
    final: FinalSpec = field(default_factory=FinalSpec)
    # The keys build_spec was given. Unannotated on purpose: a class attribute, not a field,
    # so it is no part of the run's identity (to_dict); a spec rebuilt elsewhere has none.
    explicit_keys = frozenset[str]()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Spec:
        """The spec a mapping describes: to_dict()'s output, or a spec stored by an earlier
        version (``"model": "alexnet", "arch": {...}``, read as the ``model`` table)."""
        spec = cls()
        apply_mapping(spec, data)
        return spec

    def identity(self) -> dict[str, Any]:
        """The fields that define a run; two specs with equal identity are the same run.
        The budget is not one of them: it says how long to take, not what the run is."""
        out = self.to_dict()
        out.pop("budget", None)
        return out


def all_keys(spec: Spec | None = None) -> list[str]:
    """Every settable key, dotted, as TOML and --set spell them."""
    return keys_of(spec or Spec())


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
        apply_mapping(spec, data)
        explicit.update(dotted(spec, data))
    for assignment in sets:
        apply_set(spec, assignment)
        explicit.add(assignment.partition("=")[0].strip())
    for key, value in (flags or {}).items():
        if value is not None:
            apply_mapping(spec, {key: value})
            explicit.update(dotted(spec, {key: value}))
    validate(spec)
    # Which keys the user gave (not a field: it is not part of the run's identity), so a
    # rule that adapts a default (the coarse lr anchored on the overfit LR) leaves them be.
    spec.explicit_keys = frozenset(explicit)
    return spec


def validate(spec: Spec) -> None:
    """Every field's type and range, then the rules that join fields; the first problem is
    a UsageError of one line naming the field, the value and what is allowed."""
    check_rules(spec)
    if spec.model.name not in MODELS and ":" not in spec.model.name:
        # The words babysit.training.models.build_model says it in, for a spec that skipped
        # this check (rebuilt from a mapping): --print-config refuses it as the run does.
        raise UsageError(
            f"unknown model '{spec.model.name}'; use "
            f"{either(tuple(repr(m) for m in MODELS))} or module:callable"
        )
    if spec.data.val_fraction + spec.data.test_fraction >= 1:
        raise UsageError(
            f"data.val_fraction + data.test_fraction = {spec.data.val_fraction:g} + "
            f"{spec.data.test_fraction:g} leaves no training data; their sum must be < 1"
        )
    folds = {
        "train": spec.data.train_folds,
        "val": spec.data.val_folds,
        "test": spec.data.test_folds,
    }
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sorted(set(folds[a]) & set(folds[b]))
        if shared:
            raise UsageError(
                f"data.{a}_folds and data.{b}_folds share fold(s) "
                f"{shared}; a fold may feed one split only"
            )
    if overfit_lrs(spec) is None:
        raise UsageError(
            f"overfit.lrs has no entry for optimizer '{spec.optimizer}'; "
            f"give overfit.lrs.{spec.optimizer} = [lr, ...]"
        )
    if spec.optimizer == "nesterov" and spec.momentum == 0:
        raise UsageError(
            "optimizer nesterov needs momentum > 0 (Nesterov's step looks ahead along the "
            "momentum); set momentum (e.g. 0.9) or use optimizer sgd"
        )


def overfit_lrs(spec: Spec) -> list[float] | None:
    """The overfit check's learning rates for the spec's optimizer: its own entry of
    overfit.lrs, or that of the optimizer it steps like (adamw: adam, nesterov: sgd)."""
    lrs = spec.overfit.lrs
    found = lrs.get(spec.optimizer)
    if found is None and spec.optimizer in OVERFIT_LRS_OF:
        found = lrs.get(OVERFIT_LRS_OF[spec.optimizer])
    return found
