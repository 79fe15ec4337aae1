"""Beyond one machine: workers through `babysit storage-proxy`, artifacts on S3.

Real processes throughout: the proxy is `babysit storage-proxy` in a subprocess in front
of the real PostgreSQL server; the object store is moto's S3 server on 127.0.0.1, spoken
to over HTTP by boto3 exactly as AWS or MinIO would be.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import CHEAP
from conftest import cli_env
from conftest import wait_for
from optuna.trial import TrialState

from babysit.storage import open_storage

# Real processes and whole runs: `make test-slow` (CI runs it after `make test`).
pytestmark = pytest.mark.slow

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
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
FAST_HEARTBEAT = ["--heartbeat", "1", "--grace", "3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return cli_env(OMP_NUM_THREADS="1", **extra)


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


def _cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "babysit", *args],
        cwd=cwd,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _other_host_prefix() -> list[str]:
    """Another hostname, as if on another machine (needs root; else the same host)."""
    probe = subprocess.run(
        ["unshare", "--uts", "sh", "-c", "hostname otherhost"], capture_output=True
    )
    if probe.returncode != 0:
        return []
    return ["unshare", "--uts", "sh", "-c", 'hostname otherhost && exec "$@"', "sh"]


def _trials(storage: optuna.storages.BaseStorage, name: str) -> list[optuna.trial.FrozenTrial]:
    if name not in optuna.get_all_study_names(storage):
        return []
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def _postgres_sockets(pid: int, port: int = 5432) -> int:
    """TCP connections process ``pid`` holds to ``port`` (from /proc: Linux only)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if int(cols[2].rsplit(":", 1)[1], 16) == port and cols[9] in inodes:
                count += 1
    return count


PASSWORD = "pr0xy-Pa55"


@pytest.fixture
def proxy(tmp_path: Path, postgres_url: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    from sqlalchemy.engine import make_url

    # The local server trusts 127.0.0.1 and ignores the password; it must still never show.
    secret = make_url(postgres_url).set(password=PASSWORD).render_as_string(hide_password=False)
    port = _free_port()
    proc = _spawn(
        "storage-proxy", "--storage", secret, "--port", str(port), cwd=tmp_path, env=_env()
    )
    url = f"grpc://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: (
                proc.poll() is not None
                or _cli("status", "--storage", url, cwd=tmp_path).returncode == 0
            ),
            timeout=60,
            what="the storage proxy",
        )
        assert proc.poll() is None, proc.communicate()[1]
        yield url, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
    assert "storage proxy: grpc://127.0.0.1" in stdout and "***" in stdout, stdout
    assert PASSWORD not in stdout + stderr
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == 0, stderr  # Ctrl-C stops it cleanly


