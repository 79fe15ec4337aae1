"""Optuna's RDBStorage made to ride out a database restart: every call retries an outage
for up to its reconnect window, and a write that may have committed before the connection
broke is settled by reading what is stored."""

from __future__ import annotations

import copy
import functools
import os
import random
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence
from datetime import datetime
from datetime import timedelta
from typing import Any
from typing import cast

import optuna
import sqlalchemy
from optuna.storages._rdb import models as _models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from babysit.schema import SystemKey
from babysit.storage.errors import _BRIEF
from babysit.storage.errors import _BRIEF_TRIES
from babysit.storage.errors import _BRIEF_WAITED
from babysit.storage.errors import _OPENED
from babysit.storage.errors import _REFUSED
from babysit.storage.errors import StorageLost
from babysit.storage.errors import StorageRefused
from babysit.storage.errors import _advice
from babysit.storage.errors import _classify
from babysit.storage.errors import _reason
from babysit.storage.private import RDB_METHODS
from babysit.storage.private import STORAGE_METHODS
from babysit.storage.url import redact_text

# A worker whose heartbeat is older than the grace period is presumed dead and its trial
# is marked FAIL (and replaced). 10 s / 60 s keep the database load low while a killed
# worker's trial is reclaimed within a minute.
DEFAULT_HEARTBEAT = 10
DEFAULT_GRACE = 60
# How long a call waits for the database to come back (a server restart takes seconds)
# before the process gives up with StorageLost.
DEFAULT_RECONNECT = 60


# The claim of a WAITING trial, written in the same transaction that makes it RUNNING, so
# that after a connection lost during the commit the process can tell whether it was its
# own claim that committed (run the trial) or another process's (skip it).


class _ReconnectingRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage that rides out a database restart.

    ``pool_pre_ping`` replaces the connections a restarted server dropped, but a call made
    while the server is down still fails, and Optuna gives up at once: the heartbeat thread
    dies (the live trial then looks stale and is failed under its worker) and the trial's
    next write crashes the worker with a traceback. Each call here retries outages (see
    _classify) for up to ``reconnect`` seconds from its own first failure, then raises
    StorageLost; a refusal raises StorageRefused at once. A write whose commit may have
    landed before the connection broke is settled on retry by reading what is stored.
    """

    reconnect: float = DEFAULT_RECONNECT
    shown: str = ""
    # How many calls (over all threads) are waiting out an outage right now: the
    # "unreachable" and "reachable again" lines are printed once per outage, not per thread.
    _down = 0
    _down_lock = threading.Lock()

    def __init__(self, url: str, *args: Any, **kwargs: Any) -> None:
        _OPENED.append(url)
        super().__init__(url, *args, **kwargs)

    def _lost(self, err: BaseException) -> StorageLost:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return StorageLost(
            f"lost the connection to storage {self.shown} for {self.reconnect:g} s "
            f"({redact_text(reason, self.url)}); finished trials are stored, the running one "
            "is marked FAIL once its heartbeat is stale. Rerun the same command when the "
            "database is back"
        )

    def _refused(self, err: BaseException) -> StorageRefused:
        return StorageRefused(
            f"storage {self.shown} refused the operation "
            f"({redact_text(_reason(err), self.url)}); {_advice(err)}"
        )

    def _went_down(self) -> None:
        with self._down_lock:
            self._down += 1
            first = self._down == 1
        if first:
            print(
                f"babysit: storage {self.shown} unreachable; retrying for up to "
                f"{self.reconnect:g} s",
                file=sys.stderr,
                flush=True,
            )

    def _came_back(self, reached: bool) -> None:
        with self._down_lock:
            self._down -= 1
            last = self._down == 0
        if last and reached:
            print(f"babysit: storage {self.shown} reachable again", file=sys.stderr, flush=True)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            _retrying_call(self, optuna.storages.RDBStorage.record_heartbeat, trial_id)
        except (StorageLost, StorageRefused):
            pass  # the thread must live on; the main thread reports the loss

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        if state == TrialState.RUNNING:
            token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
            return _retrying_call(self, _claim, trial_id, token, settle=_settle_claim)
        return _retrying_call(
            self,
            optuna.storages.RDBStorage.set_trial_state_values,
            trial_id,
            state,
            values,
            settle=_settle_state,
        )

    def delete_study(self, study_id: int) -> None:
        _retrying_call(
            self, optuna.storages.RDBStorage.delete_study, study_id, settle=_settle_delete
        )

    def orphaned_trial_ids(self, study_id: int) -> list[int]:
        """RUNNING trials that never recorded a heartbeat, started over a grace period ago.

        Optuna's stale-heartbeat check skips a trial without any heartbeat, yet a worker
        starts its heartbeat right after taking the trial; a trial without one was taken by
        a process that died or lost its connection in between (a trial created twice by a
        retried commit), and without this nothing would ever fail it.
        """
        return _retrying_call(self, _orphaned_trial_ids, study_id)

    def _create_new_trial(
        self, study_id: int, template_trial: FrozenTrial | None = None
    ) -> FrozenTrial:
        return _retrying_call(self, _create_trial_once, study_id, template_trial)


# Optuna's ORM models declare their columns as ``Column(...)``, so the type checker sees a
# Column where a loaded row holds the value; these read a TrialModel row's values as such.
def _row_id(trial: _models.TrialModel) -> int:
    return cast(int, trial.trial_id)


def _row_number(trial: _models.TrialModel) -> int:
    return cast(int, trial.number)


def _row_state(trial: _models.TrialModel) -> TrialState:
    return cast(TrialState, trial.state)


def _claim(storage: _ReconnectingRDBStorage, trial_id: int, token: str) -> bool:
    """Optuna's WAITING -> RUNNING (RDBStorage.set_trial_state_values), plus the claim."""
    try:
        with _create_scoped_session(storage.scoped_session) as session:
            trial = _models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
            storage.check_trial_is_updatable(trial_id, _row_state(trial))
            if trial.state != TrialState.WAITING:
                return False
            trial.state = TrialState.RUNNING
            trial.datetime_start = datetime.now()
            storage._set_trial_attr_without_commit(
                session, _models.TrialSystemAttributeModel, trial_id, SystemKey.CLAIM, token
            )
    except sqlalchemy.exc.IntegrityError:
        return False
    return True


