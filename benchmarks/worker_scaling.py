"""How a search stage scales with worker processes on PostgreSQL.

    python benchmarks/worker_scaling.py                       # 64 trials of 1 s, 1/2/4/8 workers
    python benchmarks/worker_scaling.py --workers 1,8 --trials 32 --seconds 0.5
    python benchmarks/worker_scaling.py --storage postgresql+psycopg://user@host/db
    python benchmarks/worker_scaling.py --workers 8,32 --via direct,proxy   # the gRPC proxy

Each trial is a stand-in that sleeps a fixed time instead of training, so the machine's
cores do not limit the scaling and what is left is the coordination: every worker runs
babysit's own search loop (``babysit.parallel.coordination.fill``: reclaim, count, ask Optuna for a
trial) and every trial starts with babysit's claim rule (``babysit.parallel.coordination.claim``: count
the live trials numbered before it, close itself as surplus past the target), on one
shared Optuna RDBStorage with heartbeats, as ``babysit worker`` does.

For each worker count: a fresh study; N processes started and given a common start time
once all have imported babysit (so interpreter and torch start-up are not counted); then

  stage filled   start -> the last trial completed (what a run waits for)
  all exited     start -> the last worker returned (it polls once a second at the end)
  ideal          ceil(trials / N) x seconds
  overhead/trial (stage filled x N - trials x seconds) / trials: a worker's time per trial
                 spent on anything but the trial itself

  connections    the most connections PostgreSQL showed for the database meanwhile
                 (pg_stat_activity, sampled every 0.2 s; the benchmark's own process holds
                 none while the workers run)

and checks the stage: exactly ``trials`` finished, no number twice. ``--via proxy`` puts a
`babysit storage-proxy` subprocess between the workers and PostgreSQL: the workers open
grpc://127.0.0.1:PORT (with babysit's heartbeat through the proxy) and only the proxy
holds database connections. Without --storage it
creates a database on the local server (postgresql+psycopg://postgres@127.0.0.1:5432) and
drops it afterwards. Every worker count is bounded by --timeout; the script always ends.
"""

from __future__ import annotations

import argparse
import datetime
import math
import multiprocessing as mp
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOCAL_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"


def _worker(
    url: str,
    name: str,
    target: int,
    seconds: float,
    heartbeat: int,
    grace: int,
    ready: mp.Queue,
    start: mp.Value,
    done: mp.Queue,
) -> None:
    import random

    import optuna

    from babysit.parallel.coordination import claim
    from babysit.parallel.coordination import fill
    from babysit.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url, heartbeat=heartbeat, grace=grace)
    study = optuna.load_study(
        study_name=name,
        storage=storage.rdb,
        sampler=optuna.samplers.RandomSampler(seed=os.getpid()),
    )

    def objective(trial: optuna.Trial) -> float:
        claim(study, trial, target, "coarse")
        trial.suggest_float("lr", 1e-5, 1.0, log=True)
        trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
        time.sleep(seconds)
        return random.random()

    ready.put(os.getpid())
    while start.value == 0.0:
        time.sleep(0.005)
    delay = start.value - time.time()
    if delay > 0:
        time.sleep(delay)
    fill(study, target, objective)
    done.put(time.time())


def _connections(database: str, stop: threading.Event, peak: list[int]) -> None:
    """The most connections to ``database`` seen until ``stop``, into peak[0]."""
    import psycopg

    with psycopg.connect(
        host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True
    ) as admin:
        while not stop.wait(0.2):
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)
            ).fetchone()
            peak[0] = max(peak[0], int(row[0]))


def _start_proxy(url: str) -> tuple[str, subprocess.Popen]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "babysit", "storage-proxy", "--storage", url, "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # "storage proxy: grpc://..." once it listens
    if not line.startswith("storage proxy:"):
        proc.kill()
        raise RuntimeError(f"the storage proxy did not start: {line}{proc.stderr.read()}")
    return f"grpc://127.0.0.1:{port}", proc


