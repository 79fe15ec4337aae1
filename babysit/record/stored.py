"""A stored run read back: its stages, its spec, the summary JSON and where it stands.

Built on babysit/schema.py (the schema) and babysit/record/artifacts.py (what is kept as JSON
artifacts); `babysit status`, `export`, `report`, `ablate`, the summary and the Python API
read a run through here. No torch, matplotlib or pandas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from babysit.record.artifacts import study_spec
from babysit.record.model_file import model_path
from babysit.record.runs import find_study
from babysit.record.runs import no_such_run
from babysit.schema import FINISHED
from babysit.schema import STAGES
from babysit.schema import Narrowed
from babysit.schema import Param
from babysit.schema import Stage
from babysit.schema import StudyAttrs
from babysit.schema import best_of
from babysit.schema import counts
from babysit.schema import examples
from babysit.schema import timing
from babysit.schema import trial_attrs
from babysit.spec import Spec
from babysit.spec import overfit_lrs
from babysit.storage import Storage

# ---------------------------------------------------------------------------- one stage


@dataclass
class StageRecord:
    """One stage as stored: its study (None when never opened), attrs and trials."""

    stage: str
    study: optuna.Study | None
    attrs: StudyAttrs
    trials: list[FrozenTrial]

    @property
    def finished(self) -> list[FrozenTrial]:
        return [t for t in self.trials if t.state in FINISHED]

    @property
    def complete(self) -> list[FrozenTrial]:
        return [t for t in self.trials if t.state == TrialState.COMPLETE]


def load_stage(storage: Storage, run: str, stage: str) -> StageRecord:
    """The stage's study read once; an empty record when the study does not exist."""
    study = find_study(storage, run, stage)
    if study is None:
        return StageRecord(stage, None, StudyAttrs(), [])
    return StageRecord(
        stage, study, StudyAttrs.from_attrs(study.user_attrs), study.get_trials(deepcopy=False)
    )


def load_run(storage: Storage, run: str) -> dict[str, StageRecord]:
    """Every stage of the run, in protocol order (absent stages as empty records)."""
    return {stage: load_stage(storage, run, stage) for stage in STAGES}


def stored_spec(storage: Storage, run: str) -> Spec:
    """The run's spec as its studies carry it, so a worker needs no flags."""
    for stage in STAGES:
        study = find_study(storage, run, stage)
        spec = study_spec(storage, study) if study is not None else None
        if spec is not None:
            return Spec.from_dict(spec)
    raise no_such_run(storage, run)


# ---------------------------------------------------------------------------- the summary


def stage_result(
    storage: Storage,
    run: str,
    stage: str,
    spec: Spec | None = None,
    rec: StageRecord | None = None,
) -> dict[str, Any]:
    """The summary's entry for one stage (its status, numbers and verdict)."""
    spec = spec or stored_spec(storage, run)
    rec = rec or load_stage(storage, run, stage)
    if stage == Stage.SANITY:
        return _sanity_entry(rec)
    if stage == Stage.OVERFIT:
        return _overfit_entry(rec, _target(spec, Stage.OVERFIT))
    if stage in (Stage.COARSE, Stage.FINE):
        return _search_entry(rec, stage, spec)
    return _final_entry(storage, rec)


def _sanity_entry(rec: StageRecord) -> dict[str, Any]:
    done = rec.finished
    if not done:
        return {"status": "skipped", "initial_loss": None, "expected_loss": None}
    a = trial_attrs(done[0])
    return {
        "status": a.status,
        "initial_loss": a.initial_loss,
        "expected_loss": a.expected_loss,
        "loss_with_reg": a.loss_with_reg,
        "verdict": a.verdict,
        "logit_std": a.logit_std,
        "top_class_share": a.top_class_share,
    }