def _settle_claim(storage: _ReconnectingRDBStorage, trial_id: int, token: str) -> bool:
    attrs = optuna.storages.RDBStorage.get_trial_system_attrs(storage, trial_id)
    if attrs.get(SystemKey.CLAIM) == token:
        return True  # our claim committed before the connection broke: the trial is ours
    return _claim(storage, trial_id, token)


def _settle_state(
    storage: _ReconnectingRDBStorage,
    trial_id: int,
    state: TrialState,
    values: Sequence[float] | None = None,
) -> bool:
    stored = optuna.storages.RDBStorage.get_trial(storage, trial_id)
    if state.is_finished() and stored.state == state:
        # Committed before the connection broke; writing it again would raise
        # UpdateFinishedTrialError and kill the worker over a trial that is stored.
        return True
    return optuna.storages.RDBStorage.set_trial_state_values(storage, trial_id, state, values)


def _settle_delete(storage: _ReconnectingRDBStorage, study_id: int) -> None:
    try:
        optuna.storages.RDBStorage.delete_study(storage, study_id)
    except KeyError:
        pass  # the first attempt's delete committed


def _orphaned_trial_ids(storage: _ReconnectingRDBStorage, study_id: int) -> list[int]:
    grace = storage.grace_period or 2 * (storage.heartbeat_interval or DEFAULT_HEARTBEAT)
    # datetime_start is the writer's local clock (Optuna stores datetime.now()), so it is
    # compared with this process's clock, not the server's.
    cutoff = datetime.now() - timedelta(seconds=grace)
    with _create_scoped_session(storage.scoped_session) as session:
        running = (
            session.query(_models.TrialModel)
            .filter(_models.TrialModel.study_id == study_id)
            .filter(_models.TrialModel.state == TrialState.RUNNING)
            .all()
        )
        return [
            _row_id(t)
            for t in running
            if not t.heartbeats and t.datetime_start is not None and t.datetime_start < cutoff
        ]


