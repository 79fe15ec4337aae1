"""`babysit submit`: the run and its workers as jobs through submitit.

The sbatch scripts are made as Slurm would get them (no Slurm here: `--dry-run` builds them
with submitit's own script writer). The whole protocol runs through submitit's local
executor, real processes on the same code path as on Slurm: the worker job preempted
mid-trial gets SIGUSR2 as Slurm sends it, stores its trial as interrupted and is requeued.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import CHEAP
from conftest import babysit
from conftest import cli_env
from conftest import wait_for
from optuna.trial import TrialState

from babysit.storage import open_storage

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _sbatch(text: str, which: str) -> dict[str, str]:
    """The #SBATCH flags of the script headed '# sbatch script of the <which> job(s)'."""
    script = text.split(f"# sbatch script of the {which}")[1].split("# sbatch script of")[0]
    flags = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line.removeprefix("#SBATCH --").partition("=")
            flags[key] = value
    assert "srun" in script and "-m submitit.core._submit" in script
    return flags


def test_dry_run_prints_the_jobs_and_their_sbatch_scripts_and_touches_nothing(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "shared" / "jobs"
    proc = babysit(
        "submit",
        "--dataset",
        "digits",
        "--name",
        "d1",
        "--set",
        "coarse.trials=12",
        "--workers",
        "3",
        "--partition",
        "gpu",
        "--time",
        "240",
        "--gpus",
        "1",
        "--cpus",
        "8",
        "--folder",
        str(folder),
        "--dry-run",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    journal = f"journal://{folder / 'd1.journal'}"
    assert f"storage: {journal}" in out
    assert (
        f"run job: babysit run --name d1 --dataset digits --set coarse.trials=12 "
        f"--storage {journal} --device auto" in out
    )
    assert (
        f"worker jobs (array of 3): babysit worker --name d1 --storage {journal} "
        "--device auto" in out
    )
    run = _sbatch(out, "run job")
    workers = _sbatch(out, "worker jobs")
    for flags in (run, workers):
        assert flags["partition"] == "gpu"
        assert flags["time"] == "240"
        assert flags["gpus-per-node"] == "1"
        assert flags["cpus-per-task"] == "8"
        # Slurm warns 90 s ahead with SIGUSR2 (submitit's checkpoint) and requeues.
        assert flags["signal"] == "USR2@90"
        assert "requeue" in flags
        assert flags["output"].startswith(str(folder))
    assert run["job-name"] == "babysit-d1-run" and "array" not in run
    assert workers["job-name"] == "babysit-d1-worker"
    assert workers["array"] == "0-2%3"
    assert workers["dependency"] == "after:RUN_JOB_ID"
    assert not folder.exists() and list(tmp_path.iterdir()) == []


def test_dry_run_keeps_a_given_storage_and_makes_a_journal_path_absolute(
    tmp_path: Path,
) -> None:
    given = babysit(
        "submit",
        "--dataset",
        "digits",
        "--storage",
        "postgresql+psycopg://me@db/babysit",
        "--dry-run",
        cwd=tmp_path,
    )
    assert given.returncode == 0, given.stderr
    assert "--storage postgresql+psycopg://me@db/babysit" in given.stdout
    relative = babysit(
        "submit",
        "--dataset",
        "digits",
        "--workers",
        "0",
        "--dry-run",
        cwd=tmp_path,
        env=cli_env(BABYSIT_STORAGE="journal://runs/x.journal"),
    )
    assert relative.returncode == 0, relative.stderr
    assert f"storage: journal://{tmp_path.resolve() / 'runs' / 'x.journal'}" in relative.stdout
    assert "worker jobs" not in relative.stdout and "# sbatch script of the worker" not in (
        relative.stdout
    )


def test_the_dry_run_scripts_are_what_submitits_slurm_executor_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The executors `submit` hands the jobs to, on a machine that looks like Slurm's (no
    sbatch is run): their sbatch scripts are the dry run's, word for word."""
    from submitit import SlurmExecutor

    from babysit.cli import submit
    from babysit.cli.parser import build_parser

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    args = build_parser().parse_args(
        [
            "submit",
            "--dataset",
            "digits",
            "--name",
            "d2",
            "--workers",
            "2",
            "--partition",
            "gpu",
            "--gpus",
            "2",
            "--time",
            "30",
            "--folder",
            str(tmp_path / "jobs"),
        ]
    )
    plan = submit.plan(args, "d2")
    dry = submit.dry_run(plan)
    run = submit._executor(plan, "run")
    workers = submit._executor(plan, "worker", run_id="4242")
    assert isinstance(run, SlurmExecutor) and isinstance(workers, SlurmExecutor)
    run_script = run._make_submission_file_text(run._submitit_command_str, "uid")
    workers.parameters["map_count"] = 2  # what submitit sets when it submits the array
    array_script = workers._make_submission_file_text(workers._submitit_command_str, "uid")
    assert "#SBATCH --gpus-per-node=2" in run_script and "#SBATCH --array=0-1%2" in array_script
    assert run_script in dry
    assert "#SBATCH --dependency=after:4242" in array_script
    assert array_script.replace("after:4242", "after:RUN_JOB_ID") in dry


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (("--workers", "-1"), "--workers must be at least 0"),
        (("--time", "0"), "--time must be at least 1"),
        (("--cpus", "0"), "--cpus must be at least 1"),
        (("--set", "coarse.trials=-3"), "coarse.trials"),
        ((), "no Slurm on this machine"),  # a real submission, and no srun here
    ],
)
def test_bad_submit_input_is_one_line_exit_2_and_creates_nothing(
    tmp_path: Path, flags: tuple[str, ...], words: str
) -> None:
    proc = babysit("submit", "--dataset", "digits", *flags, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr
    assert list(tmp_path.iterdir()) == []


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rpartition(")")[2].split()[1])


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return [a.decode() for a in fh.read().split(b"\0") if a]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three job processes and a requeue on 2 cores
def test_submit_through_the_local_executor_runs_the_protocol_and_requeues_a_preempted_worker(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "jobs"
    budget = [
        *CHEAP,
        "--set",
        "coarse.trials=6",
        "--set",
        "coarse.epochs=2",
        "--set",
        "coarse.lr=[1e-3, 1e-2]",
        "--set",
        "coarse.extend=false",
        "--set",
        'coarse.pruner="none"',
        "--set",
        "fine.trials=3",
        "--set",
        "fine.epochs=1",
        "--set",
        "final.epochs=2",
        "--quiet",
    ]
    submit = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "babysit",
            "submit",
            "--executor",
            "local",
            "--wait",
            "--workers",
            "2",
            "--time",
            "20",
            "--folder",
            str(folder),
            "--name",
            "sl",
            "--dataset",
            "digits",
            "--heartbeat",
            "1",
            "--grace",
            "3",
            *budget,
        ],
        cwd=tmp_path,
        env=cli_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    path = folder / "sl.journal"
    wait_for(path.exists, what="the journal file")
    watch = open_storage(f"journal://{path}", create=False).rdb

    def a_worker_jobs_trial() -> tuple[str, optuna.trial.FrozenTrial, int] | None:
        for stage in ("coarse", "fine"):
            name = f"sl/{stage}"
            if name not in optuna.get_all_study_names(watch):
                continue
            for t in optuna.load_study(study_name=name, storage=watch).get_trials():
                owner = t.user_attrs.get("worker", "")
                if t.state != TrialState.RUNNING or not owner:
                    continue
                if stage == "coarse" and t.intermediate_values:
                    # In its second (last) epoch: it could end before the stop reaches it.
                    # In its first, a whole epoch is left, longer than the signal's path.
                    continue
                pid = int(owner.rpartition(":")[2])
                try:
                    if "worker" in _cmdline(pid):  # a worker job's `babysit worker`
                        return stage, t, _parent(pid)  # submitit's process of the job
                except (OSError, ValueError):
                    continue
        return None

    stage, victim, task = wait_for(a_worker_jobs_trial, what="a worker job's trial")
    assert "submitit.core._submit" in " ".join(_cmdline(task))
    job_id = str(_parent(task))  # the local job's id is its controller's pid
    os.kill(task, signal.SIGUSR2)  # what Slurm sends before a preemption or the time limit

    stdout, stderr = submit.communicate(timeout=600)
    assert submit.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert stderr.count(" done") == 3, stderr

    stored = open_storage(f"journal://{path}", create=False).rdb

    def trials(stage: str) -> list[optuna.trial.FrozenTrial]:
        return optuna.load_study(study_name=f"sl/{stage}", storage=stored).get_trials()

    def live(ts: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
        return [t for t in ts if t.user_attrs.get("reason") != "surplus"]

    for name, target in (("sanity", 1), ("overfit", 1), ("coarse", 6), ("fine", 3)):
        ts = trials(name)
        assert not [t for t in ts if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        assert len([t for t in live(ts) if t.state in FINISHED]) == target, name
    final = trials("final")
    assert len([t for t in final if t.state == TrialState.COMPLETE]) == 1
    assert len(live(final)) == 1
    # The trial the stop reached: the one seen running, or (a fine trial ending just as the
    # signal came) the job's next one; stored as interrupted, and redone by someone.
    stopped = [
        (name, t)
        for name in ("coarse", "fine")
        for t in trials(name)
        if t.user_attrs.get("reason") == "interrupted"
    ]
    assert len(stopped) == 1, stopped
    name, killed = stopped[0]
    assert killed.state == TrialState.FAIL
    assert (name, killed.number) == (stage, victim.number) or stage == "fine"
    hit = trials(name)
    assert any(t.number > killed.number and t.state in FINISHED for t in live(hit))  # redone

    # The preempted job was requeued: its log shows the stop, then the command again.
    log = "".join(p.read_text() for p in folder.glob(f"{job_id}_*_log.err"))
    assert "stopped for a requeue" in log, log
    assert (
        "stopped for a requeue"
        in log.split(f"-m babysit worker --name sl --storage journal://{path}")[-2]
    )
    assert log.count(f"-m babysit worker --name sl --storage journal://{path}") == 2, log
