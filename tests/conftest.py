from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Budgets small enough that a whole protocol on digits takes seconds: a narrow AlexNet
# head (256 instead of 4096) and one or two epochs per stage.
TINY = [
    "--set", "model.fc_width=256",
    "--set", "overfit.steps=120",
    "--set", "coarse.trials=4",
    "--set", "coarse.epochs=1",
    "--set", "coarse.lr=[1e-3, 0.1]",
    "--set", "fine.trials=2",
    "--set", "fine.epochs=1",
    "--set", "final.epochs=2",
    "--quiet",
]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("BABYSIT_STORAGE", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    env.update(extra)
    return env


def babysit(*args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
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
        raise AssertionError(f"babysit {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
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