def _stop_proxy(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _measure(
    url: str,
    workers: int,
    trials: int,
    seconds: float,
    heartbeat: int,
    grace: int,
    timeout: float,
    via: str = "direct",
) -> dict[str, float]:
    import optuna
    from optuna.trial import TrialState
    from sqlalchemy.engine import make_url

    from babysit.storage import open_storage

    name = f"bench-{workers}-{secrets.token_hex(3)}/coarse"
    storage = open_storage(url, heartbeat=heartbeat, grace=grace)
    optuna.create_study(study_name=name, storage=storage.rdb, direction="maximize")
    storage.rdb.engine.dispose()  # this process holds no connection while workers run
    proxy = None
    client_url = url
    if via == "proxy":
        client_url, proxy = _start_proxy(url)
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(
        target=_connections, args=(make_url(url).database, stop, peak), daemon=True
    )
    sampler.start()
    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Queue()
    start = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(
            target=_worker,
            args=(client_url, name, trials, seconds, heartbeat, grace, ready, start, done),
        )
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    # Start-up (importing torch in N processes on a loaded machine) gets its own bound,
    # so --timeout bounds the measured part alone.
    deadline = time.monotonic() + max(timeout, 30.0 * workers)
    try:
        for _ in procs:
            ready.get(timeout=max(1.0, deadline - time.monotonic()))
        deadline = time.monotonic() + timeout
        t0 = time.time() + 0.5
        start.value = t0
        exits = [done.get(timeout=max(1.0, deadline - time.monotonic())) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join()
        stop.set()
        sampler.join()
        if proxy is not None:
            _stop_proxy(proxy)
    study = optuna.load_study(study_name=name, storage=storage.rdb)
    all_trials = study.get_trials(deepcopy=False)
    finished = [t for t in all_trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    surplus = [t for t in all_trials if t.user_attrs.get("reason") == "surplus"]
    assert len(finished) == trials, f"{len(finished)} trials finished, expected {trials}"
    assert len({t.number for t in all_trials}) == len(all_trials), "a trial number twice"
    filled = max(t.datetime_complete.timestamp() for t in finished) - t0
    optuna.delete_study(study_name=name, storage=storage.rdb)
    return {
        "workers": workers,
        "via": via,
        "connections": peak[0],
        "filled": filled,
        "exited": max(exits) - t0,
        "ideal": math.ceil(trials / workers) * seconds,
        "overhead": (filled * workers - trials * seconds) / trials,
        "surplus": len(surplus),
    }


def _scratch_database() -> tuple[str, str]:
    import psycopg

    name = f"babysit_bench_{secrets.token_hex(4)}"
    with psycopg.connect(
        host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True
    ) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return f"{LOCAL_SERVER}/{name}", name


def _drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(
        host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True
    ) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--storage",
        help="a PostgreSQL URL (default: a scratch database on "
        "the local server, dropped afterwards)",
    )
    parser.add_argument("--workers", default="1,2,4,8", help="comma-separated worker counts")
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=1.0, help="each stand-in trial")
    parser.add_argument("--heartbeat", type=int, default=10, help="babysit's default")
    parser.add_argument("--grace", type=int, default=60, help="babysit's default")
    parser.add_argument("--timeout", type=float, default=180, help="per worker count")
    parser.add_argument(
        "--via",
        default="direct",
        help="direct, proxy or both "
        "(direct,proxy): workers on PostgreSQL or through babysit storage-proxy",
    )
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    vias = args.via.split(",")
    if set(vias) - {"direct", "proxy"}:
        parser.error("--via takes direct, proxy or direct,proxy")

    import optuna

    from babysit.storage import redact

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    scratch = None
    url = args.storage
    if url is None:
        url, scratch = _scratch_database()
    rows = []
    try:
        for n in counts:
            # Side by side per worker count, so a change in the machine's load hits both.
            for via in vias:
                row = _measure(
                    url,
                    n,
                    args.trials,
                    args.seconds,
                    args.heartbeat,
                    args.grace,
                    args.timeout,
                    via,
                )
                rows.append(row)
                print(
                    f"{n} workers {via}: stage filled in {row['filled']:.2f} s, "
                    f"{row['connections']} connections",
                    file=sys.stderr,
                )
    finally:
        if scratch is not None:
            _drop_database(scratch)

    import sqlalchemy

    print(
        f"{args.trials} trials of {args.seconds:g} s on {redact(url)}, heartbeat "
        f"{args.heartbeat} s\n"
    )
    print(
        "| workers | via | stage filled (s) | trials/s | all exited (s) | ideal (s) | "
        "speed-up | overhead per trial (ms) | surplus trials | DB connections (peak) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    # Speed-up against the first row of the same kind (direct or proxy).
    bases = {}
    for r in rows:
        bases.setdefault(r["via"], r["filled"] * r["workers"])
    for r in rows:
        base = bases[r["via"]]
        print(
            f"| {r['workers']} | {r['via']} | {r['filled']:.2f} | "
            f"{args.trials / r['filled']:.2f} | {r['exited']:.2f} | {r['ideal']:.1f} | "
            f"{base / r['filled']:.2f}x | {1000 * r['overhead']:.0f} | {r['surplus']} | "
            f"{r['connections']} |"
        )
    print()
    print(f"- date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(
        f"- machine: {platform.machine()}, os.cpu_count() = {os.cpu_count()}, load average "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    print(
        f"- Python {platform.python_version()}, optuna {optuna.__version__}, "
        f"SQLAlchemy {sqlalchemy.__version__}"
    )
    print(f"- command: python benchmarks/worker_scaling.py {' '.join(argv or sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
