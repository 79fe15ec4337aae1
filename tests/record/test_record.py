"""babysit.record: the schema of what a run stores, and the readers built on it.

Fast tests build studies with Optuna directly (an old run lacking today's keys, a run
with a trial still RUNNING); one slow test reads a TINY run stored by today's code.
"""

from __future__ import annotations

import datetime
import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from optuna.trial import create_trial

from babysit import schema
from babysit.errors import UsageError
from babysit.record import stored
from babysit.record.artifacts import oversized_attrs
from babysit.record.artifacts import spec_artifact
from babysit.record.artifacts import store_spec
from babysit.record.artifacts import store_trial_data
from babysit.record.artifacts import study_spec
from babysit.record.artifacts import trial_curves
from babysit.record.artifacts import trial_data
from babysit.report.export import curves_frame
from babysit.report.export import trials_frame
from babysit.report.status import status_lines
from babysit.report.status import statuses
from babysit.schema import Param
from babysit.schema import StudyAttrs
from babysit.schema import StudyKey
from babysit.schema import TrialAttrs
from babysit.schema import TrialKey
from babysit.spec import Spec
from babysit.storage import open_storage
from tests.conftest import TINY
from tests.conftest import babysit
from tests.conftest import cli_env

T0 = datetime.datetime(2026, 1, 1, 12, 0, 0)


def _constants(cls: type) -> set[str]:
    return {v for k, v in vars(cls).items() if k.isupper()}


def test_key_constants_are_the_dataclass_fields() -> None:
    assert _constants(StudyKey) == set(StudyAttrs.keys())
    assert _constants(TrialKey) == set(TrialAttrs.keys())
    names = {v for v in _constants(Param) if isinstance(v, str)}
    assert names == {"lr", "weight_decay", "dropout", "schedule"} == set(Param.ALL)
    # Each searched name has one scale: log-uniform, uniform or a choice.
    assert sorted(Param.LOG + Param.LINEAR + Param.CHOICE) == sorted(Param.ALL)


def test_trial_attrs_round_trip_and_unknown_keys_are_kept() -> None:
    stored = {
        "reason": "diverged",
        "examples": 256,
        "curves": {"val_acc": [0.1, 0.2]},
        "batch": {"global": 64, "per_rank": 32},
        "some_future_key": [1, 2],
    }
    attrs = TrialAttrs.from_attrs(stored)
    assert attrs.reason == schema.Reason.DIVERGED and attrs.examples == 256
    assert attrs.extra == {"some_future_key": [1, 2]}
    assert attrs.to_attrs() == stored
    again = TrialAttrs(worker="host:1", seconds=1.5, readings=["LR too high"])
    assert TrialAttrs.from_attrs(again.to_attrs()) == again
    assert again.to_attrs() == {"worker": "host:1", "seconds": 1.5, "readings": ["LR too high"]}


def test_study_attrs_round_trip_and_missing_keys_read_as_none() -> None:
    attrs = StudyAttrs(spec={"dataset": "digits"}, train_size=10, narrowed={"ranges": {}})
    assert StudyAttrs.from_attrs(attrs.to_attrs()) == attrs
    old = StudyAttrs.from_attrs({"spec": {"dataset": "digits"}})
    assert old.verdict is None and old.published is None and old.extra == {}
    assert StudyAttrs.from_attrs(None) == StudyAttrs()


def _trial(
    number: int,
    state: TrialState,
    value: float | None,
    start: float,
    end: float | None,
    **attrs: object,
) -> optuna.trial.FrozenTrial:
    t = create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        params={"lr": 0.01 * (number + 1), "weight_decay": 1e-4},
        distributions={
            "lr": FloatDistribution(1e-5, 1.0, log=True),
            "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
        },
        user_attrs=attrs,
    )
    t.number = number
    t.datetime_start = T0 + datetime.timedelta(seconds=start)
    t.datetime_complete = None if end is None else T0 + datetime.timedelta(seconds=end)
    return t


