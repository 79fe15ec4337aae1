"""Several processes fill one run: `babysit run` plus `babysit worker`s, kills and reruns.

Every process here is the real CLI in a subprocess on a real storage. A worker started
"on another host" runs in its own UTS namespace with another hostname, so only Optuna's
heartbeat can tell that it died (on this host babysit also checks the pid).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import CHEAP
from conftest import ROOT
from conftest import cli_env
from conftest import wait_for as _wait_for
from optuna.trial import TrialState

from babysit.record.artifacts import trial_curves
from babysit.storage import open_storage

# Real processes and whole runs: `make test-slow` (CI runs it after `make test`).
pytestmark = pytest.mark.slow

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PASSWORD = "w0rker-Pa55"

# The cheapest protocol that still trains (see tests/record/test_transfer.py); per test, the
# search sizes and epochs are set where the test needs trials to last.
FAST = [
    *CHEAP,
    "--set",
    "coarse.lr=[1e-3, 1e-2]",
    "--set",
    "coarse.extend=false",
    "--set",
    'coarse.pruner="none"',
    "--set",
    'fine.pruner="none"',
    "--set",
    "fine.epochs=1",
    "--quiet",
]
# Heartbeat every second, dead after 3 s without one: a killed worker's trial is
# reclaimed within seconds instead of a minute.
FAST_HEARTBEAT = ["--heartbeat", "1", "--grace", "3"]


def _env(**extra: str) -> dict[str, str]:
    # Each process one thread: four processes share two cores.
    return cli_env(OMP_NUM_THREADS="1", **extra)


def _other_host_prefix() -> list[str]:
    """Run a command with another hostname, as if on another machine (needs root)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    probe = subprocess.run(
        [unshare, "--uts", "sh", "-c", "hostname otherhost"], capture_output=True
    )
    if probe.returncode != 0:
        return []
    return [unshare, "--uts", "sh", "-c", 'hostname otherhost && exec "$@"', "sh"]


