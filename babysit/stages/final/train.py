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

import optuna
import torch

from babysit.memory import release
from babysit.record.artifacts import store_trial_data
from babysit.record.stored import narrowing_warnings
from babysit.report.publish import upload_filters
from babysit.schema import Param
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
from babysit.terminal import shown_params
from babysit.training.diagnostics import Monitor
from babysit.training.diagnostics import record_diagnostics
from babysit.training.step import EpochStats
from babysit.training.step import evaluate
from babysit.training.step import fit
from babysit.training.step import make_optimizer


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


class _Epochs:
    """What the final carries from epoch to epoch, and what it does after each one.

    The curves and the best epoch so far (``carried``), the checkpoint clock (the rule of
    ``checkpoint_due``) and how the training ended. :meth:`observe` takes an epoch's
    numbers and says whether to stop; it records them on the trial and writes a checkpoint
    when one is due. Every rank holds one and takes the same decisions (rank 0's numbers);
    only rank 0 (``trial`` not None) writes.
    """

    def __init__(
        self,
        ctx: Context,
        study: optuna.Study | None,
        trial: optuna.Trial | None,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        gen: torch.Generator,
        augment: torch.Generator | None,
        carried: _Carried,
        world: int,
        ckpt: dict[str, Any] | None,
    ) -> None:
        self.ctx, self.study, self.trial = ctx, study, trial
        self.model, self.opt, self.gen, self.augment = model, opt, gen, augment
        self.world = world
        self.start = carried.start
        self.curves = carried.curves
        self.best = carried.best
        self.best_state = carried.best_state  # None: the current weights are best
        self.since = time.perf_counter()  # at the last checkpoint write (or the start)
        self.write: float | None = None  # seconds the last write took; None before one
        self.writes = 0
        self.stopped = ""  # "", "diverged" or "plateau"
        self.epochs = carried.start
        self.diag: dict[str, Any] = {}  # diagnostics and readings, artifacts at the end
        self.monitor: Monitor | None = None
        self.edge: list[str] = []
        if trial is not None:
            if ckpt is not None:
                trial.set_user_attr(TrialKey.RESUMED_FROM_EPOCH, carried.start)
            trial.set_user_attr(TrialKey.FINAL_PROCS, world)
            self.monitor = Monitor(model)  # diagnostics
            self.edge = narrowing_warnings(ctx.storage, ctx.spec.name)  # diagnostics

    def observe(self, stats: EpochStats) -> bool:
        """One epoch's numbers: the curves, the best epoch, the trial's attrs, a checkpoint
        when due. True when the training stops here (divergence or a plateau)."""
        spec = self.ctx.spec
        stats = _synced_stats(stats, self.world)
        for k in self.curves:
            self.curves[k].append(getattr(stats, k))
        self.epochs = stats.epoch
        best = self.best
        diverged = not (math.isfinite(stats.train_loss) and math.isfinite(stats.val_loss))
        if not diverged and (
            stats.val_acc > best["val_acc"]
            or (stats.val_acc == best["val_acc"] and stats.val_loss < best["val_loss"])
        ):
            best.update(epoch=stats.epoch, val_acc=stats.val_acc, val_loss=stats.val_loss)
            self.best_state = None
        plateau = spec.final.patience > 0 and stats.epoch - best["epoch"] >= spec.final.patience
        last = diverged or plateau or stats.epoch >= spec.final.epochs
        if self._record(stats, diverged, last):
            self._checkpoint(stats.epoch)
        if self.best_state is None and not last:
            self.best_state = copy_weights(self.model)
        if diverged or plateau:
            self.stopped = "diverged" if diverged else "plateau"
            return True
        return False

    def _record(self, stats: EpochStats, diverged: bool, last: bool) -> bool:
        """Rank 0 writes the epoch on the trial; whether a checkpoint is due, as rank 0
        says (no checkpoint of diverged weights: a rerun would resume into NaN)."""
        due = 0.0
        trial = self.trial
        if trial is not None:
            assert self.monitor is not None
            ctx = self.ctx
            self.diag.update(
                record_diagnostics(
                    self.monitor, self.curves, epoch=stats.epoch, warnings=self.edge
                )
            )
            trial.set_user_attr(TrialKey.EPOCHS_RUN, stats.epoch)
            trial.set_user_attr(TrialKey.BEST_EPOCH, self.best["epoch"])
            trial.set_user_attr(
                TrialKey.EXAMPLES, (stats.epoch - self.start) * ctx.data.train_size
            )
            trial.report(stats.val_acc, stats.epoch)
            due = float(
                not diverged
                and checkpoint_due(
                    stats.epoch,
                    last,
                    time.perf_counter() - self.since,
                    self.write,
                    ctx.spec.final.checkpoint_share,
                )
            )
        if self.world > 1:
            from babysit.stages.final.ddp import from_rank0

            due = from_rank0([due])[0]
        return bool(due)

    def _checkpoint(self, epoch: int) -> None:
        """Every rank's random streams to rank 0, which writes the checkpoint."""
        rng = {
            "torch_rng": torch.get_rng_state(),
            "augment": self.augment.get_state() if self.augment is not None else None,
        }
        ranks = None
        if self.world > 1:
            from babysit.stages.final.ddp import gather_to_rank0

            ranks = gather_to_rank0(rng)
        if self.trial is None:
            return
        assert self.study is not None, "rank 0 has both"
        w0 = time.perf_counter()
        save_checkpoint(
            self.ctx,
            self.study,
            self.trial,
            {
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "generator": self.gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "ranks": ranks,
                "epoch": epoch,
                "curves": self.curves,
                "best": dict(self.best),
                "best_model": self.best_state,
            },
            epoch,
        )
        self.write = time.perf_counter() - w0
        self.since = time.perf_counter()
        self.writes += 1

    def budget(self) -> int:
        """The epochs to train to: the spec's, or none left when a run was killed after
        the plateau stop's checkpoint."""
        patience = self.ctx.spec.final.patience
        if patience > 0 and self.start - self.best["epoch"] >= patience:
            return self.start
        return self.ctx.spec.final.epochs

    def store(self, t0: float) -> None:
        """Rank 0, after the last epoch: curves, diagnostics, counts and the seconds since
        ``t0`` on the trial. The optimiser's state and the gradients go first: the test and
        the model's upload need the weights only (Adam's state of the digits AlexNet is
        186 MB, its gradients 93 MB, all resident while the model is written)."""
        self.opt.state.clear()
        self.model.zero_grad(set_to_none=True)
        release()
        trial, ctx = self.trial, self.ctx
        assert trial is not None and self.monitor is not None
        self.diag.update(record_diagnostics(self.monitor, self.curves, warnings=self.edge))
        store_trial_data(ctx.storage, trial, **{TrialKey.CURVES: self.curves}, **self.diag)
        trial.set_user_attr(TrialKey.SECONDS, time.perf_counter() - t0)
        trial.set_user_attr(TrialKey.EXAMPLES, (self.epochs - self.start) * ctx.data.train_size)
        trial.set_user_attr(TrialKey.CHECKPOINTS_WRITTEN, self.writes)


