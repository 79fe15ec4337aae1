"""Optuna's private attributes, log lines and messages, read in one place.

babysit needs a few things Optuna does not offer publicly: a trial's and a study's storage
ids, the storage behind a study, the stale trials its heartbeat would fail, the name of the
logger that reports a trial's end, and the message of the error a failed trial's tell
raises. Each is a small named function here, and tests/parallel/test_coordination.py pins
every one, so an Optuna upgrade that changes one fails a test instead of a run. The storage
implementations beside it (rdb.py overrides RDBStorage methods, remote.py serves the gRPC
proxy) speak Optuna's internals by necessity; nothing outside babysit/storage/ does.
"""

from __future__ import annotations

import logging

import optuna
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial

# Optuna's logger for a trial's end ("Trial 3 failed with value None.", with the exception
# that closed it): where a surplus trial would read like a crash.
OPTIMIZE_LOGGER = "optuna.study._optimize"


# The start of the ValueError Optuna raises when a trial another process failed is told.
TELL_FAILED = "Cannot tell a FAIL trial"


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's storage id (not its number): what the storage API addresses it by."""
    return trial._trial_id


def study_id(study: optuna.Study) -> int:
    """The study's storage id: what the storage API and the dashboard's artifact URLs use."""
    return study._study_id


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study writes through (Optuna's cache in front of an RDB storage)."""
    return study._storage


def heartbeat_on(study: optuna.Study) -> bool:
    return bool(getattr(storage_of(study), "get_heartbeat_interval", lambda: None)())


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """What ``optuna.storages.fail_stale_trials`` would fail: RUNNING trials whose heartbeat
    is older than the grace period."""
    storage = storage_of(study)
    assert isinstance(storage, BaseHeartbeat), type(storage)  # called when heartbeat_on
    return list(storage._get_stale_trial_ids(study_id(study)))


def orphaned_trial_ids(study: optuna.Study) -> list[int]:
    """RUNNING trials that never wrote a heartbeat (babysit's storage.orphaned_trial_ids:
    on the journal storage itself; behind Optuna's cache of an RDB storage, or the gRPC
    proxy, at ``_backend``)."""
    storage = storage_of(study)
    orphaned = getattr(storage, "orphaned_trial_ids", None) or getattr(
        getattr(storage, "_backend", None), "orphaned_trial_ids", None
    )
    return list(orphaned(study_id(study))) if orphaned else []


def told_a_failed_trial(err: BaseException) -> bool:
    """Whether ``err`` comes from Optuna telling a trial that another process had failed.

    Optuna 5.0 raises the ValueError, then its own post-processing raises an AssertionError
    ("Should not reach.") over it, so the ValueError is looked for down the chain."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ValueError) and str(cause).startswith(TELL_FAILED):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def trial_number(record: logging.LogRecord) -> str:
    """ "3" from Optuna's "Trial 3 failed ..." log lines; "" from any other line."""
    words = record.getMessage().split()
    return words[1] if len(words) > 1 and words[0] == "Trial" else ""


# The BaseStorage methods babysit's storages wrap with their retries (remote.py's gRPC
# proxy client, rdb.py's reconnecting RDBStorage): every call that reaches the database.
STORAGE_METHODS = (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "set_trial_param",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "get_all_trials",
)
# RDBStorage's further methods, public and private: Optuna's cache layer calls the private
# ones directly (study.get_trials, ask, suggest).
RDB_METHODS = (
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_trial_param",
    "get_best_trial",
    "_get_stale_trial_ids",
    "_get_trials",
    "_create_new_trial",
    "_set_trial_param",
    "_get_best_trial_id",
)
