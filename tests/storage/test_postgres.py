"""PostgreSQL storage: heartbeats, reconnection after a restart, a lost database, secrets."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import CHEAP
from conftest import ROOT
from conftest import cli_env
from conftest import wait_for as _wait_for
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from babysit.parallel.coordination import reclaim
from babysit.storage import StorageLost
from babysit.storage import open_storage

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PASSWORD = "Pg-r3start-pw"
FAST = [
    *CHEAP,
    "--set",
    "coarse.trials=6",
    "--set",
    "coarse.epochs=2",
    "--set",
    "coarse.lr=[1e-3, 3e-3]",
    "--set",
    "coarse.extend=false",
    "--set",
    'coarse.pruner="none"',
    "--set",
    "fine.trials=2",
    "--set",
    "fine.epochs=1",
    "--set",
    "final.epochs=2",
    "--quiet",
]


def _with_password(url: str, port: int | None = None) -> str:
    parsed = make_url(url).set(password=PASSWORD)
    if port is not None:
        parsed = parsed.set(host="127.0.0.1", port=port)
    return parsed.render_as_string(hide_password=False)


def _trials(storage: optuna.storages.BaseStorage, name: str) -> list:
    if name not in optuna.get_all_study_names(storage):
        return []
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def _spawn(*args: str, cwd: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "babysit", *args],
        cwd=cwd,
        env=cli_env(OMP_NUM_THREADS="1", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class _Relay:
    """A TCP relay in front of PostgreSQL that a test can cut and restore: an outage of any
    length for one client, without stopping the server other tests share."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._open: list[socket.socket] = []
        self._server: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen()
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        assert self._server is not None
        for s in [self._server, *self._open]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._open.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def relay(postgres_url: str) -> Iterator[_Relay]:
    url = make_url(postgres_url)
    r = _Relay(url.host or "127.0.0.1", url.port or 5432)
    yield r
    r.cut()


