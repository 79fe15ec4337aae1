"""The final training of one process or one rank: epochs of ``fit`` with the state
carried between them (curves, the best epoch, the checkpoint clock), the test of
the best epoch's weights, the model stored. Only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from typing import TypedDict

import optuna
import torch

from babysit.record.artifacts import store_trial_data
from babysit.record.stored import narrowing_warnings
from babysit.report.publish import upload_filters
from babysit.schema import Stage
from babysit.schema import TrialKey
from babysit.stages.context import Context
from babysit.stages.context import fresh_model
from babysit.stages.context import generator_for
from babysit.stages.context import seed_for
from babysit.stages.final.checkpoint import checkpoint_due
from babysit.stages.final.checkpoint import copy_weights
from babysit.stages.final.checkpoint import save_checkpoint
from babysit.stages.final.checkpoint import save_model
from babysit.training.diagnostics import Monitor
from babysit.training.diagnostics import record_diagnostics
from babysit.training.step import EpochStats
from babysit.training.step import evaluate
from babysit.training.step import fit
from babysit.training.step import make_optimizer


class _Clock(TypedDict):
    """Checkpoint timing of the final training (the rule of ``checkpoint_due``)."""

    since: float  # perf_counter() at the last write (or the start)
    write: float | None  # seconds the last write took; None before the first
    writes: int


class _Outcome(TypedDict):
    """How the final training ended, as ``on_epoch`` leaves it."""

    stopped: str  # "", "diverged" or "plateau"
    epochs: int


class _StopFinal(Exception):
    """Raised from the epoch callback to leave ``fit``: plateau or divergence."""


def _synced_stats(stats: EpochStats, world: int) -> EpochStats:
    """Data parallel: train loss and accuracy averaged over the ranks' shards; validation
    (each rank evaluates the whole split) and the flags below as rank 0 has them."""
    if world == 1:
        return stats
    from babysit.stages.final.ddp import all_mean
    from babysit.stages.final.ddp import from_rank0

    train_loss, train_acc = all_mean([stats.train_loss, stats.train_acc])
    val_loss, val_acc = from_rank0([stats.val_loss, stats.val_acc])
    return dataclasses.replace(
        stats, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss, val_acc=val_acc
    )


@dataclass
class _Carried:
    """What the final carries from epoch to epoch, and so in its checkpoint."""

    start: int
    curves: dict[str, list[float]]
    best: dict[str, Any]
    best_state: dict[str, torch.Tensor] | None


def _restore(
    ckpt: dict[str, Any],
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    augment: torch.Generator | None,
    rank: int,
    world: int,
) -> None:
    """Weights, optimiser state and random streams as the checkpoint left them (a rank's own
    streams when it was written by as many ranks)."""
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    gen.set_state(
        ckpt["generator"].to(gen.device) if gen.device.type == "cpu" else ckpt["generator"].cpu()
    )
    ranks = ckpt.get("ranks") or []
    if world == 1:
        torch.set_rng_state(ckpt["torch_rng"].cpu())
    elif len(ranks) == world and augment is not None:
        torch.set_rng_state(ranks[rank]["torch_rng"].cpu())
        augment.set_state(ranks[rank]["augment"].cpu())


def _carried(ckpt: dict[str, Any] | None, model: torch.nn.Module, epochs: int) -> _Carried:
    """A fresh start, or the curves and best epoch so far from ``ckpt`` (with ``model``
    restored from it)."""
    if ckpt is None:
        return _Carried(
            0,
            {k: [] for k in ("train_loss", "train_acc", "val_loss", "val_acc")},
            {"epoch": 0, "val_acc": -math.inf, "val_loss": math.inf},
            None,
        )
    start = int(ckpt["epoch"])
    curves = {k: list(map(float, v)) for k, v in ckpt["curves"].items()}
    best = dict(
        ckpt.get("best")
        or {"epoch": start, "val_acc": curves["val_acc"][-1], "val_loss": curves["val_loss"][-1]}
    )
    best_state = ckpt.get("best_model")
    if best_state is None and start < epochs:
        best_state = copy_weights(model)
    return _Carried(start, curves, best, best_state)


def train_final(
    ctx: Context,
    study: optuna.Study | None,
    trial: optuna.Trial | None,
    lr: float,
    wd: float,
    ckpt: dict[str, Any] | None,
    progress: Callable[[int, int], None] | None = None,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """The final training of one process, or of one rank of ``world`` (DistributedDataParallel
    over an initialised process group; babysit.distributed launches it).

    Only rank 0 has ``study`` and ``trial`` and writes anything: curves, checkpoints, the
    model. Every rank starts from ``ckpt`` when resuming. Returns rank 0's results.
    """
    spec = ctx.spec
    main = rank == 0
    seed = seed_for(spec, Stage.FINAL, 0)
    model = fresh_model(ctx, seed)
    net: torch.nn.Module = model
    gen = generator_for(ctx, seed)  # the permutation: the same on every rank
    augment = None
    if world > 1:
        from babysit.stages.final.ddp import wrap

        net = wrap(model)
        # Dropout and augmentation of their own per rank; one shared stream would give
        # example i of every rank's batch the same flip and the same mask.
        torch.manual_seed(seed + 1 + rank)
        augment = generator_for(ctx, seed + 1 + rank)
    opt = make_optimizer(spec.optimizer, net.parameters(), lr, wd, spec.momentum)
    if ckpt is not None:
        _restore(ckpt, model, opt, gen, augment, rank, world)
    carried = _carried(ckpt, model, spec.final.epochs)
    start, curves, best = carried.start, carried.curves, carried.best
    best_state = carried.best_state  # None: the current weights are best
    if main:
        assert trial is not None, "rank 0 records on the final trial"
        if ckpt is not None:
            trial.set_user_attr(TrialKey.RESUMED_FROM_EPOCH, start)
        trial.set_user_attr(TrialKey.FINAL_PROCS, world)
        monitor = Monitor(model)  # diagnostics
        edge = narrowing_warnings(ctx.storage, spec.name)  # diagnostics
    diag: dict[str, Any] = {}  # diagnostics and readings, stored as artifacts at the end
    batch = ctx.batch_size
    per_rank = max(1, batch // world)
    t0 = time.perf_counter()
    clock: _Clock = {"since": time.perf_counter(), "write": None, "writes": 0}
    outcome: _Outcome = {"stopped": "", "epochs": start}

    def on_epoch(stats: EpochStats) -> None:
        nonlocal best_state
        stats = _synced_stats(stats, world)
        for k in curves:
            curves[k].append(getattr(stats, k))
        outcome["epochs"] = stats.epoch
        diverged = not (math.isfinite(stats.train_loss) and math.isfinite(stats.val_loss))
        if not diverged and (
            stats.val_acc > best["val_acc"]
            or (stats.val_acc == best["val_acc"] and stats.val_loss < best["val_loss"])
        ):
            best.update(epoch=stats.epoch, val_acc=stats.val_acc, val_loss=stats.val_loss)
            best_state = None
        plateau = spec.final.patience > 0 and stats.epoch - best["epoch"] >= spec.final.patience
        last = diverged or plateau or stats.epoch >= spec.final.epochs
        due = 0.0
        if main:
            assert trial is not None
            diag.update(record_diagnostics(monitor, curves, epoch=stats.epoch, warnings=edge))
            trial.set_user_attr(TrialKey.EPOCHS_RUN, stats.epoch)
            trial.set_user_attr(TrialKey.BEST_EPOCH, best["epoch"])
            trial.set_user_attr(TrialKey.EXAMPLES, (stats.epoch - start) * ctx.data.train_size)
            trial.report(stats.val_acc, stats.epoch)
            # No checkpoint of diverged weights: a rerun would resume into NaN.
            due = float(
                not diverged
                and checkpoint_due(
                    stats.epoch,
                    last,
                    time.perf_counter() - clock["since"],
                    clock["write"],
                    spec.final.checkpoint_share,
                )
            )
        if world > 1:
            from babysit.stages.final.ddp import from_rank0

            due = from_rank0([due])[0]
        if due:
            rng = {
                "torch_rng": torch.get_rng_state(),
                "augment": augment.get_state() if augment is not None else None,
            }
            if world > 1:
                from babysit.stages.final.ddp import gather_to_rank0

                ranks = gather_to_rank0(rng)
            else:
                ranks = None
            if main:
                assert study is not None and trial is not None, "rank 0 has both"
                w0 = time.perf_counter()
                save_checkpoint(
                    ctx,
                    study,
                    trial,
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "generator": gen.get_state(),
                        "torch_rng": torch.get_rng_state(),
                        "ranks": ranks,
                        "epoch": stats.epoch,
                        "curves": curves,
                        "best": dict(best),
                        "best_model": best_state,
                    },
                    stats.epoch,
                )
                clock["write"] = time.perf_counter() - w0
                clock["since"] = time.perf_counter()
                clock["writes"] += 1
        if best_state is None and not last:
            best_state = copy_weights(model)
        if progress is not None:
            progress(stats.epoch, spec.final.epochs)
        if diverged or plateau:
            outcome["stopped"] = "diverged" if diverged else "plateau"
            raise _StopFinal

    budget = spec.final.epochs
    if spec.final.patience > 0 and start - best["epoch"] >= spec.final.patience:
        budget = start  # killed after the plateau stop's checkpoint: nothing left to train
    kwargs: dict[str, Any] = {}
    if world > 1:
        kwargs = {"shard": (rank, world), "augment_generator": augment}
    if progress is not None:
        progress(start, spec.final.epochs)  # the display starts at a resumed epoch
    history = None
    try:
        history = fit(
            net,
            opt,
            ctx.data,
            epochs=budget,
            batch_size=per_rank,
            loss=spec.loss,
            generator=gen,
            start_epoch=start,
            diverge_above=None,
            # Ranks must leave together: a step-level NaN stop on one rank would
            # leave the others waiting in the next gradient all-reduce, so data
            # parallel training checks divergence at the end of each epoch.
            stop_on_divergence=world == 1,
            check_every=ctx.check_every,
            on_epoch=on_epoch,
            monitor=(lambda s, _m, o, v: monitor(s, model, o, v)) if main else None,
            **kwargs,
        )
    except _StopFinal:
        pass
    if history is not None and history.stopped == "diverged":
        outcome["stopped"] = "diverged"
    if not main:
        return {}
    assert trial is not None
    diag.update(record_diagnostics(monitor, curves, warnings=edge))  # diagnostics
    store_trial_data(ctx.storage, trial, **{TrialKey.CURVES: curves}, **diag)
    trial.set_user_attr(TrialKey.SECONDS, time.perf_counter() - t0)
    trial.set_user_attr(TrialKey.EXAMPLES, (outcome["epochs"] - start) * ctx.data.train_size)
    trial.set_user_attr(TrialKey.CHECKPOINTS_WRITTEN, clock["writes"])
    if outcome["stopped"] == "diverged":
        trial.set_user_attr(TrialKey.VERDICT, "the final training diverged (loss NaN/inf)")
        return {"diverged": True}
    if best_state is not None:
        model.load_state_dict(best_state)
    return _test_and_store(
        ctx, trial, model, best, outcome["epochs"], outcome["stopped"], lr, wd, world, per_rank
    )


def _test_and_store(
    ctx: Context,
    trial: optuna.Trial,
    model: torch.nn.Module,
    best: dict[str, Any],
    epochs_run: int,
    stopped: str,
    lr: float,
    wd: float,
    world: int,
    per_rank: int,
) -> dict[str, Any]:
    """The best epoch's weights (loaded in ``model``) on the test split; the verdict, the
    model and its first-layer filters stored on the final trial."""
    spec = ctx.spec
    test_loss, test_acc = evaluate(model, ctx.data, "test", spec.loss)
    val_acc = float(best["val_acc"])
    saved = spec.final.epochs - epochs_run
    trial.set_user_attr(TrialKey.TEST_ACCURACY, test_acc)
    trial.set_user_attr(TrialKey.TEST_LOSS, test_loss)
    trial.set_user_attr(TrialKey.VAL_ACCURACY, val_acc)
    trial.set_user_attr(TrialKey.BEST_EPOCH, best["epoch"])
    trial.set_user_attr(TrialKey.EPOCHS_SAVED, saved)
    trial.set_user_attr(TrialKey.STOPPED, stopped or "budget")
    if world > 1:
        trial.set_user_attr(
            TrialKey.BATCH, {"global": per_rank * world, "per_rank": per_rank, "ranks": world}
        )
    # Test accuracy first: the number the run is for; validation chose the epoch.
    # Short (the dashboard lays each attr out on one line); why it stopped is in the
    # `stopped`, `epochs_run` and `epochs_saved` attrs beside it.
    stop = f" (plateau after {spec.final.patience})" if saved > 0 else ""
    trial.set_user_attr(
        TrialKey.VERDICT,
        (
            f"test accuracy {test_acc:.3f} (loss {test_loss:.3f}), val {val_acc:.3f}; best epoch "
            f"{best['epoch']} of {epochs_run}{stop}, lr {lr:.3g}, weight_decay {wd:.3g}"
            + (f"; {world} processes" if world > 1 else "")
        ),
    )
    save_model(ctx, trial, model)
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        upload_filters(ctx.storage, trial, model)  # diagnostics: first-layer filters PNG
    return {"diverged": False, "val_acc": val_acc}
