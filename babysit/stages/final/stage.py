"""The final stage: train with the chosen parameters for the long budget, keep the best
epoch's weights, evaluate them on the test split, store the model.

Resumable: a checkpoint (babysit/stages/final/checkpoint.py) is written by the rule of
``final.checkpoint_share``, and a rerun or another worker goes on from it. One process or
``--final-procs`` ranks of DistributedDataParallel (babysit/stages/final/launch.py) run
:func:`train_final`; only rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from babysit.errors import ProtocolError
from babysit.parallel.coordination import fixed_trial
from babysit.parallel.coordination import holders
from babysit.schema import Param
from babysit.schema import Stage
from babysit.schema import TrialKey
from babysit.schema import best_of
from babysit.stages.context import Context
from babysit.stages.context import StageResult
from babysit.stages.context import trial_knobs
from babysit.stages.final.checkpoint import delete_checkpoint
from babysit.stages.final.checkpoint import load_checkpoint
from babysit.stages.final.train import train_final
from babysit.stages.search import draw
from babysit.stages.study import open_stage

# ---------------------------------------------------------------------------- final


def best_params(ctx: Context) -> dict[str, Any]:
    # The best trial of coarse and fine together, by validation accuracy (a fine trial
    # first on a tie: it trained longer). A fine stage that did worse than coarse does not
    # hand the final its worse parameters.
    bests = [
        best_of(open_stage(ctx, stage).get_trials(deepcopy=False))
        for stage in (Stage.FINE, Stage.COARSE)
    ]
    found = [b for b in bests if b is not None]
    if found:
        return max(found, key=lambda b: b["value"])["params"]
    raise ProtocolError(
        "final cannot start: neither the fine nor the coarse search has a "
        "complete trial to take lr and weight_decay from (every trial "
        "diverged, was pruned or failed); lower the upper end of coarse.lr or "
        "give the searches more epochs, and rerun under a new --name"
    )


def final(
    ctx: Context,
    progress: Callable[[int, int], None] | None = None,
    params: dict[str, Any] | None = None,
    launch: Callable[..., dict[str, Any]] | None = None,
) -> StageResult:
    """Train with the best parameters for the long budget, then evaluate on the test split.

    ``params`` ({"lr", "weight_decay"}) skips the searches' choice: `babysit ablate`'s
    mode "final" trains each variant with fixed parameters, as the ablation lab did.
    ``ctx.final_procs`` > 1 trains on that many processes through ``launch``
    (babysit.stages.final.launch.launch_final, passed in by the caller: the launcher imports this
    module to run each rank, so this module does not import it back)."""
    study = open_stage(ctx, Stage.FINAL)
    params = params if params is not None else best_params(ctx)

    def objective(trial: optuna.Trial) -> float:
        # Every searched value as a fixed param of the final trial (one value each).
        fixed = {k: [params[k]] if k in Param.CHOICE else [params[k]] * 2 for k in params}
        drawn = draw(trial, fixed)
        lr, wd = drawn[Param.LR], drawn[Param.WEIGHT_DECAY]
        knobs = trial_knobs(drawn)
        if ctx.final_procs > 1:
            if launch is None:
                raise ProtocolError(
                    f"final.procs {ctx.final_procs} needs a launcher: call "
                    "final() with launch=babysit.stages.final.launch.launch_final"
                )
            result = launch(ctx, study, trial, lr, wd, knobs)
        else:
            ckpt = load_checkpoint(ctx, study)
            if ckpt is not None:
                ctx.log(f"final: resuming from the checkpoint of epoch {int(ckpt['epoch'])}")
            result = train_final(ctx, study, trial, lr, wd, ckpt, progress, knobs=knobs)
        if result["diverged"]:
            raise ProtocolError(
                "the final training diverged: loss NaN/inf with the chosen "
                f"lr {lr:.3g}; rerun the fine search or lower fine's range"
            )
        return result["val_acc"]

    # A worker (not the run's owner) that finds the final held by another process stops.
    trial = fixed_trial(study, Stage.FINAL, {}, objective, wait=ctx.owner)
    if trial is None:
        holder = holders(study)
        return StageResult(
            Stage.FINAL,
            "skipped",
            f"final training is held by {', '.join(holder) or 'another worker'}",
            {"held_by": holder},
        )
    if trial.state != TrialState.COMPLETE:
        return StageResult(
            Stage.FINAL, "failed", trial.user_attrs.get(TrialKey.VERDICT, "final failed"), {}
        )
    # Only the model is kept of a passed final: its resumable checkpoint goes (here, and
    # on a rerun that finds it left by a process killed in between).
    delete_checkpoint(ctx, study)
    a = trial.user_attrs
    return StageResult(
        Stage.FINAL,
        "passed",
        a["verdict"],
        {
            "params": params,
            "epochs": a.get("epochs_run"),
            "best_epoch": a.get("best_epoch"),
            "epochs_saved": a.get("epochs_saved"),
            "val_accuracy": a.get("val_accuracy"),
            "test_accuracy": a.get("test_accuracy"),
            "test_loss": a.get("test_loss"),
            "model_path": a.get(TrialKey.MODEL_PATH),
        },
    )