def test_counts_best_and_timing() -> None:
    trials = [
        _trial(0, TrialState.COMPLETE, 0.5, 0, 10, examples=100),
        _trial(1, TrialState.COMPLETE, 0.7, 2, 12, examples=100),
        _trial(2, TrialState.COMPLETE, 0.7, 3, 20, examples=100),
        _trial(3, TrialState.PRUNED, None, 4, 6, reason="diverged", examples=10),
        _trial(4, TrialState.FAIL, None, 5, 7, reason="surplus"),
        _trial(5, TrialState.RUNNING, None, 30, None, worker="host:7"),
        # Today's diverged trial: COMPLETE at a value given, never a result.
        _trial(6, TrialState.COMPLETE, 0.9, 8, 9, reason="diverged"),
    ]
    assert schema.counts(trials) == {
        "finished": 5,
        "complete": 3,
        "diverged": 2,
        "pruned": 0,
        "failed": 0,
        "running": 1,
    }
    assert [t.number for t in schema.scored(trials)] == [0, 1, 2]
    assert schema.best_trial(trials).number == 1  # the earlier of two equal values
    assert schema.best_of(trials)["params"]["lr"] == pytest.approx(0.02)
    assert schema.examples(trials) == 310
    busy, wall = schema.timing(trials, now=T0 + datetime.timedelta(seconds=40))
    assert wall == pytest.approx(40.0)
    assert busy == pytest.approx(10 + 10 + 17 + 2 + 2 + 10 + 1)


def _old_run(url: str) -> None:
    """A run as an older babysit left it: no data facts, no published notes, no worker
    attrs, and a coarse trial still RUNNING on a worker."""
    spec = Spec()
    spec.name = "old"
    for stage in ("sanity", "overfit", "coarse"):
        study = optuna.create_study(
            study_name=f"old/{stage}",
            storage=url,
            direction="minimize" if stage == "sanity" else "maximize",
        )
        study.set_user_attr(StudyKey.SPEC, spec.to_dict())
        if stage == "sanity":
            study.add_trial(
                _trial(
                    0,
                    TrialState.COMPLETE,
                    2.3,
                    0,
                    1,
                    status="passed",
                    initial_loss=2.3,
                    expected_loss=2.302,
                    loss_with_reg=2.4,
                    verdict="fine",
                )
            )
        elif stage == "overfit":
            study.add_trial(
                _trial(
                    0,
                    TrialState.COMPLETE,
                    1.0,
                    2,
                    5,
                    examples=600,
                    curve=[{"step": 5, "loss": 2.0, "train_acc": 0.5}],
                )
            )
        else:
            study.add_trial(
                _trial(
                    0,
                    TrialState.COMPLETE,
                    0.4,
                    10,
                    20,
                    examples=50,
                    curves={"val_acc": [0.3, 0.4]},
                )
            )
            study.add_trial(_trial(1, TrialState.RUNNING, None, 15, None, worker="box:42"))


