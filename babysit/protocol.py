"""The five stages in order, and the run's summary derived from storage alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from babysit.data import DataRequest
from babysit.data import default_data_dir
from babysit.data import load_dataset
from babysit.data.augment import build_preprocess
from babysit.data.streaming import DatasetSplits
from babysit.data.streaming import StreamingData
from babysit.data.streaming import data_facts
from babysit.data.streaming import stream_if_asked
from babysit.errors import ProtocolError
from babysit.errors import UsageError
from babysit.lifeline import die_with_parent
from babysit.models import build_model
from babysit.models import input_size
from babysit.report import publish_stage
from babysit.spec import Spec
from babysit.spec import default_run_name
from babysit.stages import FINISHED
from babysit.stages import Context
from babysit.stages import StageResult
from babysit.stages import best_of
from babysit.stages import check_spec
from babysit.stages import final
from babysit.stages import narrow_stage
from babysit.stages import open_stage
from babysit.stages import overfit
from babysit.stages import sanity
from babysit.stages import search
from babysit.stages import stage_counts
from babysit.storage import STAGES
from babysit.storage import Storage
from babysit.storage import find_study
from babysit.train import DeviceData
from babysit.train import configure_device
from babysit.train import device_for

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _log(message: str) -> None:
    # Verdicts are for people: stderr, so --json and --summary-json output stays clean.
    print(message, file=sys.stderr, flush=True)


def prepare(spec: Spec, storage: Storage, *, device: str = "auto", data_dir: str | None = None,
            download: bool = False, force: bool = False, quiet: bool = False,
            owner: bool = True, compile: bool = False, final_procs: int = 1) -> Context:
    """Check the spec against storage, load the data onto the device: everything before
    the first trial. Raises UsageError (exit 2) before anything is written."""
    if not spec.name:
        spec.name = default_run_name(spec.dataset)
    check_spec(storage, spec)
    dev = device_for(device)
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is visible; "
                         "use --device auto or cpu")
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
    streamed = isinstance(splits, DatasetSplits)
    pre = build_preprocess(splits.sample if streamed else splits.train_x, spec.data)
    pre.resize = input_size(spec.model, splits.image_size, spec.data.resize)
    if pre.resize == splits.image_size:
        pre.resize = 0
    # Build the network once now: a user's model that cannot be imported or gives the wrong
    # output shape is an input error before any trial is written.
    build_model(spec.model, splits.num_classes, splits.in_channels,
                pre.resize or splits.image_size)
    if streamed:
        data = StreamingData.from_splits(splits, pre, dev)
        _log(f"data: streamed from torch Datasets by a DataLoader with {data.num_workers} "
             f"worker process{'es' if data.num_workers != 1 else ''}")
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


class _Bar:
    """A tqdm bar per stage on stderr, silent under --quiet."""

    def __init__(self, desc: str, total: int, quiet: bool, unit: str) -> None:
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                            dynamic_ncols=True)

    def to(self, n: int, total: int, *_: Any) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = min(n, total)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _gate(ctx: Context, result: StageResult) -> None:
    ctx.log(f"{result.stage} {result.status}: {result.verdict}")
    publish_stage(ctx, result)
    if result.status == "failed":
        if ctx.force:
            ctx.log(f"{result.stage} failed, continuing because of --force")
        else:
            raise ProtocolError(f"{result.stage} failed: {result.verdict}")


def run_protocol(ctx: Context, jobs: int = 1) -> dict[str, Any]:
    """Sanity, overfit, coarse, narrow, fine, final; each skipped when already done."""
    spec = ctx.spec
    t0 = time.perf_counter()
    ctx.log(f"run {spec.name}: dataset {spec.dataset} ({ctx.data.num_classes} classes, "
            f"{ctx.data.train_size} train images), model {spec.model.name}, optimizer "
            f"{spec.optimizer}, batch {ctx.batch_size}, device {ctx.device.type}, "
            f"storage {ctx.storage.shown}")
    record_data_facts(ctx)

    _gate(ctx, sanity(ctx))
    _gate(ctx, overfit(ctx))

    helpers = _spawn_workers(ctx, jobs)
    try:
        summary = _searches_and_final(ctx, t0)
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
    ctx.log(f"check {spec.name}: dataset {spec.dataset} ({ctx.data.num_classes} classes, "
            f"{ctx.data.train_size} train images), model {spec.model.name}, optimizer "
            f"{spec.optimizer}, device {ctx.device.type}, storage {ctx.storage.shown}")
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
    cmd = [sys.executable, "-m", "babysit", "worker", "--name", ctx.spec.name,
           *ctx.storage.artifact_flags(), "--device", ctx.device.type,
           "--quiet"]
    if ctx.compile:
        cmd.append("--compile")
    if ctx.final_procs > 1:
        # Whichever process takes the final trains it the way this run was asked to.
        cmd += ["--final-procs", str(ctx.final_procs)]
    if ctx.data_dir:
        cmd += ["--data-dir", str(ctx.data_dir)]
    ctx.log(f"--jobs {jobs}: starting {jobs - 1} worker processes beside this one")
    from babysit.distributed import helper_env

    count = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    return [subprocess.Popen(cmd, env=helper_env(env, i, ctx.device.type, count),
                             stdout=subprocess.DEVNULL,
                             preexec_fn=die_with_parent())  # a SIGKILLed run takes them along
            for i in range(1, jobs)]


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


def _coarse_ranges(ctx: Context) -> dict[str, list[float]]:
    """The spec's coarse ranges, the lr range the LR range test proposes, or the lr range
    anchored on the overfit LR (babysit/learned.py); read back from the coarse study once a
    search stored them, so every worker and every rerun uses the same."""
    spec = ctx.spec
    ranges = {"lr": list(spec.coarse.lr), "weight_decay": list(spec.coarse.weight_decay)}
    study = open_stage(ctx, "coarse")
    if "ranges" in study.user_attrs:
        return study.user_attrs["ranges"]
    if not spec.coarse.lr_range_test:
        from babysit.learned import anchored_ranges

        return anchored_ranges(ctx, ranges)
    from babysit.diagnostics import propose_coarse_lr

    test = propose_coarse_lr(ctx)
    study.set_user_attr("lr_range_test", {k: test[k] for k in ("lrs", "losses", "suggested")})
    ranges["lr"] = [float(v) for v in test["suggested"]]
    ctx.log(f"LR range test: loss fell fastest around lr {ranges['lr'][0]:.3g} .. "
            f"{ranges['lr'][1]:.3g}; that is the coarse lr range")
    return ranges


def _searches_and_final(ctx: Context, t0: float) -> dict[str, Any]:
    spec = ctx.spec
    bar = _Bar("coarse", spec.coarse.trials, ctx.quiet, "trial")
    coarse = search(ctx, "coarse", spec.coarse, _coarse_ranges(ctx), progress=bar.to)
    bar.close()
    _gate(ctx, coarse)
    from babysit.learned import extend_coarse

    extended = extend_coarse(ctx)
    if extended is not None:
        _gate(ctx, extended)

    narrowed = narrow_stage(ctx)
    shown = ", ".join(f"{k} [{v[0]:.3g}, {v[1]:.3g}]" for k, v in narrowed["ranges"].items())
    ctx.log(f"narrowed: {shown} ({narrowed['rule']})")
    for warning in narrowed["warnings"]:
        ctx.log(f"warning: {warning}")

    bar = _Bar("fine", spec.fine.trials, ctx.quiet, "trial")
    fine = search(ctx, "fine", spec.fine, narrowed["ranges"], progress=bar.to)
    bar.close()
    _gate(ctx, fine)

    bar = _Bar("final", spec.final.epochs, ctx.quiet, "epoch")
    result = final(ctx, progress=bar.to)
    bar.close()
    if result.status == "skipped":
        ctx.log(f"final: {result.verdict}; this process stops here")
    else:
        _gate(ctx, result)
    summary = summarize(ctx.storage, spec.name)
    summary["wall_seconds"] = time.perf_counter() - t0
    return summary


def _trials(storage: Storage, run: str, stage: str) -> tuple[optuna.Study | None, list]:
    study = find_study(storage, run, stage)
    if study is None:
        return None, []
    return study, study.get_trials(deepcopy=False)


def stored_spec(storage: Storage, run: str) -> Spec:
    """The run's spec as its studies carry it, so a worker needs no flags."""
    for stage in STAGES:
        study = find_study(storage, run, stage)
        if study is not None and "spec" in study.user_attrs:
            return Spec.from_dict(study.user_attrs["spec"])
    raise UsageError(f"no run named '{run}' in storage {storage.shown}; "
                     "start it with `babysit run --name RUN` first")


