"""Trials across processes: exactly N finished trials per stage, however many processes fill it.

Every process that can reach the storage may run any stage's trials at once; they agree
through the database alone. A search stage asks Optuna for trials until it holds its target
of finished ones; each trial first counts the live trials numbered before it and closes
itself untrained ("surplus") when the stage is already full (:func:`claim`, :func:`fill`).
A single-trial stage (sanity, each overfit LR, final) enqueues its trial WAITING under a key
and the lowest number holding that key wins (:func:`fixed_trial`). A trial whose process
died is failed with the reason written down (:func:`reclaim`), and its stage tops itself up.

What it needs of Optuna's private attributes, log lines and messages it reads through
babysit/storage/private.py, the one place outside the storage implementations that reads
them.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from typing import Any
from typing import Literal
from typing import overload

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from babysit.errors import raise_if_interrupted
from babysit.memory import release
from babysit.parallel.interrupts import marking_interrupts
from babysit.schema import FINISHED
from babysit.schema import Reason
from babysit.schema import StudyKey
from babysit.schema import TrialKey
from babysit.schema import counts
from babysit.storage import StorageLost
from babysit.storage import StorageRefused
from babysit.storage.private import OPTIMIZE_LOGGER
from babysit.storage.private import heartbeat_on
from babysit.storage.private import orphaned_trial_ids
from babysit.storage.private import stale_trial_ids
from babysit.storage.private import storage_of
from babysit.storage.private import told_a_failed_trial
from babysit.storage.private import trial_id
from babysit.storage.private import trial_number
from babysit.terminal import plural

ACTIVE = (TrialState.RUNNING, TrialState.WAITING)
_POLL_SECONDS = 1.0


# ---------------------------------------------------------------------------- process-wide


class _Surplus(Exception):
    """This trial was asked for after its stage had filled up; it is closed untrained."""


class _QuietSurplus(logging.Filter):
    """Optuna logs a trial closed by an exception as a failure, traceback and all; a surplus
    trial is closed on purpose, and its traceback on every worker would read like a crash."""

    def __init__(self) -> None:
        super().__init__()
        self._numbers: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        number = trial_number(record)
        if record.exc_info and isinstance(record.exc_info[1], _Surplus):
            self._numbers.add(number)
            return False
        if number in self._numbers and "failed with value" in record.getMessage():
            self._numbers.discard(number)
            return False
        return True


def quiet_optuna() -> None:
    """babysit's changes to Optuna's process-wide logging and warnings, all of them, in one
    place; called by the entry points (the CLI, ``protocol.prepare``), never on import.

    Optuna's INFO lines (a study created, each trial's value) would bury the verdicts; its
    ExperimentalWarning (artifacts, heartbeats) says nothing a user can act on; a surplus
    trial's traceback reads like a crash (:class:`_QuietSurplus`). Calling it twice changes
    nothing more.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logger = logging.getLogger(OPTIMIZE_LOGGER)
    if not any(isinstance(f, _QuietSurplus) for f in logger.filters):
        logger.addFilter(_QuietSurplus())