def _spawn(
    *args: str, cwd: Path, env: dict[str, str], prefix: list[str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*(prefix or []), sys.executable, "-m", "babysit", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _study(url: str | optuna.storages.BaseStorage, name: str) -> optuna.Study | None:
    if name not in optuna.get_all_study_names(url):
        return None
    return optuna.load_study(study_name=name, storage=url)


def _trials(url: str | optuna.storages.BaseStorage, name: str) -> list[optuna.trial.FrozenTrial]:
    study = _study(url, name)
    return study.get_trials() if study is not None else []


def _finish(procs: dict[str, subprocess.Popen[str]], timeout: float = 420) -> dict[str, tuple]:
    out = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        out[name] = (proc.returncode, stdout, stderr)
    return out


def _live(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials if t.user_attrs.get("reason") != "surplus"]


def _check_search(url: str, run: str, stage: str, target: int) -> list[optuna.trial.FrozenTrial]:
    trials = _trials(url, f"{run}/{stage}")
    assert len({t.number for t in trials}) == len(trials)
    assert [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)] == []
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == target, [
        (t.number, t.state.name, t.user_attrs.get("reason")) for t in trials
    ]
    assert all(t.user_attrs.get("reason") != "surplus" for t in finished)
    return trials


@pytest.mark.postgres
def test_workers_and_run_fill_each_stage_exactly_and_survive_a_killed_worker(
    tmp_path: Path, postgres_url: str
) -> None:
    """`babysit run` + two workers + one worker on "another host" that is SIGKILLed in the
    middle of a coarse trial: every stage ends with exactly its target, the dead worker's
    trial is failed once its heartbeat is stale and replaced, one process trains final and
    the workers that did not say who has it."""
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url).set(password=PASSWORD).render_as_string(hide_password=False)
    shared = tmp_path / "shared-artifacts"
    # Final lasts a few seconds, so every worker finds it held rather than done.
    budget = [
        "--set",
        "coarse.trials=6",
        "--set",
        "coarse.extend=false",
        "--set",
        "coarse.epochs=2",
        "--set",
        "fine.trials=3",
        "--set",
        "final.epochs=6",
    ]
    summary = tmp_path / "summary.json"
    owner = _spawn(
        "run",
        "--name",
        "w",
        *FAST,
        *budget,
        *FAST_HEARTBEAT,
        "--storage",
        url,
        "--artifact-dir",
        str(shared),
        "--summary-json",
        str(summary),
        cwd=tmp_path,
        env=_env(),
    )
    watch = open_storage(postgres_url).rdb
    _wait_for(lambda: _study(watch, "w/sanity"), what="the run's first study")
    worker = ["worker", "--name", "w", *FAST_HEARTBEAT, "--artifact-dir", str(shared), "--quiet"]
    procs = {
        "run": owner,
        "worker-flag": _spawn(*worker, "--storage", url, cwd=tmp_path, env=_env()),
        "worker-env": _spawn(*worker, cwd=tmp_path, env=_env(BABYSIT_STORAGE=url)),
    }
    other_host = _other_host_prefix()
    doomed = _spawn(*worker, "--storage", url, cwd=tmp_path, env=_env(), prefix=other_host)
    host = "otherhost:" if other_host else f"{os.uname().nodename}:{doomed.pid}"

    def doomed_trial() -> tuple[str, optuna.trial.FrozenTrial] | None:
        # Mid-coarse as a rule; mid-fine should the others have taken every coarse slot.
        for stage in ("coarse", "fine"):
            for t in _trials(watch, f"w/{stage}"):
                if t.state == TrialState.RUNNING and t.user_attrs.get("worker", "").startswith(
                    host
                ):
                    return stage, t
        return None

    stage, victim = _wait_for(doomed_trial, what="the doomed worker's search trial")
    before = {
        t.number: (t.state, t.params, t.values, t.user_attrs)
        for t in _trials(watch, f"w/{stage}")
        if t.state in FINISHED
    }
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate(timeout=30)

    results = _finish(procs)
    for name, (code, stdout, stderr) in results.items():
        assert code == 0, f"{name} exited {code}:\n{stderr}"
        assert "Traceback" not in stderr, f"{name}:\n{stderr}"
        assert PASSWORD not in stdout + stderr

    coarse = _check_search(postgres_url, "w", "coarse", 6)
    fine = _check_search(postgres_url, "w", "fine", 3)
    hit = coarse if stage == "coarse" else fine
    killed = hit[victim.number]
    assert killed.state == TrialState.FAIL
    if other_host:
        # Another host's pid means nothing here: the stale heartbeat failed it.
        assert killed.user_attrs["reason"] == "heartbeat stale"
    for number, kept in before.items():  # finished trials are never lost or re-run
        t = hit[number]
        assert (t.state, t.params, t.values, t.user_attrs) == kept
    trained_by = {t.user_attrs["worker"] for t in coarse + fine if t.state in FINISHED}
    assert len(trained_by) >= 2  # the searches were shared

    final = _study(postgres_url, "w/final")
    assert final is not None
    complete = [t for t in final.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 1 and len(_live(final.trials)) == 1
    holder = complete[0].user_attrs["worker"]
    held = [n for n, (_, _, err) in results.items() if f"held by {holder}" in err]
    others = [n for n in ("worker-flag", "worker-env") if not holder.endswith(f":{procs[n].pid}")]
    assert others and set(others) <= set(held), {n: results[n][2] for n in results}

    data = json.loads(summary.read_text())
    assert data["stages"]["coarse"]["trials"] == 6
    assert data["stages"]["fine"]["trials"] == 3
    assert data["stages"]["final"]["status"] == "passed"
    assert PASSWORD not in summary.read_text()
    for stage in ("sanity", "overfit", "coarse", "fine", "final"):
        study = _study(postgres_url, f"w/{stage}")
        assert study is not None
        stored = json.dumps(
            [
                study.user_attrs,
                study._storage.get_study_system_attrs(study._study_id),
                [(t.user_attrs, t.system_attrs) for t in study.trials],
            ],
            default=str,
        )
        assert PASSWORD not in stored


def test_two_processes_on_sqlite_and_a_final_killed_midway_resumes(tmp_path: Path) -> None:
    """One machine, one SQLite file: `babysit run` and a worker share the searches; the
    process training final is SIGKILLed after a checkpoint; the survivor (or the rerun)
    resumes from that checkpoint and the final trial ends with all its epochs."""
    db = tmp_path / "one.db"
    url = f"sqlite:///{db}"
    epochs = 8  # a few seconds of final training to kill it in
    # Patience off: the test counts every epoch of the final after the resume.
    budget = [
        "--set",
        "coarse.trials=4",
        "--set",
        "coarse.extend=false",
        "--set",
        "coarse.epochs=1",
        "--set",
        "fine.trials=2",
        "--set",
        f"final.epochs={epochs}",
        "--set",
        "final.patience=0",
    ]
    run_args = ["run", "--name", "s", *FAST, *budget, *FAST_HEARTBEAT, "--storage", url]
    watch = open_storage(url).rdb
    owner = _spawn(*run_args, cwd=tmp_path, env=_env())
    _wait_for(lambda: _study(watch, "s/sanity"), what="the run's first study")
    worker = _spawn(
        "worker",
        "--name",
        "s",
        *FAST_HEARTBEAT,
        "--storage",
        url,
        "--quiet",
        cwd=tmp_path,
        env=_env(),
    )

    def checkpointed() -> optuna.trial.FrozenTrial | None:
        final = _study(watch, "s/final")
        if final is None or "checkpoint" not in final.user_attrs:
            return None
        trials = final.get_trials(deepcopy=False)
        assert not [t for t in trials if t.state == TrialState.COMPLETE], (
            "final finished before it could be killed; raise final.epochs"
        )
        running = [t for t in trials if t.state == TrialState.RUNNING]
        return running[0] if running else None

    victim = _wait_for(checkpointed, what="a final checkpoint")
    pid = int(victim.user_attrs["worker"].rpartition(":")[2])
    assert pid in (owner.pid, worker.pid)
    os.kill(pid, signal.SIGKILL)
    results = _finish({"run": owner, "worker": worker})
    if pid == owner.pid:
        assert results["worker"][0] == 0
        rerun = subprocess.run(
            [sys.executable, "-m", "babysit", *run_args],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert rerun.returncode == 0, rerun.stderr
        resumed_by = rerun.stderr
    else:
        assert results["run"][0] == 0, results["run"][2]
        resumed_by = results["run"][2]
    assert "final: resuming from the checkpoint of epoch" in resumed_by

    _check_search(url, "s", "coarse", 4)
    _check_search(url, "s", "fine", 2)
    final = _study(url, "s/final")
    assert final is not None
    trials = final.trials
    assert trials[victim.number].state == TrialState.FAIL
    assert trials[victim.number].user_attrs["reason"] == "worker died"
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 1
    done = complete[0]
    assert done.user_attrs["resumed_from_epoch"] > 0
    assert done.user_attrs["epochs_run"] == epochs
    curves = trial_curves(open_storage(url, None, create=False), done)
    assert curves and all(len(v) == epochs for v in curves.values())
    # The artifact store sits next to the SQLite file: the model, and no checkpoint once
    # the final passed (not even one a kill between two writes left behind).
    store = tmp_path / "one.db.artifacts"
    assert (store / done.user_attrs["model_artifact"]).is_file()
    assert done.user_attrs["model_artifact"] == "s/model.pt"
    assert not [p.name for p in store.iterdir() if "-final-epoch" in p.name]
    checkpoint = final.user_attrs["checkpoint"]
    assert "artifact_id" not in checkpoint and checkpoint["deleted"].startswith("s-final-epoch")
    assert checkpoint["epoch"] == epochs


def test_compose_file_keeps_secrets_out_and_the_dashboard_local(tmp_path: Path) -> None:
    """`docker-compose config` on the project's compose file with a throwaway .env."""
    import re
    import secrets

    import yaml

    compose = shutil.which("docker-compose")
    if compose is None:
        message = "docker-compose is not installed (scripts/system-setup.sh installs it)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message)
        pytest.skip(message)
    text = (ROOT / "docker-compose.yml").read_text()
    example = (ROOT / ".env.example").read_text()
    password = secrets.token_hex(12)
    env = re.sub(r"(?m)^POSTGRES_PASSWORD=.*$", f"POSTGRES_PASSWORD={password}", example)
    env = re.sub(r"(?m)^BABYSIT_RUN=.*$", "BABYSIT_RUN=compose-run", env)
    (tmp_path / "docker-compose.yml").write_text(text)
    (tmp_path / ".env").write_text(env)

    proc = subprocess.run(
        [compose, "config"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    services = config["services"]

    # Credentials come from the env file, never from the compose file itself.
    assert "${POSTGRES_PASSWORD" in text
    assert password not in text and "change-me" not in text
    assert not re.search(r"(?im)^\s*-?\s*POSTGRES_PASSWORD\s*[:=]\s*\S", text)
    assert password in services["worker"]["environment"]["BABYSIT_STORAGE"]
    for name in ("postgres", "dashboard", "worker"):
        assert services[name].get("env_file") or "POSTGRES_PASSWORD" in services[name].get(
            "environment", {}
        )
    for var in set(re.findall(r"\$\{(\w+)", text)):
        assert re.search(rf"(?m)^{var}=", example), f"{var} is not documented in .env.example"

    # The dashboard (no login, can delete studies) is published on the loopback only.
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published, "the dashboard's port is not published"
    for port in published:
        spec = port if isinstance(port, str) else f"{port.get('host_ip')}:{port.get('published')}"
        assert spec.startswith("127.0.0.1:"), port
    assert "0.0.0.0" in services["dashboard"]["command"]  # inside the container only

    # PostgreSQL: a named volume and a healthcheck the others wait for.
    assert "pgdata" in config["volumes"]
    assert any(v.startswith("pgdata:") for v in services["postgres"]["volumes"])
    assert services["postgres"]["healthcheck"]["test"]
    for name in ("dashboard", "worker"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert any(v.startswith("artifacts:/artifacts") for v in services[name]["volumes"])

    # Workers: built from the project, joining the run named in .env.
    worker = services["worker"]
    assert Path(worker["build"]["context"]).resolve() == tmp_path.resolve()
    assert worker["command"][:3] == ["worker", "--name", "compose-run"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert '"torch==2.14.1" "torchvision==0.29.1"' in dockerfile
    assert "download.pytorch.org/whl/cpu" in dockerfile
    assert "RUN pip install ." in dockerfile
    assert ".env" in (ROOT / ".dockerignore").read_text().split()

    # Optional profiles: the storage proxy and an S3-compatible store (MinIO + its bucket).
    proc = subprocess.run(
        [compose, "--profile", "proxy", "--profile", "s3", "config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    full = yaml.safe_load(proc.stdout)["services"]
    for name, profile in (
        ("proxy", "proxy"),
        ("worker-proxied", "proxy"),
        ("minio", "s3"),
        ("s3-bucket", "s3"),
    ):
        assert full[name]["profiles"] == [profile], name
    for name in ("postgres", "dashboard", "worker"):
        assert not full[name].get("profiles"), f"{name} must start without a profile"
    proxy = full["proxy"]
    assert proxy["command"][:1] == ["storage-proxy"] and "13000" in proxy["command"]
    assert password in proxy["environment"]["BABYSIT_STORAGE"]  # it alone holds the DB URL
    assert proxy["depends_on"]["postgres"]["condition"] == "service_healthy"
    proxied = full["worker-proxied"]
    assert proxied["environment"]["BABYSIT_STORAGE"] == "grpc://proxy:13000"
    assert "proxy" in proxied["depends_on"]
    assert proxied["command"][:3] == ["worker", "--name", "compose-run"]
    s3_secret = re.search(r"(?m)^AWS_SECRET_ACCESS_KEY=(.*)$", env).group(1)
    assert full["minio"]["environment"]["MINIO_ROOT_PASSWORD"] == s3_secret
    assert s3_secret not in text
    assert full["s3-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert full["s3-bucket"]["command"][-1] == "s3/babysit"
    for port in [p for s in full.values() for p in s.get("ports", [])]:
        spec = port if isinstance(port, str) else f"{port.get('host_ip')}:{port.get('published')}"
        assert spec.startswith("127.0.0.1:"), port  # nothing leaves the host unless asked

    # Without a password the file refuses to render instead of running with none.
    (tmp_path / ".env").write_text(re.sub(r"(?m)^POSTGRES_PASSWORD=.*\n", "", env))
    bare = subprocess.run(
        [compose, "config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"},
    )
    assert bare.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in bare.stderr