def summarize(storage: Storage, run: str) -> dict[str, Any]:
    """The summary JSON (DESIGN.md section 2), read from storage alone."""
    spec = stored_spec(storage, run)
    stages: dict[str, Any] = {}
    examples_total = 0
    examples_by_stage: dict[str, float] = {}
    num_classes = None
    train_size = None

    study, trials = _trials(storage, run, "sanity")
    done = [t for t in trials if t.state in FINISHED]
    if done:
        a = done[0].user_attrs
        stages["sanity"] = {"status": a["status"], "initial_loss": a["initial_loss"],
                            "expected_loss": a["expected_loss"],
                            "loss_with_reg": a["loss_with_reg"], "verdict": a["verdict"],
                            "logit_std": a.get("logit_std"),
                            "top_class_share": a.get("top_class_share")}
    else:
        stages["sanity"] = {"status": "skipped", "initial_loss": None, "expected_loss": None}
    loaded = None
    if study is not None:
        train_size = study.user_attrs.get("train_size")
        num_classes = study.user_attrs.get("num_classes")
        loaded = study.user_attrs.get("data")

    study, trials = _trials(storage, run, "overfit")
    done = [t for t in trials if t.state in FINISHED]
    if done:
        best = max(done, key=lambda t: t.value or 0.0)
        status = "passed" if (best.value or 0.0) >= 1.0 else (
            "failed" if study and "verdict" in study.user_attrs else "running")
        stages["overfit"] = {"status": status, "train_accuracy": best.value,
                             "lr": best.params.get("lr"),
                             "verdict": study.user_attrs.get("verdict") if study else None}
    else:
        stages["overfit"] = {"status": "skipped", "train_accuracy": None}
    examples_by_stage["overfit"] = sum(int(t.user_attrs.get("examples", 0)) for t in trials)

    for stage in ("coarse", "fine"):
        study, trials = _trials(storage, run, stage)
        counts = stage_counts(trials)
        target = getattr(spec, stage).trials
        best = best_of(trials)
        if not trials:
            # A fine stage that narrowing refused to start carries that verdict.
            status = "failed" if study is not None and "verdict" in study.user_attrs \
                else "skipped"
        elif counts["trials"] >= target:
            status = "passed" if best is not None else "failed"
        else:
            status = "running"
        entry: dict[str, Any] = {"status": status, "trials": counts["trials"],
                                 "complete": counts["complete"], "pruned": counts["pruned"],
                                 "failed": counts["failed"], "diverged": counts["diverged"],
                                 "target": target, "best": best}
        if stage == "fine":
            narrowed = study.user_attrs.get("narrowed") if study else None
            entry["range"] = narrowed["ranges"] if narrowed else None
            entry["narrowing"] = narrowed
        else:
            entry["range"] = (study.user_attrs.get("ranges") if study else None) or {
                "lr": spec.coarse.lr, "weight_decay": spec.coarse.weight_decay}
        stages[stage] = entry
        examples_by_stage[stage] = sum(int(t.user_attrs.get("examples", 0)) for t in trials)

    study, trials = _trials(storage, run, "final")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        t = complete[0]
        a = t.user_attrs
        stages["final"] = {"status": "passed", "params": dict(t.params),
                           "epochs": a.get("epochs_run"), "val_accuracy": a.get("val_accuracy"),
                           "test_accuracy": a.get("test_accuracy"),
                           "test_loss": a.get("test_loss"),
                           "model_artifact": a.get("model_artifact"),
                           # The plateau stop: the epoch whose weights were tested, the
                           # epochs of the budget not run, and why training ended.
                           "best_epoch": a.get("best_epoch"),
                           "epochs_saved": a.get("epochs_saved"),
                           "stopped": a.get("stopped"),
                           "procs": a.get("final_procs", 1)}
    else:
        stages["final"] = {"status": "running" if trials else "skipped", "params": None,
                           "epochs": None, "val_accuracy": None, "test_accuracy": None,
                           "test_loss": None}
    examples_by_stage["final"] = sum(int(t.user_attrs.get("examples", 0)) for t in trials)
    examples_by_stage["sanity"] = 0
    examples_total = sum(examples_by_stage.values())
    train_size = train_size or 1
    return {
        "name": run,
        "dataset": spec.dataset,
        "num_classes": num_classes,
        "model": spec.model.name,
        "optimizer": spec.optimizer,
        "storage": storage.shown,
        "wall_seconds": None,
        "epochs_spent": examples_total / train_size,
        "epochs_by_stage": {k: examples_by_stage[k] / train_size for k in STAGES},
        # How the data was loaded: "loader" (tensor or streaming), skipped_files, ...
        "data": loaded,
        "stages": stages,
    }


def record_data_facts(ctx: Context) -> None:
    """What the summary needs to know of the data, stored once on the sanity study."""
    study = open_stage(ctx, "sanity", direction="minimize")
    if "train_size" not in study.user_attrs:
        study.set_user_attr("train_size", ctx.data.train_size)
        study.set_user_attr("num_classes", ctx.data.num_classes)
        study.set_user_attr("data", ctx.data_info)
        study.set_user_attr("sizes", {"train": ctx.data.train_size,
                                      "val": ctx.data.size("val"),
                                      "test": ctx.data.size("test")})
