"""`--budget` in the protocol: what an epoch costs, measured before the first trial (a
budget that cannot fit the least protocol is an input error then, before anything is
stored), the plan made before the coarse and fine stages and the final's epochs set when
it starts, each from the time really left. The rule and the planner are in
babysit/stages/budget.py.
"""

from __future__ import annotations

import dataclasses
import math
import time

from babysit.errors import UsageError
from babysit.record.runs import find_study
from babysit.schema import Stage
from babysit.schema import StudyAttrs
from babysit.schema import StudyKey
from babysit.spec.rules import parse_duration
from babysit.stages.budget import OVERFIT_EXPECTED
from babysit.stages.budget import Budget
from babysit.stages.budget import Shape
from babysit.stages.budget import Timings
from babysit.stages.budget import at_least
from babysit.stages.budget import budget_rule
from babysit.stages.budget import measured_epoch
from babysit.stages.budget import minimum_seconds
from babysit.stages.budget import minimum_words
from babysit.stages.budget import plan
from babysit.stages.budget import plan_words
from babysit.stages.budget import shown
from babysit.stages.budget import workers_of
from babysit.stages.context import Context
from babysit.stages.context import fresh_model
from babysit.stages.context import generator_for
from babysit.stages.study import open_stage
from babysit.terminal import plural
from babysit.training.step import evaluate
from babysit.training.step import make_optimizer
from babysit.training.step import time_steps

# Measured before the first trial: this many steps untimed (the first allocations, oneDNN's
# kernel choice, cuDNN's benchmark), then the mean of the next ones.
WARM_STEPS = 3
TIMED_STEPS = 5


def measure(ctx: Context) -> Timings:
    """What the stages cost on this data and machine: a fresh network and its optimiser,
    WARM_STEPS + TIMED_STEPS training steps at the run's batch size, a validation pass,
    and a few full-batch steps on the overfit stage's subset. Nothing is stored."""
    spec = ctx.spec
    model = fresh_model(ctx, spec.seed)
    lr = spec.overfit.lrs[spec.optimizer][0]
    opt = make_optimizer(spec.optimizer, model.parameters(), lr, 0.0, spec.momentum)
    gen = generator_for(ctx, spec.seed)
    step_s = time_steps(
        model,
        opt,
        ctx.data,
        batch_size=ctx.batch_size,
        loss=spec.loss,
        generator=gen,
        warm=WARM_STEPS,
        timed=TIMED_STEPS,
    )
    t1 = time.perf_counter()
    evaluate(model, ctx.data, "val", spec.loss)
    val_s = time.perf_counter() - t1
    small_s = time_steps(
        model,
        opt,
        ctx.data,
        batch_size=max(ctx.batch_size, spec.overfit.samples),
        loss=spec.loss,
        generator=gen,
        warm=1,
        timed=3,
        limit=spec.overfit.samples,
    )
    # A trial's network and optimiser, timed once the first build's one-time costs are paid.
    t2 = time.perf_counter()
    del opt, model
    model = fresh_model(ctx, spec.seed + 1)
    make_optimizer(spec.optimizer, model.parameters(), lr, 0.0, spec.momentum)
    build_s = time.perf_counter() - t2
    steps = math.ceil(ctx.data.train_size / ctx.batch_size)
    val_size = max(1, ctx.data.size("val"))
    return Timings(
        epoch_s=steps * step_s + val_s,
        trial_s=build_s,
        sanity_s=2 * val_s + build_s,
        # Accuracy on the subset every 5 steps: about a tenth more than the steps alone.
        overfit_s=1.1 * OVERFIT_EXPECTED * spec.overfit.steps * small_s + build_s,
        test_s=val_s * ctx.data.size("test") / val_size,
    )


def start_budget(ctx: Context, started: float) -> Budget | None:
    """The run's budget, measured and checked against the least protocol; None without
    --budget or in a worker (which follows the plan stored on each study). A budget that
    cannot fit the least protocol is a UsageError (exit 2) before anything is stored."""
    if not ctx.spec.budget or not ctx.owner:
        return None
    seconds = parse_duration(ctx.spec.budget)
    timings = measure(ctx)
    spent = time.time() - started
    need = minimum_seconds(timings) + spent
    if need > seconds:
        raise UsageError(
            f"--budget {ctx.spec.budget} cannot fit the minimum protocol (about "
            f"{need:.0f} s on this machine: loading and measuring {spent:.1f} s, "
            f"{minimum_words(timings)}); give at least {at_least(need)}"
        )
    return Budget(seconds=seconds, started=started, timings=timings)


def _shape(ctx: Context) -> Shape:
    spec = ctx.spec
    return Shape(
        coarse_trials=spec.coarse.trials,
        coarse_epochs=spec.coarse.epochs,
        coarse_pruner=spec.coarse.pruner,
        fine_trials=spec.fine.trials,
        fine_epochs=spec.fine.epochs,
        fine_pruner=spec.fine.pruner,
        final_epochs=spec.final.epochs,
    )


def _timings_now(ctx: Context, budget: Budget) -> tuple[Timings, int]:
    """The measured timings with the epoch's cost taken from the searches' finished trials
    once there are some, and how many processes ran the last search."""
    trials = []
    procs = 1
    for stage in (Stage.COARSE, Stage.FINE):
        study = find_study(ctx.storage, ctx.spec.name, stage)  # none created here
        done = study.get_trials(deepcopy=False) if study is not None else []
        if done:
            trials.extend(done)
            procs = workers_of(done)
    epoch_s = measured_epoch(trials, budget.timings)
    if epoch_s is None:
        return budget.timings, procs
    return dataclasses.replace(budget.timings, epoch_s=epoch_s), procs


