"""The five stages in order, and the run's summary derived from storage alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from babysit import stored
from babysit.context import Context
from babysit.context import StageResult
from babysit.coordination import check_spec
from babysit.coordination import open_stage
from babysit.coordination import quiet_optuna
from babysit.data import DataRequest
from babysit.data import default_data_dir
from babysit.data import load_dataset
from babysit.data.augment import build_preprocess
from babysit.data.streaming import DatasetSplits
from babysit.data.streaming import StreamingData
from babysit.data.streaming import data_facts
from babysit.data.streaming import stream_if_asked
from babysit.distributed import launch_final
from babysit.errors import ProtocolError
from babysit.errors import UsageError
from babysit.final import final
from babysit.lifeline import die_with_parent
from babysit.memory import frozen_heap
from babysit.models import build_model
from babysit.models import input_size
from babysit.record import Param
from babysit.record import StudyAttrs
from babysit.record import StudyKey
from babysit.report import publish_stage
from babysit.search import search
from babysit.spec import Spec
from babysit.spec import default_run_name
from babysit.stages import narrow_stage
from babysit.stages import overfit
from babysit.stages import sanity
from babysit.storage import Storage
from babysit.terminal import Progress
from babysit.terminal import plural
from babysit.train import DeviceData
from babysit.train import configure_device
from babysit.train import device_for


def _log(message: str) -> None:
    # Verdicts are for people: stderr, so --json and --summary-json output stays clean.
    print(message, file=sys.stderr, flush=True)


def prepare(
    spec: Spec,
    storage: Storage,
    *,
    device: str = "auto",
    data_dir: str | None = None,
    download: bool = False,
    force: bool = False,
    quiet: bool = False,
    owner: bool = True,
    compile: bool = False,
    final_procs: int = 1,
) -> Context:
    """Check the spec against storage, load the data onto the device: everything before
    the first trial. Raises UsageError (exit 2) before anything is written."""
    quiet_optuna()
    if not spec.name:
        spec.name = default_run_name(spec.dataset)
    check_spec(storage, spec)
    dev = device_for(device)
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was asked for but no CUDA device is visible; use --device auto or cpu"
        )
    from babysit.distributed import check_procs

    check_procs(final_procs, dev.type)
    configure_device(dev)
    request = DataRequest(
        data_dir=Path(data_dir) if data_dir else default_data_dir(),
        seed=spec.seed,
        download=download,
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
    build_model(
        spec.model, splits.num_classes, splits.in_channels, pre.resize or splits.image_size
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
    return Context(
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


def _said(result: StageResult) -> str:
    """The verdict after "<stage> <status>: ", without the stage's name said twice (a
    search's stored verdict starts with it, for readers that show it alone)."""
    prefix = f"{result.stage}: "
    return result.verdict[len(prefix) :] if result.verdict.startswith(prefix) else result.verdict


def _gate(ctx: Context, result: StageResult) -> None:
    ctx.log(f"{result.stage} {result.status}: {_said(result)}")
    publish_stage(ctx, result)
    if result.status == "failed":
        if ctx.force:
            ctx.log(f"{result.stage} failed, continuing because of --force")
        else:
            raise ProtocolError(f"{result.stage} failed: {_said(result)}")


def run_protocol(ctx: Context, jobs: int = 1) -> dict[str, Any]:
    """Sanity, overfit, coarse, narrow, fine, final; each skipped when already done."""
    spec = ctx.spec
    t0 = time.perf_counter()
    ctx.log(
        f"run {spec.name}: dataset {spec.dataset} ({ctx.data.num_classes} classes, "
        f"{ctx.data.train_size} train images), model {spec.model.name}, optimizer "
        f"{spec.optimizer}, batch {ctx.batch_size}, device {ctx.device.type}, "
        f"storage {ctx.storage.shown}"
    )
    record_data_facts(ctx)
    # Everything imported and loaded so far lives as long as the run: out of the
    # collections that free each trial's network.
    with frozen_heap():
        checked = sanity(ctx)
        _gate(ctx, checked)
        _gate(ctx, overfit(ctx))

        helpers = _spawn_workers(ctx, jobs)
        try:
            summary = _searches_and_final(ctx, checked.initial_loss, t0)
        except BaseException:
            _stop(helpers)
            raise
        _reap(helpers)
    return summary


