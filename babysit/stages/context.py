"""What the stages take and what they give back.

``Context`` is the run's fixed environment: the spec, the storage, the data on its device and
how this process was asked to run. ``protocol.prepare`` builds it once, before the first trial,
and nothing changes it afterwards (it is frozen). What one stage learns for a later one is not
written into it: it is returned in that stage's result and passed on as an argument (the
sanity stage's ``initial_loss``, which the searches measure divergence against).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import torch

from babysit.data.device import DeviceData
from babysit.data.streaming import StreamingData
from babysit.schema import STAGES
from babysit.schema import Param
from babysit.spec import Spec
from babysit.stages.budget import Budget
from babysit.storage import Storage
from babysit.training.models import build_model
from babysit.training.models import fit_head_to_data
from babysit.training.models import set_dropout
from babysit.training.step import channels_last_pays


def _print(message: str) -> None:
    print(message)


@dataclass(frozen=True)
class Context:
    spec: Spec
    storage: Storage
    data: DeviceData | StreamingData
    force: bool = False
    quiet: bool = False
    # False for `babysit worker`: it joins the searches and waits for the rest.
    owner: bool = True
    # Read the loss (a device sync) every this many steps; 1 on the CPU, where it is free.
    check_every: int = 1
    log: Callable[[str], None] = _print
    # Where the data came from, so `--jobs` workers load the same files.
    data_dir: Path | None = None
    # torch.compile each trial's network (pays on a GPU for long trials; compiling costs
    # tens of seconds per new model).
    compile: bool = False
    # What loading the data found (tensor or streaming path, skipped files), for storage.
    data_info: dict[str, Any] = field(default_factory=dict)
    # Processes training the final data parallel (`--final-procs`; babysit.stages.final.launch).
    final_procs: int = 1
    # `--budget`: what was measured before the first trial and the plan (owner only; a
    # worker follows the plan stored on each study).
    budget: Budget | None = None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def batch_size(self) -> int:
        return effective_batch_size(self.spec.batch_size, self.data.train_size)


def effective_batch_size(asked: int, train_size: int) -> int:
    """``batch_size = 0`` means auto: 128 (the reference reports' choice), halved (down to 8) until an
    epoch has at least 4 full steps, so 140 training faces are not two steps an epoch.

    Why 4 and not more: on the CPU a step of the AlexNet costs about the same at batch 16
    as at 128 (its 23M weights, their gradients and Adam's state are read and written each
    step whatever the batch), so each halving nearly doubles an epoch's time. On faces,
    batch 16 (8 steps) took 1.3x the wall of batch 32 (4 steps) for no better accuracy
    (docs/benchmarks.md, issue 16).
    """
    if asked > 0:
        return asked
    size = 128
    while size > 8 and train_size // size < _MIN_STEPS:
        size //= 2
    return size


_MIN_STEPS = 4


@dataclass
class StageResult:
    stage: str
    # passed, failed, skipped; or recovered: the stage failed its own aim but the run goes
    # on from what an earlier stage found, as the verdict says (the summary: passed + recovery)
    status: str
    verdict: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class SanityResult(StageResult):
    # The loss the searches measure divergence against: the untrained network's, or the
    # expected ln C when that was not finite (a --force run past a failed sanity check).
    initial_loss: float = math.nan


def seed_for(spec: Spec, stage: str, number: int) -> int:
    """The seed of trial ``number`` of ``stage``: the same in every process and rerun."""
    return (spec.seed * 1_000_003 + STAGES.index(stage) * 10_007 + number) % (2**31)


def fresh_model(ctx: Context, seed: int, dropout: float | None = None) -> torch.nn.Module:
    """The run's network, initialised from ``seed``, on the device, as every trial starts.
    ``dropout``: a searched dropout strength, AlexNet's classifier dropout or the p of every
    dropout layer of a user's network (None: the network as the spec builds it)."""
    torch.manual_seed(seed)
    data = ctx.data
    knobs = ctx.spec.model
    if dropout is not None and knobs.name == "alexnet":
        knobs = dataclasses.replace(knobs, dropout=dropout)
    model = build_model(
        knobs, data.num_classes, data.in_channels, data.pre.resize or data.image_size
    )
    if dropout is not None and knobs.name != "alexnet":
        set_dropout(model, dropout)
    model = model.to(ctx.device)
    # babysit's own network only: a user's model is diagnosed by sanity, never re-initialised.
    fit_head_to_data(model, ctx.spec.model.name, data, ctx.spec.loss)
    if channels_last_pays(ctx.device, ctx.spec.model.name):
        model = model.to(memory_format=torch.channels_last)
    if ctx.compile:
        model.compile()  # in place: state_dict keys stay those of the plain module
    return model


def trial_knobs(params: dict[str, Any]) -> dict[str, Any]:
    """The searched knobs besides lr and weight_decay in a trial's params: ``dropout`` and
    ``schedule`` where the search drew them (fresh_model's and fit's arguments)."""
    return {k: params[k] for k in (Param.DROPOUT, Param.SCHEDULE) if k in params}


def generator_for(ctx: Context, seed: int) -> torch.Generator:
    return torch.Generator(device=ctx.device).manual_seed(seed)