def _overfit_entry(rec: StageRecord, tries: int) -> dict[str, Any]:
    attrs, done = rec.attrs, rec.finished
    if not done:
        return {"status": "skipped", "train_accuracy": None, "tried": 0, "lrs": tries}
    top = max(done, key=lambda t: t.value or 0.0)
    status = (
        "passed"
        if (top.value or 0.0) >= 1.0
        else ("failed" if attrs.verdict is not None else "running")
    )
    return {
        "status": status,
        "train_accuracy": top.value,
        "lr": top.params.get(Param.LR),
        # A stage of tries, not a target: the LRs tried of those it may try (it stops at
        # the first that memorises the subset).
        "tried": len(done),
        "lrs": tries,
        "verdict": attrs.verdict,
    }


def _search_entry(rec: StageRecord, stage: str, spec: Spec) -> dict[str, Any]:
    attrs = rec.attrs
    n = counts(rec.trials)
    # Under --budget the planned target stored on the study, else the spec's.
    target = attrs.target if attrs.target is not None else getattr(spec, stage).trials
    best = best_of(rec.trials)
    if not rec.trials:
        # A fine stage that narrowing refused to start carries that verdict.
        status = "failed" if attrs.verdict is not None else "skipped"
    elif n["finished"] >= target:
        status = "passed" if best is not None or attrs.recovery else "failed"
    else:
        status = "running"
    entry: dict[str, Any] = {
        "status": status,
        "trials": n["finished"],
        "complete": n["complete"],
        "pruned": n["pruned"],
        "failed": n["failed"],
        "diverged": n["diverged"],
        "target": target,
        "best": best,
    }
    # How the stage recovered, in words, when it did (docs/protocol.md, "When a stage goes
    # wrong"): fine's best coarse trial carried into the final, coarse's extra round
    # below where its first round diverged.
    extension = attrs.extension or {}
    entry["recovery"] = attrs.recovery if stage == Stage.FINE else extension.get("recovery")
    if stage == Stage.FINE:
        entry["range"] = Narrowed.from_attrs(attrs.narrowed).ranges if attrs.narrowed else None
        entry["narrowing"] = attrs.narrowed
    else:
        entry["range"] = attrs.ranges or {
            Param.LR: spec.coarse.lr,
            Param.WEIGHT_DECAY: spec.coarse.weight_decay,
        }
    return entry


def _final_entry(storage: Storage, rec: StageRecord) -> dict[str, Any]:
    complete = rec.complete
    if not complete:
        return {
            "status": "running" if rec.trials else "skipped",
            "params": None,
            "epochs": None,
            "val_accuracy": None,
            "test_accuracy": None,
            "test_loss": None,
            "model_path": None,
        }
    t = complete[0]
    a = trial_attrs(t)
    return {
        "status": "passed",
        "params": dict(t.params),
        "epochs": a.epochs_run,
        "val_accuracy": a.val_accuracy,
        "test_accuracy": a.test_accuracy,
        "test_loss": a.test_loss,
        "model_artifact": a.model_artifact,
        "model_path": model_path(storage, a.model_artifact, a.model_path),
        # The plateau stop: the epoch whose weights were tested, the epochs of the
        # budget not run, and why training ended.
        "best_epoch": a.best_epoch,
        "epochs_saved": a.epochs_saved,
        "stopped": a.stopped,
        "procs": 1 if a.final_procs is None else a.final_procs,
    }


def summary(
    storage: Storage, run: str, stages: dict[str, StageRecord] | None = None
) -> dict[str, Any]:
    """The summary JSON (docs/usage.md, "Commands"; docs/design.md), read from storage alone.

    ``wall_seconds`` is None here: the process that ran the protocol fills it in with its
    own clock; `babysit status` shows the time from the trials' stored times instead.
    """
    spec = stored_spec(storage, run)
    stages = stages or load_run(storage, run)
    sanity = stages[Stage.SANITY].attrs
    by_stage = {stage: float(examples(stages[stage].trials)) for stage in STAGES}
    by_stage[Stage.SANITY] = 0
    train_size = sanity.train_size or 1
    return {
        "name": run,
        "dataset": spec.dataset,
        "num_classes": sanity.num_classes,
        "model": spec.model.name,
        "optimizer": spec.optimizer,
        "storage": storage.shown,
        "wall_seconds": None,
        "epochs_spent": sum(by_stage.values()) / train_size,
        "epochs_by_stage": {k: by_stage[k] / train_size for k in STAGES},
        # How the data was loaded: "loader" (tensor or streaming), skipped_files, ...
        "data": sanity.data,
        "budget": budget_entry(stages),
        "stages": {
            stage: stage_result(storage, run, stage, spec, stages[stage]) for stage in STAGES
        },
    }


