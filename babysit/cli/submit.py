"""`babysit submit`: the run and N workers as Slurm jobs, through submitit.

One job runs `babysit run`, a job array runs N `babysit worker`s, all on one storage (by
default a journal file in the submit folder, which must be on a disk every node shares).
Each job is a :class:`BabysitJob`: submitit's process on the node starts the `babysit`
command as a child and waits for it. When Slurm is about to preempt the job or stop it at
its time limit it sends SIGUSR2 (submitit asks for it ``--signal=USR2@90``); submitit
calls :meth:`BabysitJob.checkpoint`, which stops the child with SIGTERM, so the running
trial is stored FAIL with ``reason=interrupted`` exactly as after Ctrl-C, and hands
submitit the same job to requeue. The requeued job starts the same command again, which
goes on where the stored run stands; the trial it lost is run again by whichever process
gets there first.

submitit's local executor runs the same jobs as local processes (one machine, and the
tests), through the same code path; ``--dry-run`` prints the jobs and the sbatch script
and submits nothing. No torch here: the job's child imports it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from babysit.errors import UsageError

# How long a stopped child may take to store its trial and exit before it is killed: well
# inside submitit's default warning of 90 s before Slurm's own kill.
STOP_GRACE_S = 60
# submitit's default: Slurm sends SIGUSR2 this many seconds before it kills the job.
SIGNAL_DELAY_S = 90
_POLL_S = 0.5


def _ignore_usr2() -> None:
    # Slurm may signal every process of the job step: the child leaves SIGUSR2 (whose
    # default would kill it mid-trial, unrecorded) to submitit's process, which stops it
    # with SIGTERM.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class BabysitJob:
    """One `babysit` command as a checkpointable submitit job."""

    def __init__(self, argv: list[str], wait_for_run: str | None = None) -> None:
        self.argv = list(argv)
        # A worker's run: the worker waits until the run's spec is stored (the run's job
        # may start after the workers').
        self.wait_for_run = wait_for_run
        self._child: subprocess.Popen[bytes] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_child"] = None
        return state

    def __call__(self) -> int:
        if self.wait_for_run is not None:
            _wait_for_run(self.argv, self.wait_for_run)
        command = [sys.executable, "-m", "babysit", *self.argv]
        print(f"babysit job: {shlex.join(command)}", file=sys.stderr, flush=True)
        self._child = subprocess.Popen(command, preexec_fn=_ignore_usr2)
        # poll, not wait(): submitit's signal handler runs in this thread and stops the
        # child itself, and Popen.wait() holds a lock a second wait() would block on.
        while (code := self._child.poll()) is None:
            time.sleep(_POLL_S)
        if code != 0:
            raise RuntimeError(f"babysit {self.argv[0]} exited {code}")
        return code

    def checkpoint(self) -> Any:
        """submitit calls this on SIGUSR2 (preemption or the time limit): stop the child so
        its trial is stored as interrupted, and return the same job for the requeue."""
        from submitit.helpers import DelayedSubmission

        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(_POLL_S)
            if child.poll() is None:
                child.kill()
        print(
            f"babysit job: babysit {self.argv[0]} stopped for a requeue "
            f"(exit {child.returncode if child else None})",
            file=sys.stderr,
            flush=True,
        )
        return DelayedSubmission(BabysitJob(self.argv, self.wait_for_run))


def _flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def _wait_for_run(argv: list[str], run: str, every: float = 2.0) -> None:
    """Until the run's spec is in the storage: a worker started before its run's job."""
    from babysit.record.stored import stored_spec
    from babysit.storage import open_storage

    said = 0.0
    while True:
        try:
            storage = open_storage(
                _flag_value(argv, "--storage"),
                _flag_value(argv, "--artifact-dir"),
                create=False,
                artifact_store=_flag_value(argv, "--artifact-store"),
            )
            stored_spec(storage, run)
            return
        except UsageError as err:
            if time.monotonic() - said > 60:
                print(f"babysit job: waiting for run {run}: {err}", file=sys.stderr, flush=True)
                said = time.monotonic()
        time.sleep(every)


# ---------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """What `babysit submit` submits: the storage, the two commands, the resources."""

    name: str
    storage: str
    folder: Path
    run_argv: list[str]
    worker_argv: list[str]
    workers: int
    executor: str
    partition: str | None
    time_min: int
    gpus: int
    cpus: int


def _abs(value: Any) -> str:
    return str(Path(value).expanduser().resolve())


def _common(args: argparse.Namespace, storage: str) -> list[str]:
    """The flags a run and its workers share: the storage, the artifacts, the device."""
    out = ["--storage", storage]
    if args.artifact_dir:
        out += ["--artifact-dir", _abs(args.artifact_dir)]
    if args.artifact_store:
        out += ["--artifact-store", args.artifact_store]
    for flag, value in (("--heartbeat", args.heartbeat), ("--grace", args.grace)):
        if value is not None:
            out += [flag, str(value)]
    out += ["--device", args.device]
    if args.data_dir:
        out += ["--data-dir", _abs(args.data_dir)]
    if args.final_procs != 1:
        out += ["--final-procs", str(args.final_procs)]
    for flag in ("quiet", "compile"):
        if getattr(args, flag):
            out.append(f"--{flag}")
    return out


def _run_argv(args: argparse.Namespace, name: str, storage: str) -> list[str]:
    argv = ["run", "--name", name]
    if args.config:
        argv += ["--config", _abs(args.config)]
    for flag in ("dataset", "model", "optimizer", "seed"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag}", str(value)]
    for item in args.sets:
        argv += ["--set", item]
    if args.summary_json:
        argv += ["--summary-json", _abs(args.summary_json)]
    for flag in ("download", "offline", "force"):
        if getattr(args, flag):
            argv.append(f"--{flag}")
    if args.jobs != 1:
        argv += ["--jobs", str(args.jobs)]
    return argv + _common(args, storage)


def plan(args: argparse.Namespace, name: str) -> Plan:
    """The jobs `babysit submit` would submit; bad flags are a UsageError."""
    import importlib.util

    from babysit.storage.url import is_journal
    from babysit.storage.url import journal_path

    if importlib.util.find_spec("submitit") is None:
        raise UsageError("babysit submit needs submitit: pip install 'babysit[slurm]'")
    for flag, value, least in (
        ("--workers", args.workers, 0),
        ("--time", args.time, 1),
        ("--gpus", args.gpus, 0),
        ("--cpus", args.cpus, 1),
    ):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    folder = Path(args.folder).expanduser().resolve()
    storage = args.storage or os.environ.get("BABYSIT_STORAGE")
    if not storage:
        # The default: a journal file on the shared disk, beside the jobs' logs.
        storage = f"journal://{folder / (name + '.journal')}"
    elif is_journal(storage):
        # The jobs start elsewhere: a relative journal path is made absolute here.
        storage = f"journal://{journal_path(storage).expanduser().resolve()}"
    elif not storage.startswith("grpc://"):
        from babysit.storage.open import check_url

        check_url(storage)  # a URL the jobs could not open is refused before they start
    if storage.startswith("sqlite:"):
        print(
            "babysit: warning: an SQLite file shared by jobs on several nodes fails on most "
            "network file systems; prefer journal:///shared/path/run.journal",
            file=sys.stderr,
        )
    worker = ["worker", "--name", name, *_common(args, storage)]
    return Plan(
        name=name,
        storage=storage,
        folder=folder,
        run_argv=_run_argv(args, name, storage),
        worker_argv=worker,
        workers=args.workers,
        executor=args.executor,
        partition=args.partition,
        time_min=args.time,
        gpus=args.gpus,
        cpus=args.cpus,
    )


def slurm_parameters(p: Plan, what: str) -> dict[str, Any]:
    """SlurmExecutor's parameters (sbatch's names) of one kind of job, "run" or "worker"."""
    params: dict[str, Any] = {
        "job_name": f"babysit-{p.name}-{what}",
        "time": p.time_min,
        "cpus_per_task": p.cpus,
        "signal_delay_s": SIGNAL_DELAY_S,
        # A preempted job goes back to the queue, not away.
        "additional_parameters": {"requeue": True},
        "array_parallelism": max(p.workers, 1),
    }
    if p.gpus:
        params["gpus_per_node"] = p.gpus
    if p.partition:
        params["partition"] = p.partition
    return params


# ---------------------------------------------------------------------------- submitting


def check_executor(p: Plan) -> None:
    """UsageError unless the executor can run here: Slurm needs its commands (srun)."""
    if p.executor == "slurm":
        from submitit import SlurmExecutor

        if SlurmExecutor.affinity() <= 0:
            raise UsageError(
                "no Slurm on this machine (srun not found); submit from the cluster's login "
                "node, or use --executor local (this machine) or --dry-run"
            )


def _executor(p: Plan, what: str, run_id: str | None = None) -> Any:
    if p.executor == "local":
        from submitit import LocalExecutor

        local = LocalExecutor(folder=p.folder)
        local.update_parameters(timeout_min=p.time_min, gpus_per_node=p.gpus)
        return local
    from submitit import SlurmExecutor

    check_executor(p)
    slurm = SlurmExecutor(folder=p.folder)
    params = slurm_parameters(p, what)
    if run_id is not None:
        # Workers start once the run's job has started; they wait for its spec.
        params["additional_parameters"]["dependency"] = f"after:{run_id}"
    slurm.update_parameters(**params)
    return slurm


def submit(p: Plan, wait: bool) -> int:
    """Submit the run's job and the workers' array; with ``wait``, wait for all of them."""
    p.folder.mkdir(parents=True, exist_ok=True)
    run_job = _executor(p, "run").submit(BabysitJob(p.run_argv))
    jobs = [("run", run_job)]
    if p.workers:
        executor = _executor(p, "worker", run_id=run_job.job_id)
        with executor.batch():
            workers = [
                executor.submit(BabysitJob(p.worker_argv, wait_for_run=p.name))
                for _ in range(p.workers)
            ]
        jobs += [(f"worker {i}", job) for i, job in enumerate(workers)]
    ids = ", ".join(f"{what} {job.job_id}" for what, job in jobs)
    print(
        f"submitted run {p.name}: {ids}; storage {p.storage}; logs in {p.folder}",
        file=sys.stderr,
        flush=True,
    )
    if not wait:
        return 0
    failed = 0
    for what, job in jobs:
        try:
            job.result()
        except Exception as err:  # noqa: BLE001 - submitit's FailedJobError and kin
            failed += 1
            last = str(err).strip().splitlines()
            print(
                f"babysit: {what} job {job.job_id} failed: {last[-1] if last else err}; "
                f"its log: {job.paths.stderr}",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"{what} job {job.job_id} done", file=sys.stderr, flush=True)
    return 1 if failed else 0


def dry_run(p: Plan) -> str:
    """The jobs and the sbatch scripts `submit` would hand Slurm, made without Slurm."""
    from submitit.slurm.slurm import _make_sbatch_string

    python = shlex.quote(sys.executable)
    command = f"{python} -u -m submitit.core._submit {shlex.quote(str(p.folder))}"
    lines = [
        f"run {p.name}: 1 run job and {p.workers} worker job(s) on {p.executor}",
        f"storage: {p.storage}",
        f"folder: {p.folder} (the jobs' logs and submitit's files; on the shared disk)",
        "",
        f"run job: babysit {shlex.join(p.run_argv)}",
    ]
    if p.workers:
        lines.append(f"worker jobs (array of {p.workers}): babysit {shlex.join(p.worker_argv)}")
    for what in ("run", "worker") if p.workers else ("run",):
        params = slurm_parameters(p, what)
        if what == "worker":
            params["additional_parameters"]["dependency"] = "after:RUN_JOB_ID"
            params["map_count"] = p.workers  # what submitit sets for a job array
        text = _make_sbatch_string(command=command, folder=p.folder, **params)
        lines += ["", f"# sbatch script of the {what} job{'s' if what == 'worker' else ''}", text]
    return "\n".join(lines)