def before_search(ctx: Context, stage: str, jobs: int = 1) -> None:
    """Plan ``stage`` (coarse or fine) and the stages after it in the time left, and store
    the stage's target, epochs per trial, deadline and a trial's most cost on its study.
    A stage whose verdict is stored is done and keeps what it had."""
    budget = ctx.budget
    if budget is None:
        return
    study = open_stage(ctx, stage)
    attrs = StudyAttrs.from_attrs(study.user_attrs)
    if attrs.verdict is not None:
        return
    timings, procs = _timings_now(ctx, budget)
    procs = max(jobs, procs) if stage == Stage.FINE else jobs
    left = budget.left()
    stages = (stage, Stage.FINE, Stage.FINAL) if stage == Stage.COARSE else (stage, Stage.FINAL)
    made = plan(left, timings, _shape(ctx), stages, procs)
    mine = made[stage]
    study.set_user_attr(StudyKey.TARGET, mine["trials"])
    study.set_user_attr(StudyKey.EPOCHS, mine["epochs"])
    study.set_user_attr(StudyKey.DEADLINE, time.time() + mine["seconds"])
    study.set_user_attr(StudyKey.TRIAL_COST, mine["epochs"] * timings.epoch_s + timings.trial_s)
    if attrs.time_up is not None:
        study.set_user_attr(StudyKey.TIME_UP, None)  # a resumed run's new plan
    _store(ctx, budget, stage, made, timings, left)
    ctx.log(
        f"budget: {shown(budget.end() - time.time())} left of {ctx.spec.budget}; "
        f"epoch {timings.epoch_s:.2f} s; plan {plan_words(made)}"
    )


def final_epochs(ctx: Context) -> Context:
    """The context the final runs with: under a budget its epochs are what the time left
    pays for (at least 1), at most what the plan gave it; stored on the final study."""
    budget = ctx.budget
    study = open_stage(ctx, Stage.FINAL)
    attrs = StudyAttrs.from_attrs(study.user_attrs)
    if budget is None:
        # A worker (or a run resumed without --budget) keeps the final's stored plan.
        epochs = attrs.epochs or _planned_final(ctx)
        if epochs is None:
            return ctx
    elif attrs.epochs is not None and attrs.verdict is not None:
        epochs = int(attrs.epochs)
    else:
        timings, _ = _timings_now(ctx, budget)
        # A final epoch may also write a checkpoint, at most final.checkpoint_share of it.
        share = 1 + ctx.spec.final.checkpoint_share
        timings = dataclasses.replace(timings, epoch_s=timings.epoch_s * share)
        left = budget.left()
        made = plan(left, timings, _shape(ctx), (Stage.FINAL,))
        planned = budget.plan.get(Stage.FINAL, made[Stage.FINAL])["epochs"]
        epochs = max(1, min(planned, made[Stage.FINAL]["epochs"]))
        made[Stage.FINAL]["epochs"] = epochs
        study.set_user_attr(StudyKey.EPOCHS, epochs)
        _store(ctx, budget, Stage.FINAL, made, timings, left)
        ctx.log(
            f"budget: {shown(budget.end() - time.time())} left of {ctx.spec.budget}; "
            f"final {plural(epochs, 'epoch')} of {timings.epoch_s:.2f} s"
        )
    spec = dataclasses.replace(ctx.spec, final=dataclasses.replace(ctx.spec.final, epochs=epochs))
    spec.explicit_keys = ctx.spec.explicit_keys
    return dataclasses.replace(ctx, spec=spec)


def _planned_final(ctx: Context) -> int | None:
    """The final's epochs in the run's last stored plan, if it has a budget."""
    coarse = find_study(ctx.storage, ctx.spec.name, Stage.COARSE)
    stored = StudyAttrs.from_attrs(coarse.user_attrs).budget if coarse is not None else None
    if not stored:
        return None
    plans = [stored.get("plan") or {}, *(stored.get("replans") or {}).values()]
    finals = [p[Stage.FINAL]["epochs"] for p in plans if Stage.FINAL in p]
    return int(finals[-1]) if finals else None


def _store(
    ctx: Context,
    budget: Budget,
    stage: str,
    made: dict[str, dict[str, object]],
    timings: Timings,
    left: float,
) -> None:
    """The plan made before ``stage``, on the coarse study's ``budget``: the first as
    ``plan``, every later one under ``replans``."""
    coarse = open_stage(ctx, Stage.COARSE)
    stored = StudyAttrs.from_attrs(coarse.user_attrs).budget
    if stored is None or not budget.plan:
        budget.plan = dict(made)
        record = budget.record()
        record["replans"] = {}
    else:
        record = dict(stored)
        record["replans"] = {
            **stored.get("replans", {}),
            stage: {"left_s": round(left, 1), "epoch_s": round(timings.epoch_s, 3), **made},
        }
        budget.plan.update(made)
    record["spec_budget"] = ctx.spec.budget
    coarse.set_user_attr(StudyKey.BUDGET, record)
    if coarse.user_attrs.get(StudyKey.BUDGET_RULE) != budget_rule():
        coarse.set_user_attr(StudyKey.BUDGET_RULE, budget_rule())