def budget_entry(stages: dict[str, StageRecord]) -> dict[str, Any] | None:
    """The run's --budget (None without one): what was given, the plan and its re-plans,
    the rule, and the wall time used from the budget's start to the last trial's end."""
    coarse = stages[Stage.COARSE].attrs
    stored = coarse.budget
    if stored is None:
        return None
    ends = [
        t.datetime_complete.timestamp()
        for rec in stages.values()
        for t in rec.trials
        if t.datetime_complete is not None
    ]
    used = max(ends) - float(stored["started"]) if ends and "started" in stored else None
    final = stages[Stage.FINAL].attrs
    return {
        "budget": stored.get("spec_budget"),
        "budget_s": stored.get("budget_s"),
        "epoch_s": stored.get("epoch_s"),
        "timings": stored.get("timings"),
        "plan": stored.get("plan"),
        "replans": stored.get("replans", {}),
        "final_epochs": final.epochs,
        "rule": coarse.budget_rule,
        "used_s": used,
    }


def _target(spec: Spec, stage: str, attrs: StudyAttrs | None = None) -> int:
    if attrs is not None and attrs.target is not None:
        return int(attrs.target)
    if stage in (Stage.COARSE, Stage.FINE):
        return int(getattr(spec, stage).trials)
    if stage == Stage.OVERFIT:
        return len(overfit_lrs(spec) or [])  # at most: it stops at a pass
    return 1


def progress(
    storage: Storage, run: str, stages: dict[str, StageRecord] | None = None
) -> dict[str, Any]:
    """Where the run is, for `babysit status`: per stage the trials finished of the
    target, the time spent (wall: first trial start to last end; busy: the trials'
    durations summed) and the RUNNING trials with the worker that holds each; in total the
    sum of the stages' wall times (the time between stages, a run left stopped, is not in it).
    """
    spec = stored_spec(storage, run)
    stages = stages or load_run(storage, run)
    out: dict[str, Any] = {}
    total = 0.0
    for stage, rec in stages.items():
        busy, wall = timing(rec.trials)
        total += wall or 0.0
        out[stage] = {
            "finished": counts(rec.trials)["finished"],
            "target": _target(spec, stage, rec.attrs),
            "wall_seconds": wall,
            "busy_seconds": busy,
            "running": [
                {"trial": t.number, "worker": trial_attrs(t).worker}
                for t in rec.trials
                if t.state == TrialState.RUNNING
            ],
        }
    return {"wall_seconds": total, "stages": out}


def narrowing_warnings(storage: Storage, run: str) -> list[str]:
    """The narrowing's edge warnings ("best lr ... sits at the upper edge of the coarse
    range ...: widen coarse.lr"), read without creating a study."""
    study = find_study(storage, run, Stage.FINE)
    stored = StudyAttrs.from_attrs(study.user_attrs).narrowed if study is not None else None
    return list(Narrowed.from_attrs(stored).warnings) if stored else []


def trial_readings(storage: Storage, run: str) -> dict[str, list[str]]:
    """Every stored reading of a run, by trial ("coarse #3"), for the report."""
    from babysit.record.artifacts import trial_data

    out: dict[str, list[str]] = {}
    for stage in (Stage.COARSE, Stage.FINE, Stage.FINAL):
        study = find_study(storage, run, stage)
        if study is None:
            continue
        for t in study.get_trials(deepcopy=False):
            found = trial_data(storage, t).readings
            if found:
                out[f"{stage} #{t.number}"] = list(found)
    warnings = narrowing_warnings(storage, run)
    if warnings:
        out["narrowing"] = warnings
    return out