def _create_trial_once(
    storage: _ReconnectingRDBStorage, study_id: int, template_trial: FrozenTrial | None
) -> FrozenTrial:
    """One attempt of Optuna's RDBStorage._create_new_trial (Optuna 5.0).

    Optuna's loops up to five times on any StorageInternalError, sleeping up to 2 s each;
    inside the retry here that would stretch an outage past its deadline and retry refusals,
    so the deadlock retry it exists for is left to _retrying_call's brief retry.
    """
    with _create_scoped_session(storage.scoped_session) as session:
        _models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        trial = storage._get_prepared_new_trial(study_id, template_trial, session)
        if template_trial:
            frozen = copy.deepcopy(template_trial)
            frozen.number = _row_number(trial)
            frozen.datetime_start = trial.datetime_start
            frozen._trial_id = _row_id(trial)
            return frozen
        return FrozenTrial(
            number=_row_number(trial),
            state=_row_state(trial),
            value=None,
            values=None,
            datetime_start=trial.datetime_start,
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={},
            intermediate_values={},
            trial_id=_row_id(trial),
        )


# A wrapped method calling another (create_new_study -> get_study_id_from_name) runs the
# inner one bare: the outermost call owns the deadline, so retries never nest.
_in_call = threading.local()


def _retrying_call(
    storage: _ReconnectingRDBStorage,
    method: Callable[..., Any],
    *args: Any,
    settle: Callable[..., Any] | None = None,
    **kwargs: Any,
) -> Any:
    """``method`` until it succeeds, the outage outlasts ``storage.reconnect`` or it fails
    for another reason. After a lost connection, ``settle`` (same arguments) replaces
    ``method``: the write may have committed, and it reads the stored state first."""
    if getattr(_in_call, "active", False):
        return method(storage, *args, **kwargs)
    _in_call.active = True
    try:
        return _retry_loop(storage, method, settle, args, kwargs)
    finally:
        _in_call.active = False


def _retry_loop(
    storage: _ReconnectingRDBStorage,
    method: Callable[..., Any],
    settle: Callable[..., Any] | None,
    args: tuple,
    kwargs: dict,
) -> Any:
    deadline: float | None = None
    delay = 0.25
    brief = 0
    call = method
    reached = False
    try:
        while True:
            began = time.monotonic()
            try:
                result = call(storage, *args, **kwargs)
            except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as err:
                kind, cause = _classify(err)
                if kind is None:
                    raise
                if kind == _REFUSED:
                    raise storage._refused(cause) from None
                if kind == _BRIEF:
                    brief += 1
                    # A lock error that took seconds already waited out SQLite's busy
                    # timeout (60 s): retrying would only wait as long again.
                    if brief >= _BRIEF_TRIES or time.monotonic() - began > _BRIEF_WAITED:
                        raise storage._refused(cause) from None
                    # Optuna's own deadlock retry waits up to 2 s at random; the jitter
                    # lets the contending transactions go one after the other.
                    time.sleep(random.uniform(0.05, 0.5))
                    continue
                if settle is not None:
                    call = settle
                now = time.monotonic()
                if deadline is None:
                    deadline = now + storage.reconnect
                    storage._went_down()
                if now >= deadline:
                    raise storage._lost(cause) from None
                time.sleep(min(delay, deadline - now))
                delay = min(2 * delay, 2.0)
                continue
            reached = True
            return result
    finally:
        if deadline is not None:
            storage._came_back(reached)


def _retried(name: str) -> Callable[..., Any]:
    method = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(method)
    def call(self: _ReconnectingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return _retrying_call(self, method, *args, **kwargs)

    return call


for _name in STORAGE_METHODS + RDB_METHODS:
    if _name not in vars(_ReconnectingRDBStorage):  # those settle a possibly committed write
        setattr(_ReconnectingRDBStorage, _name, _retried(_name))
