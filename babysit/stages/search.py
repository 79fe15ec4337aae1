"""The searches, coarse and fine: a search over lr and weight_decay (log-uniform), and
dropout and the LR schedule when the spec names them, that several
processes can fill at once, each trial trained for a few epochs and pruned (median or
successive halving) or stopped on divergence on the way, and the stage's verdict with its
counts and best trial. How the fine ranges are narrowed from coarse is in babysit/stages/narrow.py;
how trials are claimed and counted across processes in babysit/parallel/coordination.py.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from babysit.parallel.coordination import claim
from babysit.parallel.coordination import fill
from babysit.parallel.coordination import stage_counts
from babysit.record.artifacts import store_trial_data
from babysit.schema import Param
from babysit.schema import Reason
from babysit.schema import Stage
from babysit.schema import StudyAttrs
from babysit.schema import StudyKey
from babysit.schema import TrialKey
from babysit.schema import best_of
from babysit.schema import counts_text
from babysit.spec import SearchSpec
from babysit.stages.budget import stage_plan
from babysit.stages.context import Context
from babysit.stages.context import StageResult
from babysit.stages.context import fresh_model
from babysit.stages.context import generator_for
from babysit.stages.context import seed_for
from babysit.stages.divergence import DIVERGE_MARGIN
from babysit.stages.divergence import MOVE_AFTER
from babysit.stages.divergence import MOVE_DECADES
from babysit.stages.divergence import MOVE_RULE
from babysit.stages.divergence import moved_range
from babysit.stages.samplers import HALVING_FACTOR
from babysit.stages.samplers import HALVING_RULE
from babysit.stages.samplers import HALVING_STARTUP
from babysit.stages.samplers import pruner_for
from babysit.stages.samplers import sampler_for
from babysit.stages.study import open_stage
from babysit.terminal import plural
from babysit.terminal import shown_params
from babysit.training.diagnostics import Monitor
from babysit.training.diagnostics import record_diagnostics
from babysit.training.step import EpochStats
from babysit.training.step import History
from babysit.training.step import fit
from babysit.training.step import make_optimizer


def search(
    ctx: Context,
    stage: str,
    search_spec: SearchSpec,
    ranges: dict[str, list[float]],
    *,
    initial_loss: float,
    progress: Callable[[int, int, FrozenTrial | None], None] | None = None,
) -> StageResult:
    """Log-uniform search over lr and weight_decay until ``trials`` trials have finished.

    A trial whose loss passes ``search_spec.diverge_factor`` x ``initial_loss`` (the sanity
    stage's) is stopped as diverged.

    Several processes may run this on one study at once: each asks Optuna for a trial,
    and a trial whose number comes after the target count of live trials closes itself
    untrained, so the stage ends with exactly its target of finished trials.
    """
    probe = open_stage(ctx, stage)
    # Under a --budget the study holds the plan (babysit/stages/budget.py): its target and
    # epochs per trial, the same for every process that fills the stage.
    planned = stage_plan(StudyAttrs.from_attrs(probe.user_attrs))
    if planned is not None:
        search_spec = dataclasses.replace(search_spec, trials=planned[0], epochs=planned[1])
    # The sampler's seed counts the trials already there: a rerun draws new points.
    seed = seed_for(ctx.spec, stage, len(probe.get_trials(deepcopy=False)))
    study = open_stage(
        ctx, stage, sampler=sampler_for(search_spec, seed), pruner=pruner_for(search_spec)
    )
    _describe_search(study, search_spec, ranges)

    def objective(trial: optuna.Trial) -> float:
        claim(study, trial, search_spec.trials, stage)
        drawn = _moved(ctx, study, ranges) if stage == Stage.COARSE else ranges
        return _search_trial(ctx, trial, stage, search_spec, drawn, initial_loss)

    fill(study, search_spec.trials, objective, progress)
    result = _search_result(ctx, stage, study.get_trials(deepcopy=False), ranges)
    up = StudyAttrs.from_attrs(study.user_attrs).time_up
    if up is not None:
        result.values["time_up"] = up
        result.verdict += (
            f"; {up['trials']} of the {up['planned']} planned trials ran: the stage's "
            f"time under --budget was up ({up['why']})"
        )
    return result


def _moved(
    ctx: Context, study: optuna.Study, ranges: dict[str, list[float]]
) -> dict[str, list[float]]:
    """The ranges this coarse trial draws from: ``ranges``, or below where the trials so far
    diverged when none of them trained (babysit/stages/divergence.py, MOVE_RULE). A move is
    stored on the study (``moved``) and widens its ``ranges``, which narrowing clips to."""
    attrs = StudyAttrs.from_attrs(study.user_attrs)
    before = attrs.moved if attrs.moved and attrs.moved["from"] == ranges[Param.LR] else None
    moved = moved_range(study.get_trials(deepcopy=False), ranges)
    if moved is None:
        # Once moved, the rest of the stage stays where trials trained.
        return ranges if before is None else {**ranges, Param.LR: before["range"]}
    if before is None or before["range"] != moved[Param.LR]:
        study.set_user_attr(
            StudyKey.MOVED,
            {
                "from": ranges[Param.LR],
                "range": moved[Param.LR],
                "rule": MOVE_RULE.format(
                    after=MOVE_AFTER,
                    decades=f"{MOVE_DECADES:g}",
                    margin=f"{10**-DIVERGE_MARGIN:.2g}",
                ),
            },
        )
        stored = attrs.ranges or ranges
        lo, hi = stored[Param.LR]
        study.set_user_attr(
            StudyKey.RANGES, {**stored, Param.LR: [min(lo, moved[Param.LR][0]), hi]}
        )
        ctx.log(
            f"coarse: every trial so far diverged; new trials draw lr from "
            f"[{moved[Param.LR][0]:.3g}, {moved[Param.LR][1]:.3g}], below where they did"
        )
    return moved


def _describe_search(
    study: optuna.Study, search_spec: SearchSpec, ranges: dict[str, list[float]]
) -> None:
    """The ranges, sampler and pruner, stored once on the study for the report."""
    if StudyKey.RANGES in study.user_attrs:
        return
    study.set_user_attr(StudyKey.RANGES, ranges)
    study.set_user_attr(StudyKey.PRUNER, search_spec.pruner)
    study.set_user_attr(StudyKey.SAMPLER, search_spec.sampler)
    if search_spec.pruner == "halving":
        study.set_user_attr(
            StudyKey.PRUNER_RULE,
            HALVING_RULE.format(
                startup=HALVING_STARTUP, factor=HALVING_FACTOR, factor2=HALVING_FACTOR**2
            ),
        )


def _search_trial(
    ctx: Context,
    trial: optuna.Trial,
    stage: str,
    search_spec: SearchSpec,
    ranges: dict[str, list[float]],
    initial: float,
) -> float:
    """One search trial: draw lr, weight_decay and any other searched knob (dropout, the
    schedule), train ``search_spec.epochs`` epochs (pruned or stopped on divergence on the
    way), return the last val accuracy."""
    spec = ctx.spec
    drawn = draw(trial, ranges)
    lr, wd = drawn[Param.LR], drawn[Param.WEIGHT_DECAY]
    seed = seed_for(spec, stage, trial.number)
    model = fresh_model(ctx, seed, drawn.get(Param.DROPOUT))
    opt = make_optimizer(spec.optimizer, model.parameters(), lr, wd, spec.momentum)
    curves: dict[str, list[float]] = {
        k: [] for k in ("train_loss", "train_acc", "val_loss", "val_acc")
    }
    t0 = time.perf_counter()
    monitor = Monitor(model)  # diagnostics
    diag: dict[str, Any] = {}

    def on_epoch(stats: EpochStats) -> None:
        for k in curves:
            curves[k].append(getattr(stats, k))
        diag.update(record_diagnostics(monitor, curves, epoch=stats.epoch))  # diagnostics
        trial.set_user_attr(TrialKey.EPOCHS_RUN, stats.epoch)
        trial.set_user_attr(TrialKey.EXAMPLES, stats.epoch * ctx.data.train_size)
        trial.report(stats.val_acc, stats.epoch)
        # A trial that has run all its epochs is complete whatever the pruner says:
        # pruning it would save nothing and hide its result from narrowing.
        if stats.epoch < search_spec.epochs and trial.should_prune():
            store_trial_data(ctx.storage, trial, **{TrialKey.CURVES: curves}, **diag)
            trial.set_user_attr(TrialKey.REASON, Reason.PRUNED)
            trial.set_user_attr(
                TrialKey.VERDICT,
                (
                    f"pruned after epoch {stats.epoch}: val accuracy {stats.val_acc:.3f} "
                    + (
                        f"not in the top 1/{HALVING_FACTOR} of the trials that reached that "
                        "epoch (successive halving)"
                        if search_spec.pruner == "halving"
                        else "below the median of earlier trials at that epoch"
                    )
                ),
            )
            trial.set_user_attr(TrialKey.SECONDS, time.perf_counter() - t0)
            raise optuna.TrialPruned()

    history = fit(
        model,
        opt,
        ctx.data,
        epochs=search_spec.epochs,
        batch_size=ctx.batch_size,
        loss=spec.loss,
        generator=generator_for(ctx, seed),
        diverge_above=search_spec.diverge_factor * initial,
        stop_on_divergence=search_spec.diverge_factor > 0,
        check_every=ctx.check_every,
        on_epoch=on_epoch,
        monitor=monitor,
        schedule=drawn.get(Param.SCHEDULE, spec.schedule),
    )
    diag.update(record_diagnostics(monitor, curves))  # a diverged trial's last epoch
    store_trial_data(ctx.storage, trial, **{TrialKey.CURVES: curves}, **diag)
    trial.set_user_attr(TrialKey.SECONDS, time.perf_counter() - t0)
    trial.set_user_attr(TrialKey.EXAMPLES, history.examples)
    trial.set_user_attr(TrialKey.STEPS, history.steps)
    return _ended(ctx, trial, search_spec, history, initial, curves)


def draw(trial: optuna.Trial, ranges: dict[str, list[Any]]) -> dict[str, Any]:
    """One value of every searched dimension in ``ranges``: lr and weight_decay
    log-uniform, dropout uniform, the schedule one of its choices (Param's scales)."""
    drawn: dict[str, Any] = {}
    for name in Param.ALL:
        if name not in ranges:
            continue
        if name in Param.CHOICE:
            drawn[name] = trial.suggest_categorical(name, list(ranges[name]))
        else:
            drawn[name] = trial.suggest_float(name, *ranges[name], log=name in Param.LOG)
    return drawn


def _ended(
    ctx: Context,
    trial: optuna.Trial,
    search_spec: SearchSpec,
    history: History,
    initial: float,
    curves: dict[str, list[float]],
) -> float:
    """How a trained search trial ended, in words on the trial (diverged, lr too low, or
    its val accuracy), and the value it returns."""
    if history.stopped == "diverged":
        trial.set_user_attr(TrialKey.REASON, Reason.DIVERGED)
        trial.set_user_attr(TrialKey.DIVERGED_AT_STEP, history.stopped_at_step)
        trial.set_user_attr(
            TrialKey.VERDICT,
            (
                f"diverged at step {history.stopped_at_step}: loss {history.last_loss:.3g} "
                f"(NaN/inf or above {search_spec.diverge_factor:g}x the initial "
                f"{initial:.2f}); LR too high"
            ),
        )
        return _diverged_value(trial, ctx.data.num_classes, len(curves["val_acc"]) + 1)
    first, last = history.first_loss, history.last_loss
    if first and last is not None and abs(first - last) < search_spec.flat_tolerance * first:
        trial.set_user_attr(TrialKey.REASON, Reason.LR_TOO_LOW)
        trial.set_user_attr(
            TrialKey.VERDICT,
            (
                f"lr too low: the train loss moved {abs(first - last) / first:.1%} "
                f"({first:.3f} -> {last:.3f}) in {plural(history.steps, 'step')}"
            ),
        )
    else:
        trial.set_user_attr(
            TrialKey.VERDICT,
            (
                f"val accuracy {history.epochs[-1].val_acc:.3f} after "
                f"{plural(len(history.epochs), 'epoch')} (train {history.epochs[-1].train_acc:.3f})"
            ),
        )
    return history.epochs[-1].val_acc


def _diverged_value(trial: optuna.Trial, num_classes: int, step: int) -> float:
    """A diverged trial ends COMPLETE at chance, 1/C (reported at its last epoch too). Not
    PRUNED: with no value, optuna-dashboard leaves it out of history and intermediate plots,
    and its contour pairs COMPLETE values with all trials' params by position
    (GraphContour.tsx), painting the diverged region best. TPE ranks chance among the worst
    (as a valueless pruned trial); exact-N counts it finished either way; no pruner is asked.
    schema.scored/outcome know it by its reason: never best, counted "diverged"."""
    chance = 1.0 / max(1, num_classes)
    trial.report(chance, step)
    return chance


def _search_result(
    ctx: Context, stage: str, trials: list[FrozenTrial], ranges: dict[str, list[float]]
) -> StageResult:
    """The stage's counts, best trial and verdict; a fine stage worse than coarse says so."""
    counts = stage_counts(trials)
    best = best_of(trials)
    values: dict[str, Any] = {**counts, "best": best, "range": ranges}
    values["examples"] = sum(int(t.user_attrs.get(TrialKey.EXAMPLES, 0)) for t in trials)
    if best is None:
        verdict = (
            f"{stage}: none of {plural(counts['trials'], 'trial')} completed "
            f"({counts_text(counts)})"
        )
        coarse_best = (
            best_of(open_stage(ctx, Stage.COARSE).get_trials(deepcopy=False))
            if stage == Stage.FINE
            else None
        )
        if coarse_best is None:
            return StageResult(
                stage, "failed", f"{verdict}: lower the upper end of the lr range", values
            )
        # A careful person keeps a good coarse result when the fine round went badly.
        recovery = (
            f"recovered: the final takes the best coarse trial {coarse_best['number']} "
            f"(val accuracy {coarse_best['value']:.3f} at {shown_params(coarse_best['params'])})"
        )
        study = open_stage(ctx, stage)
        if study.user_attrs.get(StudyKey.RECOVERY) != recovery:
            study.set_user_attr(StudyKey.RECOVERY, recovery)
        values["recovery"] = recovery
        return StageResult(stage, "recovered", f"{verdict}; {recovery}", values)
    verdict = (
        f"{stage}: {plural(counts['trials'], 'trial')} ({counts_text(counts)}); best val accuracy "
        f"{best['value']:.3f} at {shown_params(best['params'])}"
    )
    if stage == Stage.FINE:
        coarse_best = best_of(open_stage(ctx, Stage.COARSE).get_trials(deepcopy=False))
        if coarse_best is not None and coarse_best["value"] > best["value"]:
            values["worse_than_coarse"] = coarse_best
            verdict += (
                f"; worse than the coarse stage's best {coarse_best['value']:.3f} "
                f"(trial {coarse_best['number']}), so the final takes that trial's "
                "parameters"
            )
    return StageResult(stage, "passed", verdict, values)
