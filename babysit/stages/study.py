"""A stage's study: opened (created once, with the run's spec, name and stage on it,
and its objective's name for the dashboard), checked against the spec a run name
was first stored with, and a rerun's line for each trial a Ctrl-C stopped.

Apart from babysit/parallel/, which works on an ``optuna.Study`` alone and knows no
Context and no Spec.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING
from typing import Any
from typing import Literal

import optuna

from babysit.errors import UsageError
from babysit.parallel.interrupts import interrupted_last
from babysit.schema import STAGES
from babysit.schema import Stage
from babysit.schema import StudyAttrs
from babysit.schema import StudyKey
from babysit.schema import study_name
from babysit.spec import Spec
from babysit.spec import check_run_name
from babysit.storage import Storage

if TYPE_CHECKING:
    from babysit.stages.context import Context


def open_stage(
    ctx: Context,
    stage: str,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    direction: Literal["minimize", "maximize"] = "maximize",
) -> optuna.Study:
    study = optuna.create_study(
        study_name=study_name(ctx.spec.name, stage),
        storage=ctx.storage.rdb,
        sampler=sampler,
        pruner=pruner,
        direction=direction,
        load_if_exists=True,
    )
    attrs = StudyAttrs.from_attrs(study.user_attrs)
    if attrs.spec is None and attrs.spec_artifact is None:
        from babysit.record.artifacts import store_spec

        # Not the whole spec as an attr: it filled the dashboard's study page.
        store_spec(ctx.storage, ctx.spec, study)
        study.set_user_attr(StudyKey.RUN, ctx.spec.name)
        study.set_user_attr(StudyKey.STAGE, stage)
    if study.metric_names is None:
        with warnings.catch_warnings():  # experimental in Optuna, and the interface we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRICS[stage]])
    if ctx.owner:
        say_interrupted(ctx, study, stage)
    return study


# What each stage's objective is, as the dashboard names it ("Objective 0" otherwise).
METRICS = {
    Stage.SANITY: "initial_loss",
    Stage.OVERFIT: "train_accuracy",
    Stage.COARSE: "val_accuracy",
    Stage.FINE: "val_accuracy",
    Stage.FINAL: "val_accuracy",
}


def check_spec(storage: Storage, spec: Spec) -> None:
    """A run name reused with a different spec is an input error; nothing is written."""
    # Names composed by babysit itself (ablations' <ablation>/<variant>) are checked here.
    check_run_name(spec.name, composed=True)
    for stage in STAGES:
        try:
            study = optuna.load_study(study_name=study_name(spec.name, stage), storage=storage.rdb)
        except KeyError:
            continue
        from babysit.record.artifacts import study_spec

        stored = study_spec(storage, study)
        if stored is None:
            continue
        mine = spec.identity()
        theirs = Spec.from_dict(stored).identity()
        if mine != theirs:
            diff = _diff_keys(theirs, mine)
            raise UsageError(
                f"run '{spec.name}' already exists in this storage with a different spec "
                f"(differs in: {', '.join(diff[:6])}); use another --name, or the same settings"
            )


def _diff_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and key not in ("lrs",):
            out.extend(_diff_keys(va, vb, f"{prefix}{key}."))
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


# (storage URL, study name, trial number) of the interrupted trials this process has named.
_SAID: set[tuple[str, str, int]] = set()


def say_interrupted(ctx: Context, study: optuna.Study, stage: str) -> None:
    """A rerun's one line per trial the previous run's Ctrl-C stopped, said once: later
    trials replace it (a search draws a new one in its place; a single-trial stage runs
    its trial again, the final from its checkpoint)."""
    for t in interrupted_last(study.get_trials(deepcopy=False)):
        said = (ctx.storage.url, study.study_name, t.number)
        if said in _SAID:
            continue
        _SAID.add(said)
        again = (
            "a new trial takes its place"
            if stage in (Stage.COARSE, Stage.FINE)
            else "running it again"
        )
        ctx.log(f"{stage}: trial {t.number} was interrupted; {again}")