def _setup(
    ctx: Context, lr: float, wd: float, rank: int, world: int, dropout: float | None = None
) -> tuple[
    torch.nn.Module,
    torch.nn.Module,
    torch.optim.Optimizer,
    torch.Generator,
    torch.Generator | None,
]:
    """(model, the network trained: the model or DDP around it, optimiser, the permutation's
    generator, a rank's own augmentation generator or None) for the final's seed."""
    spec = ctx.spec
    seed = seed_for(spec, Stage.FINAL, 0)
    model = fresh_model(ctx, seed, dropout)
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
    return model, net, opt, gen, augment


def _fit_options(
    spec: Any, knobs: dict[str, Any], rank: int, world: int, augment: torch.Generator | None
) -> dict[str, Any]:
    """fit's options for the final: the schedule (the searched one, or the spec's), and a
    rank's shard and augmentation stream under data parallel."""
    options: dict[str, Any] = {"schedule": knobs.get(Param.SCHEDULE, spec.schedule)}
    if world > 1:
        options.update(shard=(rank, world), augment_generator=augment)
    return options


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
    knobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The final training of one process, or of one rank of ``world`` (DistributedDataParallel
    over an initialised process group; babysit/stages/final/launch.py launches it).

    Only rank 0 has ``study`` and ``trial`` and writes anything: curves, checkpoints, the
    model. Every rank starts from ``ckpt`` when resuming. Returns rank 0's results.
    """
    spec = ctx.spec
    main = rank == 0
    knobs = knobs or {}  # the searched dropout and schedule (stages.context.trial_knobs)
    model, net, opt, gen, augment = _setup(ctx, lr, wd, rank, world, knobs.get(Param.DROPOUT))
    if ckpt is not None:
        _restore(ckpt, model, opt, gen, augment, rank, world)
    carried = _carried(ckpt, model, spec.final.epochs)
    assert trial is not None or not main, "rank 0 records on the final trial"
    state = _Epochs(
        ctx, study, trial if main else None, model, opt, gen, augment, carried, world, ckpt
    )
    per_rank = max(1, ctx.batch_size // world)
    t0 = time.perf_counter()

    def on_epoch(stats: EpochStats) -> None:
        stop = state.observe(stats)
        if progress is not None:
            progress(stats.epoch, spec.final.epochs)
        if stop:
            raise _StopFinal

    kwargs = _fit_options(spec, knobs, rank, world, augment)
    if progress is not None:
        progress(state.start, spec.final.epochs)  # the display starts at a resumed epoch
    monitor = state.monitor
    history = None
    try:
        history = fit(
            net,
            opt,
            ctx.data,
            epochs=state.budget(),
            batch_size=per_rank,
            loss=spec.loss,
            generator=gen,
            start_epoch=state.start,
            diverge_above=None,
            # Ranks must leave together: a step-level NaN stop on one rank would
            # leave the others waiting in the next gradient all-reduce, so data
            # parallel training checks divergence at the end of each epoch.
            stop_on_divergence=world == 1,
            check_every=ctx.check_every,
            on_epoch=on_epoch,
            monitor=(lambda s, _m, o, v: monitor(s, model, o, v)) if monitor is not None else None,
            **kwargs,
        )
    except _StopFinal:
        pass
    if history is not None and history.stopped == "diverged":
        state.stopped = "diverged"
    if not main:
        return {}
    assert trial is not None
    state.store(t0)
    if state.stopped == "diverged":
        trial.set_user_attr(TrialKey.VERDICT, "the final training diverged (loss NaN/inf)")
        return {"diverged": True}
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    return _test_and_store(
        ctx, trial, model, state.best, state.epochs, state.stopped, lr, wd, world, per_rank, knobs
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
    knobs: dict[str, Any],
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
    # The epoch named is the one whose weights were tested (the best on validation).
    stop = f" (plateau after {spec.final.patience})" if saved > 0 else ""
    trial.set_user_attr(
        TrialKey.VERDICT,
        (
            f"test accuracy {test_acc:.3f} at epoch {best['epoch']} of {epochs_run}{stop} "
            f"(loss {test_loss:.3f}), val {val_acc:.3f}; "
            + shown_params({Param.LR: lr, Param.WEIGHT_DECAY: wd, **knobs})
            + (f"; {world} processes" if world > 1 else "")
        ),
    )
    results = {
        "params": {Param.LR: lr, Param.WEIGHT_DECAY: wd},
        "best_epoch": best["epoch"],
        "epochs_run": epochs_run,
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "batch_size": per_rank * world,  # the global batch, never 0 (auto)
    }
    save_model(ctx, trial, model, results)
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        upload_filters(ctx.storage, trial, model)  # diagnostics: first-layer filters PNG
    return {"diverged": False, "val_acc": val_acc}