def test_password_never_shown_and_trust_auth_takes_any(postgres_url: str) -> None:
    url = _with_password(postgres_url)
    storage = open_storage(url)
    assert PASSWORD not in storage.shown and ":***@" in storage.shown
    optuna.create_study(study_name="x/coarse", storage=storage.rdb)  # the password is accepted
    proc = subprocess.run(
        [sys.executable, "-m", "babysit", "status", "--storage", url],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert PASSWORD not in proc.stdout + proc.stderr


def test_a_stale_heartbeat_fails_the_trial_and_says_why(tmp_path: Path, postgres_url: str) -> None:
    """A worker on another machine is SIGKILLed: no pid to check, only its heartbeat."""
    script = textwrap.dedent(f"""
        import time, optuna
        from babysit.storage import open_storage
        storage = open_storage({postgres_url!r}, heartbeat=1, grace=2)
        study = optuna.create_study(study_name="h/coarse", storage=storage.rdb)
        def objective(trial):
            trial.set_user_attr("worker", "elsewhere:1")
            print("running", flush=True)
            time.sleep(600)
        study.optimize(objective, n_trials=1)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "running"
    storage = open_storage(postgres_url, heartbeat=1, grace=2)
    study = optuna.load_study(study_name="h/coarse", storage=storage.rdb)
    reclaim(study)
    assert study.trials[0].state == TrialState.RUNNING  # alive: its heartbeat is fresh
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    reclaim(study)
    assert study.trials[0].state == TrialState.RUNNING  # not yet past the grace period
    time.sleep(3.5)
    reclaim(study)
    (trial,) = study.trials
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["reason"] == "heartbeat stale"


def test_a_call_rides_out_an_outage_then_gives_up_with_one_clear_error(
    relay: _Relay, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BABYSIT_RECONNECT", "4")
    storage = open_storage(_with_password(postgres_url, relay.port))
    study = optuna.create_study(study_name="o/coarse", storage=storage.rdb)

    relay.cut()
    threading.Timer(1.5, relay.restore).start()
    study.set_user_attr("written", "during the outage")  # waits for the database
    assert study.user_attrs["written"] == "during the outage"

    relay.cut()
    started = time.monotonic()
    with pytest.raises(StorageLost) as lost:
        study.set_user_attr("written", "never")
    assert 4 <= time.monotonic() - started < 30
    message = str(lost.value)
    assert "lost the connection to storage" in message and ":***@" in message
    assert PASSWORD not in message
    relay.restore()
    assert study.user_attrs["written"] == "during the outage"


def test_a_worker_that_loses_the_database_stops_with_one_line_and_the_rerun_goes_on(
    tmp_path: Path, relay: _Relay, postgres_url: str
) -> None:
    cut_url = _with_password(postgres_url, relay.port)
    args = [
        "run",
        "--name",
        "l",
        *FAST,
        "--heartbeat",
        "1",
        "--grace",
        "3",
        "--artifact-dir",
        str(tmp_path / "art"),
    ]
    proc = _spawn(*args, "--storage", cut_url, cwd=tmp_path, BABYSIT_RECONNECT="3")
    watch = open_storage(postgres_url).rdb

    def running() -> bool:
        trials = _trials(watch, "l/coarse")
        return any(t.state == TrialState.RUNNING and t.intermediate_values for t in trials)

    _wait_for(running, what="a coarse trial past its first epoch")
    relay.cut()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert PASSWORD not in err
    assert err.strip().splitlines()[-1].startswith("babysit: lost the connection to storage")
    interrupted = [t for t in _trials(watch, "l/coarse") if t.state == TrialState.RUNNING]
    assert len(interrupted) == 1  # left as it was; the next process reclaims it

    again = _spawn(*args, "--storage", _with_password(postgres_url), cwd=tmp_path)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    coarse = _trials(watch, "l/coarse")
    assert coarse[interrupted[0].number].state == TrialState.FAIL
    assert coarse[interrupted[0].number].user_attrs["reason"] == "worker died"
    assert len([t for t in coarse if t.state in FINISHED]) == 6
    assert not [t for t in coarse if t.state == TrialState.RUNNING]


def _restart_command() -> list[str]:
    """Debian's restart of the local cluster; the test needs to own the server to do it."""
    tool = shutil.which("pg_ctlcluster")
    clusters = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if tool is None or not clusters or os.geteuid() != 0:
        message = "restarting PostgreSQL needs pg_ctlcluster and root"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message)
        pytest.skip(message)
    return [tool, "--skip-systemctl-redirect", clusters[-1], "main", "restart"]


def test_workers_carry_on_when_postgres_restarts_mid_search(
    tmp_path: Path, postgres_url: str
) -> None:
    restart = _restart_command()
    url = _with_password(postgres_url)
    common = ["--heartbeat", "2", "--grace", "20", "--artifact-dir", str(tmp_path / "art")]
    owner = _spawn("run", "--name", "r", *FAST, *common, "--storage", url, cwd=tmp_path)
    watch = open_storage(postgres_url).rdb
    _wait_for(lambda: _trials(watch, "r/sanity"), what="the run's first study")
    worker = _spawn("worker", "--name", "r", "--quiet", *common, cwd=tmp_path, BABYSIT_STORAGE=url)

    def mid_search() -> bool:
        trials = _trials(watch, "r/coarse")
        return sum(t.state in FINISHED for t in trials) >= 1 and any(
            t.state == TrialState.RUNNING for t in trials
        )

    _wait_for(mid_search, what="a coarse trial running after one finished")
    before = {
        t.number: (t.state, t.params, t.values)
        for t in _trials(watch, "r/coarse")
        if t.state in FINISHED
    }
    subprocess.run(restart, check=True, capture_output=True, timeout=120)

    for name, proc in (("run", owner), ("worker", worker)):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}:\n{err}"
        assert "Traceback" not in err, f"{name}:\n{err}"
        assert PASSWORD not in err
    coarse = _trials(watch, "r/coarse")
    assert len({t.number for t in coarse}) == len(coarse)
    assert len([t for t in coarse if t.state in FINISHED]) == 6
    assert not [t for t in coarse if t.state == TrialState.RUNNING]
    for number, kept in before.items():
        t = coarse[number]
        assert (t.state, t.params, t.values) == kept
    final = _trials(watch, "r/final")
    assert [t.state for t in final if t.user_attrs.get("reason") != "surplus"] == [
        TrialState.COMPLETE
    ]
