"""``journal://PATH``: Optuna's journal file storage, for a shared disk without a database.

Optuna's ``JournalStorage`` over a ``JournalFileBackend``: every write is one JSON line
appended to one file under a lock file beside it (``PATH.lock``, made with ``symlink(2)``,
Optuna's ``JournalFileSymlinkLock``, which works on NFS v2 and later), and every process
replays the file to read. Trial numbers are the order of the lines, so every process on
every host agrees on who came first, which is all babysit's claims need
(babysit/parallel/coordination.py).

Heartbeats: Optuna's ``JournalStorage`` is not a heartbeat storage (optuna 5.1,
optuna/storages/journal/_storage.py), so ``fail_stale_trials`` does nothing on it and a
worker killed on another host would leave its trial RUNNING for ever. As for the gRPC
proxy (babysit/storage/remote.py), :class:`HeartbeatJournalStorage` carries the heartbeat
as a trial system attr, the worker's clock written every ``heartbeat`` seconds (one line
in the file each time); a RUNNING trial whose last stamp is older than ``grace`` is
stale, and one that never wrote a stamp is orphaned once it started over ``grace`` ago.
Hosts' clocks must agree to well within the grace period (NTP does that).

A stalled lock: a process killed while it holds the lock (a write takes milliseconds, but
a worker stamping every second is often in one) leaves the lock file behind, and nobody
writes until Optuna breaks it after its grace period (30 s). No heartbeat lands meanwhile,
so every live trial would look stale the moment the lock is free again. A process that
waited that long for the lock counts its stamps from the end of the wait instead: a
trial is stale only once it has had ``grace`` seconds of a writable file to stamp in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from datetime import timedelta

import optuna
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal import JournalFileSymlinkLock
from optuna.storages.journal import JournalStorage
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from babysit.schema import SystemKey

# A wait for the lock longer than this is a stall (a write holds it for milliseconds).
STALL_S = 1.0
# Optuna's default: a lock file unchanged this long is taken to be a dead holder's.
LOCK_GRACE = 30


class _TimedLock(JournalFileSymlinkLock):
    """Optuna's symlink lock that remembers when a long wait for it ended."""

    stall_end = 0.0

    def acquire(self) -> bool:
        began = time.time()
        got = super().acquire()
        now = time.time()
        if now - began > STALL_S:
            self.stall_end = now
        return got


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with a heartbeat carried as a trial system attr."""

    def __init__(
        self, path: str, heartbeat: int | None, grace: int, lock_grace: int = LOCK_GRACE
    ) -> None:
        self._lock = _TimedLock(path, grace_period=lock_grace)
        super().__init__(JournalFileBackend(path, lock_obj=self._lock))
        self.path = path
        self._heartbeat = heartbeat if heartbeat and heartbeat > 0 else None
        self._grace = grace

    def _since(self) -> float:
        """Stamps count from here at the earliest: the end of this process's last stall
        for the lock, found by taking the lock once (a stall still going on is waited out
        here, before anyone is failed)."""
        self._lock.acquire()
        self._lock.release()
        return self._lock.stall_end

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, SystemKey.HEARTBEAT, time.time())
        except Exception:  # noqa: BLE001 - the thread must live on; a trial another process
            pass  # failed (stale) or that finished meanwhile shows on the main thread

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        if not [t for t in running if _stale(t, time.time(), self._grace, 0.0)]:
            return []  # the common case: no lock taken
        since = self._since()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [t._trial_id for t in running if _stale(t, time.time(), self._grace, since)]

    def orphaned_trial_ids(self, study_id: int) -> list[int]:
        """RUNNING trials that never wrote a heartbeat and started over a grace period ago:
        taken by a process that died between taking the trial and its first stamp."""

        def orphaned(since: float) -> list[int]:
            # datetime_start is the writer's clock as local time (JournalStorage's reading).
            cutoff = datetime.now() - timedelta(seconds=self._grace)
            if since and datetime.fromtimestamp(since) > cutoff:
                return []  # within a grace period of a stall: nobody could stamp
            running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
            return [
                t._trial_id
                for t in running
                if SystemKey.HEARTBEAT not in t.system_attrs
                and t.datetime_start is not None
                and t.datetime_start < cutoff
            ]

        return orphaned(self._since()) if orphaned(0.0) else []

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat

    def get_heartbeat_stale_trial_callback(
        self,
    ) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return None


def _stale(trial: FrozenTrial, now: float, grace: int, since: float) -> bool:
    # A trial with no stamp yet is never stale (orphaned_trial_ids covers it).
    stamp = trial.system_attrs.get(SystemKey.HEARTBEAT)
    return isinstance(stamp, (int, float)) and now - max(stamp, since) > grace