def run_check(ctx: Context) -> dict[str, Any]:
    """`babysit check`: sanity and overfit only, stored as the run's first two stages, so
    `babysit run` with the same name and spec skips them and goes on with the searches."""
    spec = ctx.spec
    t0 = time.perf_counter()
    ctx.log(
        f"check {spec.name}: dataset {spec.dataset} ({ctx.data.num_classes} classes, "
        f"{ctx.data.train_size} train images), model {spec.model.name}, optimizer "
        f"{spec.optimizer}, device {ctx.device.type}, storage {ctx.storage.shown}"
    )
    record_data_facts(ctx)
    _gate(ctx, sanity(ctx))
    _gate(ctx, overfit(ctx))
    summary = summarize(ctx.storage, spec.name)
    summary["wall_seconds"] = time.perf_counter() - t0
    return summary


def _spawn_workers(ctx: Context, jobs: int) -> list[subprocess.Popen]:
    """``--jobs N``: N-1 `babysit worker` processes join the searches.

    For networks too small to fill a GPU alone. With several GPUs visible, helper i is
    pinned (CUDA_VISIBLE_DEVICES) to device i mod count, round robin with this process on
    the first. The storage URL travels in the environment,
    not on the command line, where `ps` would show a password.
    """
    if jobs <= 1:
        return []
    env = dict(os.environ)
    env["BABYSIT_STORAGE"] = ctx.storage.url
    if ctx.device.type == "cpu":
        # Share the cores instead of every process spinning up one thread per core.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    cmd = [
        sys.executable,
        "-m",
        "babysit",
        "worker",
        "--name",
        ctx.spec.name,
        *ctx.storage.artifact_flags(),
        "--device",
        ctx.device.type,
        "--quiet",
    ]
    if ctx.compile:
        cmd.append("--compile")
    if ctx.final_procs > 1:
        # Whichever process takes the final trains it the way this run was asked to.
        cmd += ["--final-procs", str(ctx.final_procs)]
    if ctx.data_dir:
        cmd += ["--data-dir", str(ctx.data_dir)]
    ctx.log(f"--jobs {jobs}: starting {plural(jobs - 1, 'worker process')} beside this one")
    from babysit.distributed import helper_env

    count = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    return [
        subprocess.Popen(
            cmd,
            env=helper_env(env, i, ctx.device.type, count),
            stdout=subprocess.DEVNULL,
            preexec_fn=die_with_parent(),
        )  # a SIGKILLed run takes them along
        for i in range(1, jobs)
    ]


def _reap(helpers: list[subprocess.Popen]) -> None:
    """Workers exit by themselves once final is taken; give them a moment to do so."""
    for proc in helpers:
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            _stop([proc])


