"""Everything before the first trial: the spec checked against storage, the data
loaded onto its device, the run's Context built once; and the data facts stored
on the sanity study for the summary.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

from babysit.data import DataRequest
from babysit.data import default_data_dir
from babysit.data import load_dataset
from babysit.data.augment import build_preprocess
from babysit.data.core import wants_download
from babysit.data.device import DeviceData
from babysit.data.streaming import DatasetSplits
from babysit.data.streaming import StreamingData
from babysit.data.streaming import data_facts
from babysit.data.streaming import stream_if_asked
from babysit.errors import UsageError
from babysit.parallel.coordination import quiet_optuna
from babysit.protocol.budget import start_budget
from babysit.schema import Stage
from babysit.schema import StudyAttrs
from babysit.spec import Spec
from babysit.spec import default_run_name
from babysit.stages.context import Context
from babysit.stages.study import check_spec
from babysit.stages.study import open_stage
from babysit.storage import Storage
from babysit.terminal import plural
from babysit.training.models import check_model
from babysit.training.models import input_size
from babysit.training.step import configure_device
from babysit.training.step import device_for


def _log(message: str) -> None:
    # Verdicts are for people: stderr, so --json and --summary-json output stays clean.
    print(message, file=sys.stderr, flush=True)


def _device(device: str, final_procs: int) -> torch.device:
    """The training device, checked against what was asked of it, and set up."""
    dev = device_for(device)
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was asked for but no CUDA device is visible; use --device auto or cpu"
        )
    from babysit.stages.final.launch import check_procs

    check_procs(final_procs, dev.type)
    configure_device(dev)
    return dev


def prepare(
    spec: Spec,
    storage: Storage,
    *,
    device: str = "auto",
    data_dir: str | None = None,
    download: bool | None = None,
    offline: bool = False,
    force: bool = False,
    quiet: bool = False,
    owner: bool = True,
    compile: bool = False,
    final_procs: int = 1,
) -> Context:
    """Check the spec against storage, load the data onto the device: everything before
    the first trial. Raises UsageError (exit 2) before anything is written: a --budget
    too short for the least protocol too, measured here (babysit/protocol/budget.py)."""
    started = time.time()
    quiet_optuna()
    if not spec.name:
        spec.name = default_run_name(spec.dataset)
    check_spec(storage, spec)
    dev = _device(device, final_procs)
    request = DataRequest(
        data_dir=Path(data_dir) if data_dir else default_data_dir(),
        seed=spec.seed,
        download=wants_download(download, offline),
        options=spec.data,
        quiet=quiet,
    )
    splits = stream_if_asked(load_dataset(spec.dataset, request), spec.dataset)
    if isinstance(splits, DatasetSplits):
        # Streamed: check() (run by the loaders) kept a train sample for the statistics.
        assert splits.sample is not None, "DatasetSplits.check was not run"
        pre = build_preprocess(splits.sample, spec.data)
    else:
        pre = build_preprocess(splits.train_x, spec.data)
    pre.resize = input_size(spec.model, splits.image_size, spec.data.resize)
    if pre.resize == splits.image_size:
        pre.resize = 0
    # Build the network once now: a user's model that cannot be imported or gives the wrong
    # output shape is an input error before any trial is written.
    check_model(
        spec.model,
        splits.num_classes,
        splits.in_channels,
        pre.resize or splits.image_size,
        dropout_searched=bool(spec.coarse.dropout),
    )
    data: DeviceData | StreamingData
    if isinstance(splits, DatasetSplits):
        data = StreamingData.from_splits(splits, pre, dev)
        _log(
            f"data: streamed from torch Datasets by a DataLoader with "
            f"{plural(data.num_workers, 'worker process')}"
        )
    else:
        data = DeviceData.from_splits(splits, pre, dev)
    ctx = Context(
        data_dir=request.data_dir if data_dir else None,
        compile=compile,
        spec=spec,
        storage=storage,
        data=data,
        force=force,
        quiet=quiet,
        owner=owner,
        # Each .item() is a sync; on a GPU read the loss every 8 steps.
        check_every=1 if dev.type == "cpu" else 8,
        log=_log,
        data_info=data_facts(splits, data),
        final_procs=final_procs,
    )
    return dataclasses.replace(ctx, budget=start_budget(ctx, started))


def record_data_facts(ctx: Context) -> None:
    """What the summary needs to know of the data, stored once on the sanity study."""
    study = open_stage(ctx, Stage.SANITY, direction="minimize")
    if StudyAttrs.from_attrs(study.user_attrs).train_size is None:
        facts = StudyAttrs(
            train_size=ctx.data.train_size,
            num_classes=ctx.data.num_classes,
            data=ctx.data_info,
            sizes={
                "train": ctx.data.train_size,
                "val": ctx.data.size("val"),
                "test": ctx.data.size("test"),
            },
        )
        for key, value in facts.to_attrs().items():
            study.set_user_attr(key, value)
