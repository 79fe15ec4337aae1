"""The overfit stage: memorise a small subset with no regularisation; try a few LRs
before failing, with the reason for each in the verdict.
"""

from __future__ import annotations

import math
import time

import optuna
import torch
from optuna.trial import FrozenTrial

from babysit.parallel.coordination import fixed_trial
from babysit.record.artifacts import store_trial_data
from babysit.record.artifacts import trial_data
from babysit.schema import Param
from babysit.schema import Stage
from babysit.schema import StudyKey
from babysit.schema import TrialKey
from babysit.spec import overfit_lrs
from babysit.stages.context import Context
from babysit.stages.context import StageResult
from babysit.stages.context import fresh_model
from babysit.stages.context import seed_for
from babysit.stages.study import open_stage
from babysit.terminal import plural
from babysit.training.step import make_optimizer
from babysit.training.step import memorise


def overfit(ctx: Context) -> StageResult:
    """Memorise a small subset with no regularisation (weight decay 0, dropout off) and no
    augmentation; try a few LRs before failing."""
    spec = ctx.spec
    study = open_stage(ctx, Stage.OVERFIT)
    data = ctx.data
    n = min(spec.overfit.samples, data.train_size)
    x, y = data.head(n)
    lrs = overfit_lrs(spec) or []
    tried: list[FrozenTrial] = []
    for i, lr in enumerate(lrs):

        def objective(trial: optuna.Trial, lr: float = lr, i: int = i) -> float:
            trial.suggest_float(Param.LR, lr, lr, log=True)
            model = fresh_model(ctx, seed_for(spec, Stage.OVERFIT, i))
            # Dropout is regularisation too: switched off, like weight decay, for this check.
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
            opt = make_optimizer(spec.optimizer, model.parameters(), lr, 0.0, spec.momentum)
            t0 = time.perf_counter()
            acc, curve, steps = memorise(
                model, opt, x, y, data.pre, steps=spec.overfit.steps, loss=spec.loss
            )
            store_trial_data(ctx.storage, trial, **{TrialKey.CURVE: curve})
            trial.set_user_attr(TrialKey.STEPS, steps)
            trial.set_user_attr(TrialKey.SAMPLES, n)
            trial.set_user_attr(TrialKey.TRAIN_ACCURACY, acc)
            trial.set_user_attr(TrialKey.EXAMPLES, steps * n)
            trial.set_user_attr(TrialKey.SECONDS, time.perf_counter() - t0)
            return acc

        trial = fixed_trial(study, f"lr={lr:g}", {Param.LR: lr}, objective)
        tried.append(trial)
        if trial.value is not None and trial.value >= 1.0:
            verdict = (
                f"{n} examples memorised (100 % train accuracy) in "
                f"{plural(trial.user_attrs[TrialKey.STEPS], 'step')} at lr {lr:g} "
                f"({i + 1} of up to {len(lrs)} LRs tried)"
            )
            study.set_user_attr(StudyKey.VERDICT, verdict)
            return StageResult(
                Stage.OVERFIT,
                "passed",
                verdict,
                {"train_accuracy": 1.0, "lr": lr, "steps": trial.user_attrs[TrialKey.STEPS]},
            )
    verdict = _overfit_verdict(ctx, tried, n)
    study.set_user_attr(StudyKey.VERDICT, verdict)
    best = max((t.value or 0.0) for t in tried)
    return StageResult(Stage.OVERFIT, "failed", verdict, {"train_accuracy": best})


def _overfit_verdict(ctx: Context, trials: list[FrozenTrial], n: int) -> str:
    parts = []
    for t in trials:
        curve = trial_data(ctx.storage, t).curve or []
        lr = t.params.get(Param.LR)
        acc = t.value or 0.0
        losses = [c["loss"] for c in curve]
        if any(not math.isfinite(v) for v in losses):
            parts.append(f"lr {lr:g}: loss NaN, LR far too high")
        elif losses and abs(losses[-1] - losses[0]) < 0.01 * abs(losses[0]):
            parts.append(f"lr {lr:g}: loss flat at {losses[-1]:.3f}, LR too low")
        else:
            parts.append(f"lr {lr:g}: reached {acc:.0%}")
    return (
        f"could not memorise {n} examples (reg 0, no dropout, no augmentation): "
        + "; ".join(parts)
        + ". Check that the labels match the images and that the network has the capacity;"
        " or try other LRs with --set overfit.lrs"
    )