# ---------------------------------------------------------------------------- studies


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------------------- dead workers


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed process its parent has not reaped yet (a `--jobs` helper, a worker under a
    # supervisor) is a zombie: it answers signal 0 but will never write again.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def reclaim(study: optuna.Study) -> None:
    """Mark FAIL the RUNNING trials whose worker is gone.

    Optuna's heartbeat covers every host once the grace period passes; a dead process on
    this very host is recognised at once by its pid, so a rerun after a kill goes on
    without waiting out the grace period. Each failed trial says why in its "reason".
    """
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(TrialKey.WORKER, "")
        owner_host, _, pid = owner.rpartition(":")
        if owner_host == host and pid.isdigit() and int(pid) != os.getpid():
            if not _pid_alive(int(pid)):
                _fail(study, trial_id(t), "worker died")
    # What optuna.storages.fail_stale_trials does, with the reason written down first.
    if heartbeat_on(study):
        for tid in stale_trial_ids(study):
            _fail(study, tid, "heartbeat stale")
        for tid in orphaned_trial_ids(study):
            _fail(study, tid, "no heartbeat")


def _fail(study: optuna.Study, tid: int, reason: str) -> None:
    storage = storage_of(study)
    try:
        storage.set_trial_user_attr(tid, TrialKey.REASON, reason)
        storage.set_trial_state_values(tid, state=TrialState.FAIL)
    except RuntimeError:
        pass  # finished meanwhile, or another process failed it first


# ---------------------------------------------------------------------------- running trials


def _start_trial(trial: optuna.Trial, stage: str) -> None:
    trial.set_user_attr(TrialKey.STAGE, stage)
    trial.set_user_attr(TrialKey.WORKER, worker_id())


def _surplus(trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr(TrialKey.REASON, Reason.SURPLUS)
    trial.set_user_attr(TrialKey.NOTE, reason)
    raise _Surplus(reason)


def _run_one(study: optuna.Study, objective: Callable[[optuna.Trial], float]) -> None:
    try:
        study.optimize(marking_interrupts(objective), n_trials=1, catch=(_Surplus,))
    except Exception as err:
        # Optuna buries a lost database under its own post-processing errors; say it plainly.
        cause: BaseException | None = err
        while cause is not None:
            if isinstance(cause, (StorageLost, StorageRefused)):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        if told_a_failed_trial(err):
            # Its heartbeat went stale (a long database outage) and another worker failed it
            # and runs a replacement; this process carries on with the next trial.
            return
        raise
    finally:
        release()
    raise_if_interrupted()


def planned_target(study: optuna.Study, target: int) -> int:
    """The stage's target: the one stored on the study (``target``, a --budget plan, which
    shrinks when the stage's time is up) when there is one, else ``target``."""
    stored = study.user_attrs.get(StudyKey.TARGET)
    return int(stored) if stored is not None else target


def _time_up(study: optuna.Study, earlier: int) -> str | None:
    """Why a trial may not start: its stage's stored ``deadline`` is nearer than the most a
    trial may cost (``trial_cost``). A stage's first trial always starts."""
    attrs = study.user_attrs
    deadline, cost = attrs.get(StudyKey.DEADLINE), attrs.get(StudyKey.TRIAL_COST)
    if deadline is None or cost is None or earlier == 0:
        return None
    left = float(deadline) - time.time()
    if left >= float(cost):
        return None
    return f"{max(0.0, left):.0f} s of the stage's time left, a trial may take {float(cost):.0f} s"


def claim(study: optuna.Study, trial: optuna.Trial, target: int, stage: str) -> None:
    """The first thing a search trial does: go ahead only while fewer than ``target`` trials
    numbered before it are live (not FAIL); otherwise close itself untrained as surplus.

    Trial numbers come from the database, so every process agrees on who came first and
    a stage ends with exactly ``target`` finished trials however many processes fill it.
    Under a --budget the target is the study's (:func:`planned_target`), and a trial that
    cannot end before the stage's deadline lowers it to the live trials before it (never
    raises it, so two processes that find the time up at once agree on the lower).
    """
    target = planned_target(study, target)
    earlier = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.number < trial.number
        and t.state != TrialState.FAIL
        and t.user_attrs.get(TrialKey.REASON) != Reason.SURPLUS
    ]
    if len(earlier) >= target:
        _surplus(trial, f"{stage} already had {plural(target, 'trial')}")
    why = _time_up(study, len(earlier))
    if why is not None:
        kept = min(len(earlier), planned_target(study, target))
        study.set_user_attr(StudyKey.TARGET, kept)
        up = study.user_attrs.get(StudyKey.TIME_UP) or {"planned": target}
        study.set_user_attr(StudyKey.TIME_UP, {**up, "trials": kept, "why": why})
        _surplus(trial, f"{stage}'s time was up: {why}")
    _start_trial(trial, stage)


def fill(
    study: optuna.Study,
    target: int,
    objective: Callable[[optuna.Trial], float],
    progress: Callable[[int, int, FrozenTrial | None], None] | None = None,
) -> None:
    """Run trials of ``objective`` (which starts with :func:`claim`) in this process until
    ``study`` holds ``target`` finished trials, other processes filling it too."""
    while True:
        reclaim(study)
        trials = study.get_trials(deepcopy=False)
        live = [t for t in trials if t.user_attrs.get(TrialKey.REASON) != Reason.SURPLUS]
        finished = sum(t.state in FINISHED for t in live)
        active = sum(t.state in ACTIVE for t in live)
        goal = planned_target(study, target)
        if progress is not None:
            progress(finished, goal, None)
        if finished >= goal:
            return
        if finished + active >= goal:
            time.sleep(_POLL_SECONDS)  # the last trials run elsewhere; wait for them
            continue
        _run_one(study, objective)


def stage_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    """A stage's trials counted as the protocol counts them (schema.counts): surplus trials
    are not its, and a diverged trial is diverged whatever state it was stored in."""
    n = counts(trials)
    return {
        "trials": n["finished"],
        "complete": n["complete"],
        "pruned": n["pruned"],
        "diverged": n["diverged"],
        "failed": n["failed"],
    }


def holders(study: optuna.Study, wait: float = 10.0) -> list[str]:
    """Who runs the study's RUNNING trials. A trial is RUNNING a moment before its process
    writes its "worker" attr (Optuna starts it, then the objective's first line names the
    worker), so a reader in that moment waits a little rather than say "held by ?"."""
    deadline = time.monotonic() + wait
    while True:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        named = [t.user_attrs.get(TrialKey.WORKER) for t in running]
        if all(named) or time.monotonic() > deadline:
            return [n or "?" for n in named]
        time.sleep(_POLL_SECONDS / 4)


# Waiting, the trial always finishes here or elsewhere: only ``wait=False`` may give None.
@overload
def fixed_trial(
    study: optuna.Study,
    key: str,
    params: dict[str, Any],
    objective: Callable[[optuna.Trial], float],
    *,
    wait: Literal[True] = ...,
) -> FrozenTrial: ...
@overload
def fixed_trial(
    study: optuna.Study,
    key: str,
    params: dict[str, Any],
    objective: Callable[[optuna.Trial], float],
    *,
    wait: bool,
) -> FrozenTrial | None: ...
def fixed_trial(
    study: optuna.Study,
    key: str,
    params: dict[str, Any],
    objective: Callable[[optuna.Trial], float],
    *,
    wait: bool = True,
) -> FrozenTrial | None:
    """Run the single trial named ``key`` in ``study`` unless it is done or held elsewhere.

    The trial is created WAITING with its key, so two processes racing for it hold two
    numbered trials and the later number closes itself as surplus. Returns the finished
    trial, or None when a live worker elsewhere holds it and ``wait`` is False.
    """

    def guarded(trial: optuna.Trial) -> float:
        if trial.user_attrs.get(TrialKey.KEY) != key:
            _surplus(trial, "a stray waiting trial")
        for t in study.get_trials(deepcopy=False):
            if (
                t.number < trial.number
                and t.user_attrs.get(TrialKey.KEY) == key
                and t.state != TrialState.FAIL
            ):
                _surplus(trial, f"trial {t.number} already holds {key}")
        _start_trial(trial, study.user_attrs.get(StudyKey.STAGE, ""))
        return objective(trial)

    while True:
        reclaim(study)
        mine = [
            t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(TrialKey.KEY) == key
        ]
        done = [t for t in mine if t.state in FINISHED]
        if done:
            return done[0]
        if any(t.state == TrialState.RUNNING for t in mine):
            if not wait:
                return None
            time.sleep(_POLL_SECONDS)
            continue
        if not any(t.state == TrialState.WAITING for t in mine):
            study.enqueue_trial(params, user_attrs={TrialKey.KEY: key}, skip_if_exists=False)
        _run_one(study, guarded)
