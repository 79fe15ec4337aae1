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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from datetime import timedelta

import optuna
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal import JournalStorage
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from babysit.schema import SystemKey


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with a heartbeat carried as a trial system attr."""

    def __init__(self, path: str, heartbeat: int | None, grace: int) -> None:
        super().__init__(JournalFileBackend(path))
        self.path = path
        self._heartbeat = heartbeat if heartbeat and heartbeat > 0 else None
        self._grace = grace

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, SystemKey.HEARTBEAT, time.time())
        except Exception:  # noqa: BLE001 - the thread must live on; a trial another process
            pass  # failed (stale) or that finished meanwhile shows on the main thread

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [t._trial_id for t in running if _stale(t, now, self._grace)]

    def orphaned_trial_ids(self, study_id: int) -> list[int]:
        """RUNNING trials that never wrote a heartbeat and started over a grace period ago:
        taken by a process that died between taking the trial and its first stamp."""
        # datetime_start is the writer's clock, as local time (JournalStorage converts it).
        cutoff = datetime.now() - timedelta(seconds=self._grace)
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [
            t._trial_id
            for t in running
            if SystemKey.HEARTBEAT not in t.system_attrs
            and t.datetime_start is not None
            and t.datetime_start < cutoff
        ]

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat

    def get_heartbeat_stale_trial_callback(
        self,
    ) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return None


def _stale(trial: FrozenTrial, now: float, grace: int) -> bool:
    # A trial with no stamp yet is never stale (orphaned_trial_ids covers it).
    stamp = trial.system_attrs.get(SystemKey.HEARTBEAT)
    return isinstance(stamp, (int, float)) and now - stamp > grace