def test_an_old_run_reads_back_with_what_it_has(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    _old_run(url)
    storage = open_storage(url, tmp_path / "art", create=False)
    s = stored.summary(storage, "old")
    assert s["num_classes"] is None and s["data"] is None and s["wall_seconds"] is None
    assert s["stages"]["sanity"]["status"] == "passed"
    assert s["stages"]["sanity"]["logit_std"] is None  # not stored by older runs
    assert s["stages"]["overfit"]["status"] == "passed"
    coarse = s["stages"]["coarse"]
    assert (coarse["status"], coarse["trials"], coarse["target"]) == (
        "running",
        1,
        Spec().coarse.trials,
    )
    assert coarse["range"] == {"lr": Spec().coarse.lr, "weight_decay": Spec().coarse.weight_decay}
    assert s["stages"]["final"]["status"] == "skipped"
    # Without train_size the epochs are counted in examples over 1, as before.
    assert s["epochs_spent"] == 650

    [status] = statuses(storage, "old")
    progress = status["progress"]["stages"]
    assert progress["coarse"]["running"] == [{"trial": 1, "worker": "box:42"}]
    assert progress["overfit"]["wall_seconds"] == pytest.approx(3.0)
    assert progress["sanity"]["finished"] == progress["sanity"]["target"] == 1
    assert status["wall_seconds"] > 1.0 + 3.0  # the running trial's time counts up to now
    lines = status_lines(status)
    assert lines[0].startswith("run old ") and lines[0].endswith("in stages)")
    assert [line.split()[:2] for line in lines[1:]] == [
        ["sanity", "passed"],
        ["overfit", "passed"],
        ["coarse", "running"],
        ["fine", "skipped"],
        ["final", "skipped"],
    ]
    assert "1 of 1 trials" in lines[1] and "3.0 s" in lines[2]
    # Overfit is a stage of tries (it stops at the first LR that memorises), not a target.
    assert " 1 of up to 4 LRs tried; best train accuracy 100% at lr " in lines[2]
    assert "running: #1 on box:42" in lines[3]


def test_an_old_runs_curves_and_spec_read_from_its_attrs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    _old_run(url)
    storage = open_storage(url, tmp_path / "art", create=False)
    coarse = stored.load_stage(storage, "old", "coarse").trials[0]
    assert trial_curves(storage, coarse) == {"val_acc": [0.3, 0.4]}
    overfit = stored.load_stage(storage, "old", "overfit").trials[0]
    assert trial_data(storage, overfit).curve == [{"step": 5, "loss": 2.0, "train_acc": 0.5}]
    assert stored.stored_spec(storage, "old").name == "old"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_curves_and_spec_are_artifacts_named_by_small_attrs(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'new.db'}", tmp_path / "art")
    spec = Spec()
    spec.name = "new"
    study = optuna.create_study(study_name="new/coarse", storage=storage.rdb, direction="maximize")
    store_spec(storage, spec, study)
    first = study.user_attrs[StudyKey.SPEC_ARTIFACT]
    assert study.user_attrs[StudyKey.SPEC_SUMMARY]["name"] == "new"
    other = optuna.create_study(study_name="new/fine", storage=storage.rdb)
    assert spec_artifact(storage, spec, other) == first  # one per run
    other.set_user_attr(StudyKey.SPEC_ARTIFACT, first)  # named, without the system copy
    trial = study.ask()
    curves = {"val_acc": [0.1 * i for i in range(300)], "train_loss": [float("nan")] * 300}
    readings = [f"reading {i}: " + "x" * 80 for i in range(30)]
    store_trial_data(storage, trial, curves=curves, readings=readings)
    store_trial_data(storage, trial, diagnostics=[{"epoch": 1}])  # added to the rest
    study.tell(trial, 0.5)
    [t] = study.get_trials()
    assert oversized_attrs(t.user_attrs) == {} and oversized_attrs(study.user_attrs) == {}
    assert schema.trial_attrs(t).curves is None and len(t.user_attrs["data"]) == 36
    data = trial_data(storage, t)
    assert data.readings == readings and data.curves["val_acc"] == curves["val_acc"]
    assert data.diagnostics == [{"epoch": 1}]
    assert all(math.isnan(v) for v in data.curves["train_loss"])
    assert stored.stored_spec(storage, "new").to_dict() == Spec.from_dict(spec.to_dict()).to_dict()
    # Over the limit as an attr: what the artifacts avoid.
    assert oversized_attrs({"curves": curves}) == {"curves": len(json.dumps(curves))}
    # A store without the file (a copy made without its artifacts) reads as absent.
    for path in (tmp_path / "art").iterdir():
        path.unlink()
    assert trial_data(storage, t).curves is None
    # The spec reads from the study's system attr there (status and export need no store);
    # a study naming only the artifact says where it looked.
    assert stored.stored_spec(storage, "new").name == "new"
    with pytest.raises(UsageError, match="not in the artifact store"):
        study_spec(storage, other)


def test_old_run_exports_with_one_column_per_meaning(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    _old_run(url)
    storage = open_storage(url, tmp_path / "art", create=False)
    frame = trials_frame(storage, "old")
    assert "value" not in frame.columns
    by_stage = frame.set_index("stage")
    assert by_stage.loc["sanity", "initial_loss"] == pytest.approx(2.3)
    assert by_stage.loc["overfit", "train_accuracy"] == pytest.approx(1.0)
    assert str(frame["examples"].dtype) == "Int64" and str(frame["trial"].dtype) == "Int64"
    assert "curves" not in frame.columns and "curve" not in frame.columns
    curves = curves_frame(storage, "old")
    overfit = curves[curves["stage"] == "overfit"]
    assert set(overfit["metric"]) == {"loss", "train_acc"} and list(overfit["step"]) == [5, 5]
    coarse = curves[(curves["stage"] == "coarse") & (curves["metric"] == "val_acc")]
    assert list(coarse["epoch"]) == [1, 2] and list(coarse["value"]) == [0.3, 0.4]


@pytest.mark.parametrize(
    "module",
    [
        "babysit.cli",
        "babysit.schema",
        "babysit.record.stored",
        "babysit.report.status",
        "babysit.report.export",
    ],
)
def test_reading_modules_do_not_import_torch(module: str) -> None:
    heavy = ("torch", "matplotlib", "pandas", "optuna.visualization")
    code = (
        f"import {module}, sys; loaded = [m for m in {heavy!r} if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_a_run_stored_today_reads_back_through_record(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    babysit(
        "run",
        "--name",
        "today",
        "--storage",
        url,
        *TINY,
        "--summary-json",
        str(tmp_path / "s.json"),
        cwd=tmp_path,
        check=True,
    )
    written = json.loads((tmp_path / "s.json").read_text())
    storage = open_storage(url, None, create=False)
    read = stored.summary(storage, "today")
    assert written["wall_seconds"] > 0 and read["wall_seconds"] is None
    assert {**written, "wall_seconds": None} == read  # the summary's shape is a contract
    stages = stored.load_run(storage, "today")
    metric = {"sanity": "initial_loss", "overfit": "train_accuracy"}
    for rec in stages.values():
        for t in rec.trials:  # every stored key is one schema.py knows, none over 1 kB
            assert schema.trial_attrs(t).extra == {}, (rec.stage, t.user_attrs.keys())
            assert oversized_attrs(t.user_attrs) == {}, (rec.stage, t.number)
        assert rec.attrs.extra == {}, (rec.stage, rec.study.user_attrs.keys())
        assert rec.attrs.to_attrs() == rec.study.user_attrs
        assert oversized_attrs(rec.study.user_attrs) == {}, rec.stage
        assert rec.study.metric_names == [metric.get(rec.stage, "val_accuracy")]
        assert rec.attrs.spec is None and rec.attrs.spec_summary["name"] == "today"
    # One spec artifact for the run, named by every stage study.
    assert len({rec.attrs.spec_artifact for rec in stages.values()}) == 1
    searched = [t for t in stages["coarse"].trials if t.state == TrialState.COMPLETE]
    assert all(
        set(trial_curves(storage, t)) == {"train_loss", "train_acc", "val_loss", "val_acc"}
        for t in searched
    )
    assert trial_data(storage, stages["overfit"].trials[0]).curve

    status = json.loads(
        babysit(
            "status", "--name", "today", "--storage", url, "--json", cwd=tmp_path, check=True
        ).stdout
    )
    assert status["stages"] == written["stages"]
    assert 0 < status["wall_seconds"] <= written["wall_seconds"]
    for stage, p in status["progress"]["stages"].items():
        assert p["wall_seconds"] > 0 and p["running"] == [], stage
        assert p["finished"] >= 1
    assert status["progress"]["stages"]["coarse"]["finished"] == 4

    csv, pq = tmp_path / "t.csv", tmp_path / "t.parquet"
    for fmt, out in (("csv", csv), ("parquet", pq)):
        babysit(
            "export",
            "--name",
            "today",
            "--storage",
            url,
            "--format",
            fmt,
            "--out",
            str(out),
            "--curves",
            cwd=tmp_path,
            check=True,
        )
    back = pd.read_csv(csv, dtype_backend="numpy_nullable")
    typed = pd.read_parquet(pq)
    for frame in (back, typed):
        for col in ("trial", "examples", "epochs_run", "steps", "best_epoch"):
            assert pd.api.types.is_integer_dtype(frame[col]), (col, frame[col].dtype)
        for col in ("val_accuracy", "initial_loss", "train_accuracy", "seconds", "lr"):
            assert pd.api.types.is_float_dtype(frame[col]), (col, frame[col].dtype)
    final = typed[typed["stage"] == "final"].iloc[0]
    assert final["val_accuracy"] == pytest.approx(written["stages"]["final"]["val_accuracy"])
    curves = pd.read_parquet(tmp_path / "t-curves.parquet")
    assert list(curves.columns) == ["run", "stage", "trial", "epoch", "step", "metric", "value"]
    assert pd.api.types.is_integer_dtype(curves["epoch"])
    kept = trial_curves(storage, stages["final"].complete[0])["val_acc"]
    got = curves[(curves["stage"] == "final") & (curves["metric"] == "val_acc")]
    assert list(got["value"]) == pytest.approx(kept)
    assert len(pd.read_csv(tmp_path / "t-curves.csv")) == len(curves)


def test_each_trial_has_one_outcome_and_every_count_says_it_the_same_way() -> None:
    trials = [
        _trial(0, TrialState.COMPLETE, 0.8, 0, 1),
        _trial(1, TrialState.PRUNED, None, 1, 2),
        # Diverged: stored COMPLETE at chance today, PRUNED by an older babysit.
        _trial(2, TrialState.COMPLETE, 0.1, 2, 3, reason="diverged"),
        _trial(3, TrialState.PRUNED, None, 3, 4, reason="diverged"),
        _trial(4, TrialState.FAIL, None, 4, 5, reason="interrupted"),
        _trial(5, TrialState.FAIL, None, 5, 6, reason="surplus"),
        _trial(6, TrialState.RUNNING, None, 6, None),
    ]
    assert [schema.outcome(t) for t in trials] == [
        "complete",
        "pruned",
        "diverged",
        "diverged",
        "failed",
        None,
        "running",
    ]
    n = schema.counts(trials)
    assert n == {
        "finished": 4,
        "complete": 1,
        "diverged": 2,
        "pruned": 1,
        "failed": 1,
        "running": 1,
    }
    assert schema.counts_text(n) == "1 complete, 2 diverged, 1 pruned, 1 failed"
