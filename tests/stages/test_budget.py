"""--budget's pure parts: the duration parser, the planner by BUDGET_RULE with made-up
timings, and the stage target that shrinks when a stage's time is up (a real SQLite study)."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from babysit.errors import UsageError
from babysit.parallel.coordination import claim
from babysit.parallel.coordination import fill
from babysit.parallel.coordination import quiet_optuna
from babysit.schema import FINISHED
from babysit.schema import Stage
from babysit.schema import StudyKey
from babysit.spec import build_spec
from babysit.spec.rules import parse_duration
from babysit.stages.budget import MAX_TRIALS_FACTOR
from babysit.stages.budget import Shape
from babysit.stages.budget import Timings
from babysit.stages.budget import at_least
from babysit.stages.budget import expected_epochs
from babysit.stages.budget import minimum_seconds
from babysit.stages.budget import plan
from babysit.storage import open_storage

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")

T = Timings(epoch_s=2.0, trial_s=0.5, sanity_s=1.0, overfit_s=10.0, test_s=0.5)
SHAPE = Shape(
    coarse_trials=12,
    coarse_epochs=3,
    coarse_pruner="halving",
    fine_trials=8,
    fine_epochs=4,
    fine_pruner="median",
    final_epochs=20,
)
ALL = (Stage.COARSE, Stage.FINE, Stage.FINAL)


@pytest.mark.parametrize(
    "text, seconds",
    [("10m", 600), ("1h30m", 5400), ("90s", 90), ("600", 600), ("1h", 3600), ("2m30s", 150)],
)
def test_durations_read_as_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "10x", "1m1h", "-5m", "0s", "200h", "1 m"])
def test_a_bad_duration_is_one_line_that_shows_the_forms(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_duration(text)
    assert "10m, 1h30m, 90s or 600" in str(err.value) and "\n" not in str(err.value)


def test_the_budget_is_a_spec_field_but_not_part_of_the_runs_identity() -> None:
    a = build_spec(flags={"budget": "10m"})
    b = build_spec(flags={"budget": "1h"})
    assert a.budget == "10m" and a.identity() == b.identity() == build_spec().identity()
    with pytest.raises(UsageError, match="budget = '10 minutes' is not allowed"):
        build_spec(sets=["budget='10 minutes'"])


def test_halving_counts_a_coarse_trial_at_the_epochs_it_runs_on_average() -> None:
    # Past the startup trials, every trial runs epoch 1 and a third go on to epoch 3.
    assert expected_epochs(3, "halving", 5) == 3
    assert expected_epochs(3, "halving", 1000) == pytest.approx(1 + 2 / 3, abs=0.01)
    assert expected_epochs(9, "halving", 10**6) == pytest.approx(1 + 2 / 3 + 6 / 9, abs=0.01)
    assert expected_epochs(4, "median", 100) == 4  # median: planned on the worst case


def _cost(p: dict, stage: str, shape: Shape = SHAPE) -> float:
    pruner = shape.coarse_pruner if stage == Stage.COARSE else shape.fine_pruner
    n, e = p[stage]["trials"], p[stage]["epochs"]
    return n * (expected_epochs(e, pruner, n) * T.epoch_s + T.trial_s)


def test_a_plan_fits_its_time_and_shares_it_by_the_rule() -> None:
    left = 300.0
    p = plan(left, T, SHAPE, ALL)
    final = p[Stage.FINAL]["epochs"]
    # The final's 40 % (120 s) pays for 59 epochs: capped at final.epochs, the rest to the
    # searches, which share it 35:25 and keep their spec's epochs per trial.
    assert final == 20
    final_s = final * T.epoch_s + T.trial_s + T.test_s
    assert p[Stage.COARSE]["epochs"] == 3 and p[Stage.FINE]["epochs"] == 4
    assert _cost(p, Stage.COARSE) <= (left - final_s) * 35 / 60
    assert _cost(p, Stage.FINE) <= (left - final_s) * 25 / 60
    # ... and one more trial would not fit.
    more = {**p, Stage.FINE: {**p[Stage.FINE], "trials": p[Stage.FINE]["trials"] + 1}}
    assert _cost(more, Stage.FINE) > (left - final_s) * 25 / 60
    assert _cost(p, Stage.COARSE) + _cost(p, Stage.FINE) + final_s <= left


def test_a_short_budget_lowers_epochs_per_trial_before_the_least_trial_counts() -> None:
    p = plan(40.0, T, SHAPE, ALL)
    assert p[Stage.COARSE]["trials"] >= 4 and p[Stage.FINE]["trials"] >= 2
    assert p[Stage.FINE]["epochs"] < 4 and p[Stage.FINAL]["epochs"] >= 1


def test_a_long_budget_plans_at_most_four_times_the_specs_trials_of_final_epochs() -> None:
    p = plan(10**6, T, SHAPE, ALL)
    assert p[Stage.COARSE]["trials"] == MAX_TRIALS_FACTOR * 12
    assert p[Stage.FINE]["trials"] == MAX_TRIALS_FACTOR * 8
    assert p[Stage.COARSE]["epochs"] == p[Stage.FINE]["epochs"] == SHAPE.final_epochs


def test_a_search_at_its_most_trials_runs_longer_trials_in_the_time_over() -> None:
    left = 600.0
    p = plan(left, T, SHAPE, ALL)
    final_s = p[Stage.FINAL]["epochs"] * T.epoch_s + T.trial_s + T.test_s
    share = (left - final_s) * 35 / 60
    # 48 coarse trials of 3 epochs cost 184 s of the coarse share's 326 s: the time over
    # pays for longer trials, as many epochs as still fit, never past the share.
    assert p[Stage.COARSE]["trials"] == MAX_TRIALS_FACTOR * 12
    assert 3 < p[Stage.COARSE]["epochs"] < SHAPE.final_epochs
    assert _cost(p, Stage.COARSE) <= share
    longer = {Stage.COARSE: {**p[Stage.COARSE], "epochs": p[Stage.COARSE]["epochs"] + 1}}
    assert _cost(longer, Stage.COARSE) > share
    # The fine stage's share did not reach its most trials: it keeps its spec's epochs.
    assert p[Stage.FINE]["trials"] < MAX_TRIALS_FACTOR * 8 and p[Stage.FINE]["epochs"] == 4


def test_workers_share_a_stage_so_it_plans_more_trials() -> None:
    one = plan(100.0, T, SHAPE, (Stage.FINE, Stage.FINAL))
    three = plan(100.0, T, SHAPE, (Stage.FINE, Stage.FINAL), procs=3)
    assert three[Stage.FINE]["trials"] > 2 * one[Stage.FINE]["trials"]


def test_the_final_alone_gets_what_is_left_at_most_its_epochs() -> None:
    assert plan(21.0, T, SHAPE, (Stage.FINAL,))[Stage.FINAL]["epochs"] == 10
    assert plan(1.0, T, SHAPE, (Stage.FINAL,))[Stage.FINAL]["epochs"] == 1


def test_the_minimum_is_the_least_protocol_with_its_reserve() -> None:
    trained = 1.0 + 10.0 + 0.5 + 7 * 2.5
    assert minimum_seconds(T) == pytest.approx(trained / 0.95)
    assert at_least(31) == "40s" and at_least(61) == "2m"


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    rdb = open_storage(f"sqlite:///{tmp_path / 'b.db'}").rdb
    return optuna.create_study(study_name="run/coarse", storage=rdb)


def test_a_stage_whose_time_is_up_ends_with_the_trials_it_has(study: optuna.Study) -> None:
    """The stored target is the one every process reads; once a trial cannot end before the
    stage's deadline, the target shrinks to the trials before it and the stage ends there."""
    quiet_optuna()
    study.set_user_attr(StudyKey.TARGET, 6)
    study.set_user_attr(StudyKey.TRIAL_COST, 0.5)
    study.set_user_attr(StudyKey.DEADLINE, time.time() + 3600)
    ran: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        claim(study, trial, 99, "coarse")  # the spec's 99 gives way to the stored 6
        ran.append(trial.number)
        if len(ran) == 3:  # the third trial eats the stage's time
            study.set_user_attr(StudyKey.DEADLINE, time.time() + 0.2)
        return 0.5

    fill(study, 99, objective)
    trials = study.get_trials(deepcopy=False)
    assert ran == [0, 1, 2] and sum(t.state in FINISHED for t in trials) == 3
    assert study.user_attrs[StudyKey.TARGET] == 3
    up = study.user_attrs[StudyKey.TIME_UP]
    assert up["planned"] == 6 and up["trials"] == 3
    refused = [t for t in trials if t.state == TrialState.FAIL]
    assert len(refused) == 1 and "time was up" in refused[0].user_attrs["note"]


def test_a_stages_first_trial_runs_even_past_its_deadline(study: optuna.Study) -> None:
    quiet_optuna()
    study.set_user_attr(StudyKey.TARGET, 4)
    study.set_user_attr(StudyKey.TRIAL_COST, 10.0)
    study.set_user_attr(StudyKey.DEADLINE, time.time())

    def objective(trial: optuna.Trial) -> float:
        claim(study, trial, 4, "fine")
        return 0.5

    fill(study, 4, objective)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    assert len(done) == 1 and study.user_attrs[StudyKey.TARGET] == 1
