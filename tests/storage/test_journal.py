"""`journal://PATH`: Optuna's journal file storage behind babysit's storage layer.

Real journal files in tmp_path, real processes where the point is several of them; the
whole protocol with workers and a kill on a journal file is in tests/parallel/test_journal_workers.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from conftest import ROOT
from conftest import babysit
from conftest import cli_env
from optuna.trial import TrialState

from babysit.errors import UsageError
from babysit.parallel.coordination import reclaim
from babysit.schema import SystemKey
from babysit.storage import open_storage
from babysit.storage.journal import HeartbeatJournalStorage

# Trials written with ask/tell while heartbeats are on: Optuna warns, as it should.
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")


def test_a_journal_url_opens_a_file_with_its_artifacts_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "run.journal"
    path.parent.mkdir()
    storage = open_storage(f"journal://{path}", heartbeat=5, grace=20)
    assert isinstance(storage.rdb, HeartbeatJournalStorage)
    assert storage.rdb.get_heartbeat_interval() == 5
    assert path.is_file()
    assert storage.artifact_dir == path.with_name("run.journal.artifacts")
    assert storage.shown == f"journal://{path}"
    # Another process (here: another storage object) sees what this one wrote.
    optuna.create_study(study_name="r/sanity", storage=storage.rdb)
    again = open_storage(f"journal://{path}", create=False)
    assert optuna.get_all_study_names(again.rdb) == ["r/sanity"]


def test_a_relative_journal_path_is_the_working_directorys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BABYSIT_STORAGE", "journal://run.journal")
    storage = open_storage()
    assert (tmp_path / "run.journal").is_file()
    assert storage.artifact_dir == Path("run.journal.artifacts")


@pytest.mark.parametrize(
    ("where", "create", "words"),
    [
        ("missing/run.journal", True, "does not exist"),
        ("absent.journal", False, "no storage at"),
        ("", True, "names no file"),
    ],
)
def test_bad_journal_urls_are_refused_and_create_nothing(
    tmp_path: Path, where: str, create: bool, words: str
) -> None:
    url = f"journal://{tmp_path / where}" if where else f"journal://{tmp_path}"
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UsageError, match=words):
        open_storage(url, create=create)
    assert sorted(tmp_path.rglob("*")) == before


def test_a_file_that_is_no_journal_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a journal\nsecond line\n")
    proc = babysit("status", "--storage", f"journal://{path}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "cannot open storage" in proc.stderr
    assert path.read_text() == "not a journal\nsecond line\n"


def test_a_rejected_run_leaves_no_journal_file(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    proc = babysit(
        "run", "--storage", f"journal://{path}", "--set", "coarse.trials=-1", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def _running_trial(storage: HeartbeatJournalStorage, name: str, worker: str) -> int:
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True)
    trial = study.ask()
    trial.set_user_attr("worker", worker)
    return trial._trial_id


def test_a_stale_heartbeat_and_a_missing_one_are_reclaimed_with_the_reason(
    tmp_path: Path,
) -> None:
    """Optuna's JournalStorage has no heartbeat; babysit's stamps one as a system attr, and
    another process (another storage object on the file) fails a trial whose stamp is old,
    or that never stamped and started over a grace period ago."""
    path = str(tmp_path / "run.journal")
    dead = HeartbeatJournalStorage(path, heartbeat=1, grace=2)
    # Trials of "another host": the pid check cannot see them, only the heartbeat can.
    stamped = _running_trial(dead, "r/coarse", "elsewhere:1")
    dead.record_heartbeat(stamped)
    silent = _running_trial(dead, "r/coarse", "elsewhere:2")
    alive_id = _running_trial(dead, "r/coarse", "elsewhere:3")

    watcher = HeartbeatJournalStorage(path, heartbeat=1, grace=2)
    study = optuna.load_study(study_name="r/coarse", storage=watcher)
    reclaim(study)  # too early: nothing is stale yet
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING] * 3
    time.sleep(2.5)
    dead.record_heartbeat(alive_id)  # this one's worker lives on
    reclaim(study)
    by_id = {t._trial_id: t for t in study.get_trials()}
    assert by_id[stamped].state == TrialState.FAIL
    assert by_id[stamped].user_attrs["reason"] == "heartbeat stale"
    assert by_id[silent].state == TrialState.FAIL
    assert by_id[silent].user_attrs["reason"] == "no heartbeat"
    assert by_id[alive_id].state == TrialState.RUNNING
    assert isinstance(by_id[alive_id].system_attrs[SystemKey.HEARTBEAT], float)
    # A heartbeat on a trial another process failed is swallowed, not a crash of the thread.
    dead.record_heartbeat(stamped)


_FILLER = textwrap.dedent(
    """
    import sys, time
    import optuna
    from babysit.parallel.coordination import claim, fill, quiet_optuna
    from babysit.storage import open_storage

    quiet_optuna()
    storage = open_storage(sys.argv[1], heartbeat=1, grace=30)
    study = optuna.create_study(study_name="r/coarse", storage=storage.rdb, load_if_exists=True)

    def objective(trial):
        claim(study, trial, 12, "coarse")
        time.sleep(0.05)
        return trial.suggest_float("lr", 1e-4, 1e-1, log=True)

    fill(study, 12, objective)
    """
)


def test_three_processes_fill_a_stage_on_one_journal_file_exactly(tmp_path: Path) -> None:
    url = f"journal://{tmp_path / 'run.journal'}"
    open_storage(url)  # the file exists before the processes race to create the study
    env = cli_env(OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FILLER, url],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
    study = optuna.load_study(study_name="r/coarse", storage=open_storage(url).rdb)
    trials = study.get_trials()
    assert len({t.number for t in trials}) == len(trials)
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(finished) == 12
    assert all(t.user_attrs.get("reason") != "surplus" for t in finished)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len({t.user_attrs["worker"] for t in finished}) >= 2  # shared, not one process


def _trial_view(url: str, name: str) -> list[tuple]:
    study = optuna.load_study(study_name=name, storage=open_storage(url).rdb)
    return [(t.number, t.state, t.params, t.values, t.user_attrs) for t in study.get_trials()]


@pytest.mark.slow  # real CLI processes, as in tests/record/test_transfer.py
def test_babysit_copy_moves_a_run_into_a_journal_file_and_back(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'babysit.db'}"
    source = open_storage(db).rdb
    for stage, values in (("sanity", [2.3]), ("coarse", [0.4, 0.7, 0.6])):
        study = optuna.create_study(study_name=f"r/{stage}", storage=source)
        study.set_user_attr("stage", stage)
        for value in values:
            trial = study.ask()
            trial.suggest_float("lr", 1e-4, 1e-1, log=True)
            trial.set_user_attr("worker", "here:1")
            study.tell(trial, value)
    journal = f"journal://{tmp_path / 'shared' / 'run.journal'}"
    (tmp_path / "shared").mkdir()
    there = babysit("copy", "--name", "r", "--from", db, "--to", journal, cwd=tmp_path)
    assert there.returncode == 0, there.stderr
    assert "2 studies, 4 trials" in there.stdout + there.stderr
    back_db = f"sqlite:///{tmp_path / 'back.db'}"
    back = babysit("copy", "--name", "r", "--from", journal, "--to", back_db, cwd=tmp_path)
    assert back.returncode == 0, back.stderr
    for stage in ("sanity", "coarse"):
        original = _trial_view(db, f"r/{stage}")
        assert _trial_view(journal, f"r/{stage}") == original
        assert _trial_view(back_db, f"r/{stage}") == original
    # The journal now holds the run: copying it there again is refused, nothing written.
    size = (tmp_path / "shared" / "run.journal").stat().st_size
    again = babysit("copy", "--name", "r", "--from", db, "--to", journal, cwd=tmp_path)
    assert again.returncode == 2 and "already holds" in again.stderr
    assert (tmp_path / "shared" / "run.journal").stat().st_size == size


def test_the_storage_proxy_serves_a_journal_file(tmp_path: Path) -> None:
    import socket

    url = f"journal://{tmp_path / 'run.journal'}"
    optuna.create_study(study_name="r/sanity", storage=open_storage(url).rdb)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = subprocess.Popen(
        [sys.executable, "-m", "babysit", "storage-proxy", "--storage", url, "--port", str(port)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = open_storage(f"grpc://127.0.0.1:{port}", artifact_dir=tmp_path / "a").rdb
        study = optuna.load_study(study_name="r/sanity", storage=client)
        trial = study.ask()
        study.tell(trial, 2.3)
        assert optuna.get_all_study_names(client) == ["r/sanity"]
    finally:
        proxy.send_signal(signal.SIGINT)
        _, err = proxy.communicate(timeout=30)
    assert "Traceback" not in err
    # Written through the proxy into the file: a fresh reader of the file sees the trial.
    direct = optuna.load_study(study_name="r/sanity", storage=open_storage(url).rdb)
    assert [(t.state, t.value) for t in direct.get_trials()] == [(TrialState.COMPLETE, 2.3)]


def test_a_lock_left_by_a_killed_process_fails_no_live_trial(tmp_path: Path) -> None:
    """A worker killed while it holds the journal's lock leaves the lock file; nobody can
    stamp until it is broken, and then every live trial's stamp is old. Stamps count from
    the end of the stall, so only a trial that stays silent a grace period after it is
    failed."""
    path = tmp_path / "run.journal"
    owner = HeartbeatJournalStorage(str(path), heartbeat=1, grace=2)
    live = _running_trial(owner, "r/coarse", "elsewhere:1")
    owner.record_heartbeat(live)
    Path(f"{path}.lock").symlink_to(path)  # what a holder killed mid-write leaves
    watcher = HeartbeatJournalStorage(str(path), heartbeat=1, grace=2, lock_grace=3)
    study = optuna.load_study(study_name="r/coarse", storage=watcher)
    time.sleep(2.5)  # the stamp is past the grace period, the lock still held
    began = time.monotonic()
    reclaim(study)  # waits out the stall (Optuna breaks the lock after 3 s), fails nobody
    assert time.monotonic() - began > 0.5
    assert not Path(f"{path}.lock").exists()
    assert study.get_trials()[0].state == TrialState.RUNNING
    time.sleep(2.5)  # a grace period of a free lock without a stamp: now it is stale
    reclaim(study)
    trial = study.get_trials()[0]
    assert trial.state == TrialState.FAIL and trial.user_attrs["reason"] == "heartbeat stale"


@pytest.mark.slow  # real CLI processes, as in tests/record/test_transfer.py
def test_babysit_dashboard_serves_a_journal_file(tmp_path: Path) -> None:
    import json
    import re
    import urllib.request

    url = f"journal://{tmp_path / 'run.journal'}"
    study = optuna.create_study(study_name="r/coarse", storage=open_storage(url).rdb)
    study.tell(study.ask(), 0.5)
    dashboard = subprocess.Popen(
        [sys.executable, "-m", "babysit", "dashboard", "--storage", url, "--port", "0"],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert dashboard.stderr is not None
        lines = []
        while not (lines and "dashboard: http" in lines[-1]):
            line = dashboard.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        found = re.search(r"http://[^/]+:(\d+)/", lines[-1])
        assert found is not None
        port = found.group(1)
        assert f"storage: {url}" in "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=30) as r:
            studies = json.load(r)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["r/coarse"]
    finally:
        dashboard.send_signal(signal.SIGINT)
        dashboard.communicate(timeout=30)
