from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Budgets small enough that a whole protocol on digits takes seconds: a narrow AlexNet
# head (256 instead of 4096) and one or two epochs per stage.
TINY = [
    "--set",
    "model.fc_width=256",
    "--set",
    "overfit.steps=120",
    "--set",
    "coarse.trials=4",
    "--set",
    "coarse.epochs=1",
    "--set",
    "coarse.lr=[1e-3, 0.1]",
    # Exactly coarse.trials trials, as the tests count them: no extra round at an edge
    # (tests/stages/test_learned.py covers it).
    "--set",
    "coarse.extend=false",
    "--set",
    "fine.trials=2",
    "--set",
    "fine.epochs=1",
    "--set",
    "final.epochs=2",
    "--quiet",
]

# The cheapest protocol that still trains: a 3-conv AlexNet with one narrow FC layer and
# an overfit LR that memorises 20 digits in ~10 steps (Adam, the default optimizer).
CHEAP = [
    "--set",
    "model.fc_width=64",
    "--set",
    "model.conv_layers=3",
    "--set",
    "model.fc_layers=1",
    "--set",
    "overfit.lrs={adam=[1e-3]}",
    "--set",
    "overfit.steps=60",
]


def wait_for(cond: Callable[[], object], timeout: float = 240, what: str = "") -> object:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what or cond}")


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("BABYSIT_STORAGE", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    env.update(extra)
    return env


def babysit(
    *args: str,
    cwd: Path,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """The real command line in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "babysit", *args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"babysit {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def popen(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "babysit", *args],
        cwd=cwd,
        env=env or cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'babysit.db'}"


# The `postgres` tests use the server named by $BABYSIT_TEST_POSTGRES (default: the local
# one, trust auth) and a database of their own, dropped afterwards. Under CI an unreachable
# server fails them: a skip there would hide that nothing was tested.
POSTGRES = os.environ.get("BABYSIT_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")


def postgres_admin():  # noqa: ANN201 - psycopg is imported lazily
    """An autocommit connection to the server's maintenance database."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(POSTGRES)
    last: Exception | None = None
    for db in ("postgres", "test"):
        try:
            return psycopg.connect(
                host=url.host or "127.0.0.1",
                port=url.port or 5432,
                user=url.username or "postgres",
                password=url.password,
                dbname=db,
                autocommit=True,
                connect_timeout=5,
            )
        except psycopg.OperationalError as err:
            last = err
    assert last is not None
    raise last


@pytest.fixture
def postgres_url() -> Iterator[str]:
    import secrets

    import psycopg
    from sqlalchemy.engine import make_url

    try:
        admin = postgres_admin()
    except psycopg.OperationalError as err:
        message = f"PostgreSQL unreachable at {make_url(POSTGRES).render_as_string()}: {err}"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message)
        pytest.skip(message)
    name = f"babysit_test_{secrets.token_hex(4)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield make_url(POSTGRES).set(database=name).render_as_string(hide_password=False)
    with postgres_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# A finished run shared by the quick tests that read one (tests/cli/test_predict.py): the
# cheapest protocol that still ends with a final trained for 2 epochs, run once per session
# through the real command line.
FINISHED_RUN_ARGS = [*TINY, *CHEAP]


@dataclass(frozen=True)
class FinishedRun:
    """A run through every stage: its folder, storage URL, name, summary and stderr."""

    tmp: Path
    url: str
    name: str
    summary: dict
    stderr: str

    @property
    def final(self) -> dict:
        return self.summary["stages"]["final"]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    tmp = tmp_path_factory.mktemp("finished")
    url = f"sqlite:///{tmp / 'babysit.db'}"
    summary = tmp / "summary.json"
    args = ["--name", "digits", "--storage", url, "--summary-json", str(summary)]
    proc = babysit("run", *args, *FINISHED_RUN_ARGS, cwd=tmp, check=True)
    return FinishedRun(tmp, url, "digits", json.loads(summary.read_text()), proc.stderr)