@pytest.mark.postgres
def test_run_and_workers_through_the_proxy_fill_each_stage_exactly(
    tmp_path: Path, postgres_url: str, proxy: tuple[str, subprocess.Popen[str]]
) -> None:
    """`babysit run` and two `babysit worker`s, all on grpc://, one of them on "another
    host" and SIGKILLed mid-search: its trial is failed by the heartbeat babysit carries
    through the proxy and replaced; every stage ends with exactly its target; `babysit
    status` reads the run through the proxy; no client holds a database connection."""
    url, proxy_proc = proxy
    shared = tmp_path / "artifacts"
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
        "final.epochs=2",
    ]
    summary = tmp_path / "summary.json"
    run = _spawn(
        "run",
        "--name",
        "p",
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
    wait_for(
        lambda: run.poll() is not None or _trials(watch, "p/sanity"), what="the run's first study"
    )
    worker_args = [
        "worker",
        "--name",
        "p",
        *FAST_HEARTBEAT,
        "--storage",
        url,
        "--artifact-dir",
        str(shared),
        "--quiet",
    ]
    worker = _spawn(*worker_args, cwd=tmp_path, env=_env())
    other_host = _other_host_prefix()
    doomed = _spawn(*worker_args, cwd=tmp_path, env=_env(), prefix=other_host)
    host = "otherhost:" if other_host else f"{os.uname().nodename}:{doomed.pid}"

    def doomed_trial() -> tuple[str, optuna.trial.FrozenTrial] | None:
        for stage in ("coarse", "fine"):
            for t in _trials(watch, f"p/{stage}"):
                if t.state == TrialState.RUNNING and t.user_attrs.get("worker", "").startswith(
                    host
                ):
                    return stage, t
        return None

    stage, victim = wait_for(doomed_trial, what="the doomed worker's search trial")
    # Every client reaches PostgreSQL only through the proxy: none holds a connection of
    # its own, the proxy holds them all.
    for proc in (run, worker, doomed):
        assert _postgres_sockets(proc.pid) == 0
    assert _postgres_sockets(proxy_proc.pid) >= 1
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate(timeout=30)

    out = {}
    for name, proc in (("run", run), ("worker", worker)):
        try:
            stdout, stderr = proc.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            run.kill()
            worker.kill()
            raise
        out[name] = (proc.returncode, stderr)
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{stderr}"
        assert "Traceback" not in stderr, stderr

    for stage_name, target in (("coarse", 6), ("fine", 3)):
        trials = _trials(watch, f"p/{stage_name}")
        assert len({t.number for t in trials}) == len(trials)
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        finished = [t for t in trials if t.state in FINISHED]
        assert len(finished) == target, [(t.number, t.state.name) for t in trials]
        assert all(t.user_attrs.get("reason") != "surplus" for t in finished)
        # Each trial that ran through the proxy carries babysit's heartbeat stamp.
        assert all("babysit:heartbeat" in t.system_attrs for t in finished)
    killed = _trials(watch, f"p/{stage}")[victim.number]
    assert killed.state == TrialState.FAIL
    assert killed.user_attrs["reason"] == ("heartbeat stale" if other_host else "worker died")
    final = [t for t in _trials(watch, "p/final") if t.state == TrialState.COMPLETE]
    assert len(final) == 1
    assert json.loads(summary.read_text())["stages"]["final"]["status"] == "passed"

    status = _cli("status", "--name", "p", "--json", "--storage", url, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    stages = json.loads(status.stdout)["stages"]
    assert stages["coarse"]["trials"] == 6 and stages["fine"]["trials"] == 3
    assert stages["final"]["status"] == "passed"
    assert proxy_proc.poll() is None


def test_proxy_heartbeat_marks_a_silent_trial_stale(tmp_path: Path) -> None:
    """Through a real proxy (Optuna's server in a thread, on SQLite): a trial with a fresh
    stamp is live, one whose stamp is older than the grace period is stale, one that never
    had a stamp is never stale (as with Optuna's RDB heartbeat)."""
    from babysit.storage.remote import HeartbeatGrpcProxy
    from babysit.storage.remote import serve_proxy

    backend = open_storage(f"sqlite:///{tmp_path / 'hb.db'}").rdb
    port = _free_port()
    server = threading.Thread(
        target=serve_proxy, args=(backend, "127.0.0.1", port, "hb"), daemon=True
    )
    server.start()
    # Grace 3 s: on the loaded test machine a stamp-and-read can take over a second.
    client = HeartbeatGrpcProxy(host="127.0.0.1", port=port, heartbeat=1, grace=3)
    client.wait_server_ready(timeout=20)
    study = optuna.create_study(study_name="hb", storage=client)
    beating, silent, unstamped = (study.ask() for _ in range(3))
    for t in (beating, silent):
        client.record_heartbeat(t._trial_id)
    assert client._get_stale_trial_ids(study._study_id) == []
    time.sleep(3.5)
    client.record_heartbeat(beating._trial_id)
    assert client._get_stale_trial_ids(study._study_id) == [silent._trial_id]
    assert client.get_heartbeat_interval() == 1
    assert unstamped._trial_id not in client._get_stale_trial_ids(study._study_id)
    client.close()


def test_a_client_rides_out_a_proxy_that_is_down_then_gives_up_plainly(tmp_path: Path) -> None:
    """A call made while no proxy listens retries; a proxy that comes up meanwhile answers
    it. One that stays down past the reconnect window is StorageLost, not a gRPC trace."""
    from babysit.storage import StorageLost
    from babysit.storage.remote import HeartbeatGrpcProxy
    from babysit.storage.remote import serve_proxy

    port = _free_port()
    gone = HeartbeatGrpcProxy(host="127.0.0.1", port=port, heartbeat=1, grace=3, reconnect=1)
    with pytest.raises(StorageLost, match="lost the storage proxy"):
        gone.get_all_studies()
    gone.close()

    backend = open_storage(f"sqlite:///{tmp_path / 'late.db'}").rdb
    optuna.create_study(study_name="late", storage=backend)
    client = HeartbeatGrpcProxy(host="127.0.0.1", port=port, heartbeat=1, grace=3, reconnect=60)
    late = threading.Timer(2.0, serve_proxy, args=(backend, "127.0.0.1", port, "late"))
    late.daemon = True
    late.start()
    t0 = time.monotonic()
    assert [s.study_name for s in client.get_all_studies()] == ["late"]
    assert time.monotonic() - t0 >= 1.5  # it did wait for the proxy
    client.close()


def test_bad_proxy_urls_and_a_busy_port_are_one_line_errors(tmp_path: Path) -> None:
    for url, says in (
        ("grpc://127.0.0.1", "grpc://HOST:PORT"),
        ("grpc://127.0.0.1:1/x", "grpc://HOST:PORT"),
        (f"grpc://127.0.0.1:{_free_port()}", "no storage proxy answers"),
    ):
        proc = _cli("status", "--storage", url, cwd=tmp_path)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    proc = _cli("storage-proxy", "--storage", "grpc://127.0.0.1:1", cwd=tmp_path)
    assert proc.returncode == 2 and "not another proxy" in proc.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _cli(
            "storage-proxy",
            "--storage",
            f"sqlite:///{tmp_path / 'b.db'}",
            "--port",
            str(port),
            cwd=tmp_path,
            timeout=60,
        )
    assert proc.returncode == 2 and "is the port in use" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------ S3

BUCKET = "babysit-test"
S3_KEYS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (real HTTP); the endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        yield endpoint
    finally:
        server.stop()


def _s3_env(endpoint: str) -> dict[str, str]:
    return _env(AWS_ENDPOINT_URL=endpoint, **S3_KEYS)


def _bucket_keys(endpoint: str) -> list[str]:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        **{
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "region_name": "us-east-1",
        },
    )
    listing = client.list_objects_v2(Bucket=BUCKET)
    return [o["Key"] for o in listing.get("Contents", [])]


def test_final_killed_on_one_host_resumes_on_another_sharing_only_db_and_bucket(
    tmp_path: Path, s3_server: str
) -> None:
    """Host A (its own working directory) trains final with artifacts on S3 and is
    SIGKILLed after a checkpoint; host B (another directory, nothing shared but the
    database file and the bucket) reruns the same command and resumes from A's
    checkpoint, read from the bucket."""
    import boto3

    boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=BUCKET)
    shared = tmp_path / "shared"
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    for d in (shared, host_a, host_b):
        d.mkdir()
    url = f"sqlite:///{shared / 'runs.db'}"
    store = f"s3://{BUCKET}/runs/team"
    epochs = 8  # a few seconds of final training to kill it in
    # Adam at up to 1e-2 diverges now and then in one epoch; this test is about the final.
    args = [
        "run",
        "--name",
        "s3",
        *FAST,
        "--set",
        "coarse.lr=[3e-4, 2e-3]",
        "--set",
        "coarse.trials=2",
        "--set",
        "coarse.extend=false",
        "--set",
        "coarse.epochs=1",
        "--set",
        "fine.trials=1",
        "--set",
        f"final.epochs={epochs}",
        "--storage",
        url,
        "--artifact-store",
        store,
    ]
    env = _s3_env(s3_server)
    first = _spawn(*args, cwd=host_a, env=env)
    watch = open_storage(url).rdb

    def checkpointed() -> dict | None:
        if first.poll() is not None:
            raise AssertionError(f"host A exited {first.returncode}:\n{first.communicate()[1]}")
        if "s3/final" not in optuna.get_all_study_names(watch):
            return None
        final = optuna.load_study(study_name="s3/final", storage=watch)
        assert not [t for t in final.trials if t.state == TrialState.COMPLETE], (
            "final finished before it could be killed; raise final.epochs"
        )
        return final.user_attrs.get("checkpoint")

    meta = wait_for(checkpointed, what="a final checkpoint on host A")
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert f"runs/team/{meta['artifact_id']}" in _bucket_keys(s3_server)

    second = _cli(*args, cwd=host_b, env=env)
    assert second.returncode == 0, second.stderr
    assert "final: resuming from the checkpoint of epoch" in second.stderr
    final = optuna.load_study(study_name="s3/final", storage=watch)
    done = [t for t in final.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 1
    assert done[0].user_attrs["resumed_from_epoch"] >= meta["epoch"] > 0
    assert done[0].user_attrs["epochs_run"] == epochs
    keys = _bucket_keys(s3_server)
    assert f"runs/team/{done[0].user_attrs['model_artifact']}" in keys
    # The model is <run>/model.pt under the bucket's prefix, its URL printed and stored; the
    # checkpoint is gone once the final passed.
    assert {"runs/team/s3/model.pt", "runs/team/s3/model.json"} <= set(keys)
    assert done[0].user_attrs["model_path"] == f"{store}/s3/model.pt"
    assert f"model: {store}/s3/model.pt " in second.stderr
    assert not [k for k in keys if "-final-epoch" in k]
    assert all(k.startswith("runs/team/") for k in keys)
    # Nothing went to a local artifact folder on either host.
    for d in (shared, host_a, host_b):
        assert not [p for p in d.rglob("*artifacts*")], list(d.rglob("*"))

    # A bucket that does not exist is one line, exit 2, before anything is trained.
    bad = _cli(
        "status",
        "--storage",
        url,
        "--artifact-store",
        "s3://no-such-bucket/x",
        cwd=host_b,
        env=env,
    )
    assert bad.returncode == 2 and "no-such-bucket" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
