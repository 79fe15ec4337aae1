"""The Optuna behaviours babysit.parallel.coordination relies on, pinned.

Each test names one thing coordination reads or expects of Optuna (a private attribute, the
order it hands out trials, the text of a log line or an error). An Optuna upgrade that
changes one fails here, by name, instead of leaving a run with one trial too many or a
surplus traceback on every worker.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from babysit.parallel import coordination
from babysit.parallel.coordination import claim
from babysit.parallel.coordination import fill
from babysit.parallel.coordination import fixed_trial
from babysit.parallel.coordination import quiet_optuna
from babysit.parallel.coordination import reclaim
from babysit.schema import FINISHED
from babysit.stages import samplers
from babysit.storage import open_storage
from babysit.storage import private
from babysit.storage.private import trial_id

# Trials asked for outside optimize() on a storage with heartbeats: what these tests do.
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")


@pytest.fixture
def rdb(tmp_path: Path) -> optuna.storages.BaseStorage:
    # babysit's own storage (the reconnecting RDB wrapper), as every run uses it.
    return open_storage(f"sqlite:///{tmp_path / 'c.db'}").rdb


def _study(rdb: optuna.storages.BaseStorage, name: str = "run/coarse") -> optuna.Study:
    return optuna.create_study(study_name=name, storage=rdb, load_if_exists=True)


def test_private_reads_exist_and_agree_with_the_public_api(rdb) -> None:  # noqa: ANN001
    other = _study(rdb, "run/sanity")
    other.ask()  # trial id 1 in this storage: ids and numbers part ways below
    study = _study(rdb)
    trial = study.ask()
    frozen = study.get_trials(deepcopy=False)[0]
    assert trial_id(trial) == trial_id(frozen) == 2
    assert frozen.number == trial.number == 0
    assert private.study_id(study) == study._study_id != private.study_id(other)
    storage = private.storage_of(study)
    # Optuna wraps an RDB storage in its cache; babysit's storage sits behind it, where
    # _orphaned_trial_ids looks for it.
    assert storage is rdb or storage._backend is rdb
    # The storage API addresses trials by id: what _fail and distributed's ranks use.
    assert storage.get_trial(trial_id(trial)).number == 0
    assert private.stale_trial_ids(study) == []
    assert private.orphaned_trial_ids(study) == []  # RUNNING, but not for long yet


def test_trial_numbers_count_up_per_study_in_creation_order(rdb) -> None:  # noqa: ANN001
    # claim's rule ("fewer than target live trials numbered before me") rests on this.
    study = _study(rdb)
    numbers = [study.ask().number for _ in range(4)]
    assert numbers == [0, 1, 2, 3]
    assert [t.number for t in study.get_trials(deepcopy=False)] == numbers


def test_ask_hands_out_the_enqueued_waiting_trial_first(rdb) -> None:  # noqa: ANN001
    # fixed_trial enqueues its trial WAITING with its key; the next trial Optuna starts
    # (through optimize's ask) must be that one, carrying the key and the params.
    study = _study(rdb)
    study.enqueue_trial({"lr": 0.1}, user_attrs={"key": "lr=0.1"}, skip_if_exists=False)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.WAITING]
    trial = study.ask()
    assert trial.user_attrs["key"] == "lr=0.1"
    assert trial.suggest_float("lr", 0.1, 0.1, log=True) == 0.1
    assert study.get_trials(deepcopy=False)[0].state == TrialState.RUNNING


def test_fixed_trial_runs_once(rdb) -> None:  # noqa: ANN001
    study = _study(rdb, "run/overfit")
    calls = []

    def objective(trial: optuna.Trial) -> float:
        calls.append(trial.number)
        return float(trial.suggest_float("lr", 0.01, 0.01, log=True))

    first = fixed_trial(study, "lr=0.01", {"lr": 0.01}, objective)
    again = fixed_trial(study, "lr=0.01", {"lr": 0.01}, objective)
    assert calls == [0]
    assert first is not None and again is not None
    assert first.number == again.number == 0 and again.value == 0.01
    assert again.user_attrs["worker"] == coordination.worker_id()


def test_fill_ends_with_exactly_the_target_and_closes_the_surplus(rdb) -> None:  # noqa: ANN001
    quiet_optuna()
    study = _study(rdb)

    def objective(trial: optuna.Trial) -> float:
        claim(study, trial, 3, "coarse")
        return 0.5

    fill(study, 3, objective)
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.COMPLETE] * 3
    # A trial asked for after the stage filled up (another process's) closes itself FAIL,
    # untrained, and says why: Optuna must catch the surplus exception and keep going.
    coordination._run_one(study, objective)
    surplus = study.get_trials(deepcopy=False)[3]
    assert surplus.state == TrialState.FAIL
    assert surplus.user_attrs["reason"] == "surplus"
    assert sum(t.state in FINISHED for t in study.get_trials(deepcopy=False)) == 3


def test_optunas_failed_trial_log_lines_are_the_ones_the_filter_parses(rdb) -> None:  # noqa: ANN001
    logger = logging.getLogger(private.OPTIMIZE_LOGGER)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    logger.addHandler(keep)
    saved = logger.filters[:]
    for f in saved:
        logger.removeFilter(f)
    try:
        study = _study(rdb)
        study.optimize(
            lambda t: coordination._surplus(t, "full"), n_trials=1, catch=(coordination._Surplus,)
        )
    finally:
        logger.removeHandler(keep)
        for f in saved:
            logger.addFilter(f)
    failed = [r for r in seen if "failed" in r.getMessage()]
    assert len(failed) == 2, [r.getMessage() for r in seen]
    assert [private.trial_number(r) for r in failed] == ["0", "0"]
    assert isinstance(failed[0].exc_info[1], coordination._Surplus)
    assert "failed with value" in failed[1].getMessage()
    # Both lines are the ones _QuietSurplus drops, and only those.
    quiet = coordination._QuietSurplus()
    assert [quiet.filter(r) for r in failed] == [False, False]
    other = logging.LogRecord(
        logger.name, logging.WARNING, "", 0, "Trial 1 failed with value None.", None, None
    )
    assert quiet.filter(other)


def test_quiet_optuna_installs_its_filter_once() -> None:
    quiet_optuna()
    quiet_optuna()
    logger = logging.getLogger(private.OPTIMIZE_LOGGER)
    assert sum(isinstance(f, coordination._QuietSurplus) for f in logger.filters) == 1
    assert optuna.logging.get_verbosity() == optuna.logging.WARNING


def test_telling_a_trial_another_process_failed_is_recognised(rdb) -> None:  # noqa: ANN001
    # A worker whose heartbeat went stale finishes its trial after another worker failed
    # it: Optuna's error must still be told apart from a real failure.
    study = _study(rdb)

    def objective(trial: optuna.Trial) -> float:
        coordination._fail(study, trial_id(trial), "heartbeat stale")
        return 1.0

    with pytest.raises(Exception) as caught:
        study.optimize(objective, n_trials=1)
    assert private.told_a_failed_trial(caught.value)
    assert not private.told_a_failed_trial(ValueError("something else"))
    coordination._run_one(study, objective)  # carries on, raises nothing
    assert [t.user_attrs["reason"] for t in study.get_trials(deepcopy=False)] == [
        "heartbeat stale"
    ] * 2


def test_reclaim_fails_a_dead_workers_trial_at_once(rdb) -> None:  # noqa: ANN001
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = _study(rdb)
    trial = study.ask()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    mine = study.ask()
    mine.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    reclaim(study)
    states = {
        t.number: (t.state, t.user_attrs.get("reason")) for t in study.get_trials(deepcopy=False)
    }
    assert states == {0: (TrialState.FAIL, "worker died"), 1: (TrialState.RUNNING, None)}


def test_a_stale_heartbeat_is_found_and_failed(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'h.db'}", heartbeat=1, grace=1)
    study = _study(storage.rdb)
    beating = study.ask()
    storage.rdb.record_heartbeat(trial_id(beating))
    assert private.heartbeat_on(study)
    time.sleep(2.5)
    assert private.stale_trial_ids(study) == [trial_id(beating)]
    reclaim(study)
    t = study.get_trials(deepcopy=False)[0]
    assert t.state == TrialState.FAIL and t.user_attrs["reason"] == "heartbeat stale"


def test_pruner_and_sampler_take_the_arguments_given() -> None:
    from babysit.spec import SearchSpec

    halving = samplers.pruner_for(SearchSpec(pruner="halving"))
    assert isinstance(halving._halving, optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(
        samplers.pruner_for(SearchSpec(pruner="median")), optuna.pruners.MedianPruner
    )
    tpe = samplers.sampler_for(SearchSpec(sampler="tpe", trials=9), seed=1)
    assert isinstance(tpe, optuna.samplers.TPESampler)
    # Same seed, same draws: what keeps a rerun's trials the same.
    draws = []
    for _ in range(2):
        study = optuna.create_study(sampler=samplers.sampler_for(SearchSpec(), seed=3))
        draws.append([study.ask().suggest_float("lr", 1e-5, 1.0, log=True) for _ in range(3)])
    assert draws[0] == draws[1]
