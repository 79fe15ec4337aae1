"""A run and three workers on one journal file (`journal://PATH`, no database server), one
worker SIGKILLed in the middle of a trial: the shape of the PostgreSQL test in
test_workers.py, on the storage a Slurm cluster with a shared disk gets.

The doomed worker runs in its own UTS namespace with another hostname, so only babysit's
journal heartbeat (babysit/storage/journal.py) can tell that it died.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_workers import FAST
from test_workers import FAST_HEARTBEAT
from test_workers import FINISHED
from test_workers import _check_search
from test_workers import _env
from test_workers import _finish
from test_workers import _live
from test_workers import _other_host_prefix
from test_workers import _spawn
from test_workers import _study
from test_workers import _trials
from test_workers import _wait_for

from babysit.storage import open_storage

pytestmark = pytest.mark.slow


def test_run_and_three_workers_on_a_journal_file_survive_a_killed_worker(
    tmp_path: Path,
) -> None:
    path = tmp_path / "shared" / "run.journal"
    path.parent.mkdir()
    url = f"journal://{path}"
    budget = [
        "--set",
        "coarse.trials=6",
        "--set",
        "coarse.epochs=2",
        "--set",
        "fine.trials=3",
        "--set",
        "final.epochs=4",
    ]
    summary = tmp_path / "summary.json"
    owner = _spawn(
        "run",
        "--name",
        "j",
        *FAST,
        *budget,
        *FAST_HEARTBEAT,
        "--storage",
        url,
        "--summary-json",
        str(summary),
        cwd=tmp_path,
        env=_env(),
    )
    watch = open_storage(url).rdb
    _wait_for(lambda: _study(watch, "j/sanity"), what="the run's first study")
    # No --artifact-dir: every process puts artifacts beside the journal file.
    worker = ["worker", "--name", "j", *FAST_HEARTBEAT, "--quiet"]
    procs = {
        "run": owner,
        "worker-flag": _spawn(*worker, "--storage", url, cwd=tmp_path, env=_env()),
        "worker-env": _spawn(*worker, cwd=tmp_path, env=_env(BABYSIT_STORAGE=url)),
    }
    other_host = _other_host_prefix()
    doomed = _spawn(*worker, "--storage", url, cwd=tmp_path, env=_env(), prefix=other_host)
    host = "otherhost:" if other_host else f"{os.uname().nodename}:{doomed.pid}"

    def doomed_trial() -> tuple[str, optuna.trial.FrozenTrial] | None:
        for stage in ("coarse", "fine"):
            for t in _trials(watch, f"j/{stage}"):
                if t.state == TrialState.RUNNING and t.user_attrs.get("worker", "").startswith(
                    host
                ):
                    return stage, t
        return None

    stage, victim = _wait_for(doomed_trial, what="the doomed worker's search trial")
    before = {
        t.number: (t.state, t.params, t.values, t.user_attrs)
        for t in _trials(watch, f"j/{stage}")
        if t.state in FINISHED
    }
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate(timeout=30)

    results = _finish(procs)
    for name, (code, _, stderr) in results.items():
        assert code == 0, f"{name} exited {code}:\n{stderr}"
        assert "Traceback" not in stderr, f"{name}:\n{stderr}"

    # Optuna reads no journal:// URL itself: the storage object, opened afresh.
    stored = open_storage(url, create=False).rdb
    for single in ("sanity", "overfit"):
        trials = _trials(stored, f"j/{single}")
        assert len([t for t in _live(trials) if t.state in FINISHED]) == 1, single
    coarse = _check_search(stored, "j", "coarse", 6)
    fine = _check_search(stored, "j", "fine", 3)
    hit = coarse if stage == "coarse" else fine
    killed = hit[victim.number]
    assert killed.state == TrialState.FAIL
    assert killed.user_attrs["reason"] == ("heartbeat stale" if other_host else "worker died")
    # Redone: a later trial took its place, and the stage still ends with exactly its target.
    assert any(t.number > victim.number and t.state in FINISHED for t in _live(hit))
    for number, kept in before.items():  # finished trials are never lost or re-run
        t = hit[number]
        assert (t.state, t.params, t.values, t.user_attrs) == kept
    trained_by = {t.user_attrs["worker"] for t in coarse + fine if t.state in FINISHED}
    assert len(trained_by) >= 2  # the searches were shared

    final = _study(stored, "j/final")
    assert final is not None
    complete = [t for t in final.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 1 and len(_live(final.trials)) == 1
    store = path.with_name("run.journal.artifacts")
    assert (store / complete[0].user_attrs["model_artifact"]).is_file()

    # Resumed by name: the same command again finds every stage done and trains nothing.
    again = _spawn(
        "run", "--name", "j", *FAST, *budget, "--storage", url, cwd=tmp_path, env=_env()
    )
    code, _, err = _finish({"again": again})["again"]
    assert code == 0, err
    reread = open_storage(url, create=False).rdb
    for name in ("sanity", "overfit", "coarse", "fine", "final"):
        assert len(_trials(reread, f"j/{name}")) == len(_trials(stored, f"j/{name}")), name

    data = json.loads(summary.read_text())
    assert data["stages"]["coarse"]["trials"] == 6
    assert data["stages"]["fine"]["trials"] == 3
    assert data["stages"]["final"]["status"] == "passed"