def _stop(helpers: list[subprocess.Popen]) -> None:
    """SIGINT first, so each worker marks its running trial FAIL before it goes."""
    for proc in helpers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in helpers:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _coarse_ranges(ctx: Context, initial_loss: float) -> dict[str, list[float]]:
    """The spec's coarse ranges, the lr range the LR range test proposes, or the lr range
    anchored on the overfit LR (babysit/learned.py); read back from the coarse study once a
    search stored them, so every worker and every rerun uses the same."""
    spec = ctx.spec
    ranges = {Param.LR: list(spec.coarse.lr), Param.WEIGHT_DECAY: list(spec.coarse.weight_decay)}
    study = open_stage(ctx, "coarse")
    stored = StudyAttrs.from_attrs(study.user_attrs).ranges
    if stored is not None:
        return stored
    if not spec.coarse.lr_range_test:
        from babysit.learned import anchored_ranges
        from babysit.learned import probe_top
        from babysit.learned import user_set_lr

        chosen = anchored_ranges(ctx, ranges)
        # A range babysit chose is probed at its top; a range the user set is theirs.
        return chosen if user_set_lr(spec) else probe_top(ctx, chosen, initial_loss)
    from babysit.lr_range import propose_coarse_lr

    test = propose_coarse_lr(ctx)
    from babysit.artifacts import upload_json

    # The curve (a few kB) as a JSON artifact; the attr keeps the proposal and names it.
    curve = upload_json(
        ctx.storage,
        study,
        "lr_range_test.json",
        {k: test[k] for k in ("lrs", "losses", "suggested")},
    )
    study.set_user_attr(
        StudyKey.LR_RANGE_TEST, {"suggested": list(test["suggested"]), "artifact": curve}
    )
    lr = ranges[Param.LR] = [float(v) for v in test["suggested"]]
    ctx.log(
        f"LR range test: loss fell fastest around lr {lr[0]:.3g} .. "
        f"{lr[1]:.3g}; that is the coarse lr range"
    )
    return ranges


def _searches_and_final(ctx: Context, initial_loss: float, t0: float) -> dict[str, Any]:
    """Coarse (and its extra round at an edge), narrow, fine, final. ``initial_loss``: the
    sanity stage's, which the searches' divergence check is measured against."""
    spec = ctx.spec
    # The bar starts at the search's first report: after the LR range test or the anchoring
    # has said its piece, and at the trials a previous run stored.
    ranges = _coarse_ranges(ctx, initial_loss)
    bar = Progress("coarse", "trial", ctx.quiet)
    coarse = search(ctx, "coarse", spec.coarse, ranges, initial_loss=initial_loss, progress=bar.to)
    bar.close()
    # A first round in which every trial diverged is not the end: the extra round looks
    # below where it diverged (babysit/learned.py), and only then is the stage judged.
    if coarse.status != "failed":
        _gate(ctx, coarse)
    from babysit.learned import extend_coarse

    bar = Progress("coarse", "trial", ctx.quiet)
    extended = extend_coarse(ctx, initial_loss, progress=bar.to)
    bar.close()
    if extended is not None:
        _gate(ctx, extended)
    elif coarse.status == "failed":
        _gate(ctx, coarse)

    narrowed = narrow_stage(ctx)
    shown = ", ".join(f"{k} [{v[0]:.3g}, {v[1]:.3g}]" for k, v in narrowed["ranges"].items())
    ctx.log(f"narrowed: {shown} ({narrowed['rule']})")
    for warning in narrowed["warnings"]:
        ctx.log(f"warning: {warning}")

    bar = Progress("fine", "trial", ctx.quiet)
    fine = search(
        ctx, "fine", spec.fine, narrowed["ranges"], initial_loss=initial_loss, progress=bar.to
    )
    bar.close()
    _gate(ctx, fine)

    bar = Progress("final", "epoch", ctx.quiet)
    result = final(ctx, progress=bar.to, launch=launch_final)
    bar.close()
    if result.status == "skipped":
        ctx.log(f"final: {result.verdict}; this process stops here")
    else:
        _gate(ctx, result)
    summary = summarize(ctx.storage, spec.name)
    summary["wall_seconds"] = time.perf_counter() - t0
    return summary


def stored_spec(storage: Storage, run: str) -> Spec:
    """The run's spec as its studies carry it, so a worker needs no flags."""
    return stored.stored_spec(storage, run)


def summarize(storage: Storage, run: str) -> dict[str, Any]:
    """The summary JSON (README.md, "Commands"; docs/design.md), read from storage alone (babysit.record)."""
    return stored.summary(storage, run)


def record_data_facts(ctx: Context) -> None:
    """What the summary needs to know of the data, stored once on the sanity study."""
    study = open_stage(ctx, "sanity", direction="minimize")
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
