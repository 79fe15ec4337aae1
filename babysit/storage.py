"""Storage URL -> Optuna storage, artifact store and study names. Nobody else parses URLs."""

from __future__ import annotations

import copy
import functools
import os
import random
import socket
import sqlite3
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import optuna
import sqlalchemy
from optuna.storages._rdb import models as _models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from babysit.errors import BabysitError
from babysit.errors import UsageError

DEFAULT_STORAGE = "sqlite:///babysit.db"
STAGES = ("sanity", "overfit", "coarse", "fine", "final")

# A worker whose heartbeat is older than the grace period is presumed dead and its trial
# is marked FAIL (and replaced). 10 s / 60 s keep the database load low while a killed
# worker's trial is reclaimed within a minute.
DEFAULT_HEARTBEAT = 10
DEFAULT_GRACE = 60
# How long a call waits for the database to come back (a server restart takes seconds)
# before the process gives up with StorageLost.
DEFAULT_RECONNECT = 60


def study_name(run: str, stage: str) -> str:
    return f"{run}/{stage}"


def resolve_url(url: str | None) -> str:
    return url or os.environ.get("BABYSIT_STORAGE") or DEFAULT_STORAGE


def _userinfo(url: str) -> tuple[str, str, str] | None:
    """(scheme://, user, password) of a URL with a password, split where a password with an
    unencoded '@', ':' or '/' is still whole: the password runs from the first ':' of the
    user info to the LAST '@'. SQLAlchemy stops at the first '@' and would call the rest
    of the password the host, which then shows in messages."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0 or rest.startswith("/"):
        return None
    user, colon, password = rest[:at].partition(":")
    if not colon or not password:
        return None
    return f"{scheme}://", user, password


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for output, logs and attrs."""
    parts = _userinfo(url)
    if parts is not None:
        scheme, user, password = parts
        # Everything after the last '@' is the host part, whatever the password holds.
        return f"{scheme}{user}:***@{url[len(scheme) + len(user) + 1 + len(password) + 1:]}"
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<unparseable storage URL>"


class StorageLost(BabysitError):
    """The database stayed unreachable for longer than the reconnect window."""

    exit_code = 1


class StorageRefused(UsageError):
    """The database answers but will not do the work: no rights on the tables, a read-only
    file, missing tables, a full disk. Waiting cannot change that, so it ends the run at once
    (exit 2) instead of being retried as an outage."""


# What a failed call means, from the error the driver gave (PostgreSQL manual, Appendix A
# "Error Codes"). An outage is waited out for up to `reconnect` seconds; a brief one is
# retried a few times at once; a refusal ends the run; anything else is raised unchanged.
_OUTAGE, _BRIEF, _REFUSED = "outage", "brief", "refused"
# 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now (starting up); class
# 08 is connection_exception. 53300 too_many_connections: the server is up but full, and
# connections free up as other clients finish, so it is waited out like a restart.
_PG_OUTAGE = ("57P01", "57P02", "57P03", "53300")
# 40P01 deadlock_detected, 40001 serialization_failure: the manual's remedy is to retry the
# transaction; Optuna's own trial creation retries deadlocks five times for the same reason.
_PG_BRIEF = ("40P01", "40001")
# 28 invalid authorization, 3D no such database, 3F no such schema, 53 insufficient
# resources (53100 disk full), 58 system error (I/O); 42501 insufficient_privilege, 42P01
# undefined_table, 42703 undefined_column (tables of another version), 25006
# read_only_sql_transaction (a standby, default_transaction_read_only).
_PG_REFUSED_CLASSES = ("28", "3D", "3F", "53", "58")
_PG_REFUSED = ("42501", "42P01", "42703", "25006")
# SQLite's busy timeout (60 s, open_storage) already waits for a lock; SQLITE_BUSY still comes
# back at once when two writers deadlock, and SQLite's documented remedy is to roll back and
# retry. Every other OperationalError of SQLite (read-only file, no such table, disk full,
# I/O error, unable to open) is a refusal: SQLite has no server that could come back.
_SQLITE_BRIEF = ("database is locked", "database table is locked", "database schema is locked")
_BRIEF_TRIES = 5
_BRIEF_WAITED = 5.0


def _classify(err: BaseException) -> tuple[str | None, BaseException]:
    """(kind, the driver-level error) for an error of a storage call; kind None: not ours."""
    e: BaseException | None = err
    for _ in range(6):  # StorageInternalError -> SQLAlchemy error -> driver error
        if e is None:
            break
        if isinstance(e, sqlalchemy.exc.DBAPIError):
            if e.connection_invalidated:
                return _OUTAGE, e
            orig = e.orig
            if isinstance(orig, sqlite3.Error):
                text = str(orig).lower()
                if any(m in text for m in _SQLITE_BRIEF):
                    return _BRIEF, e
                # DatabaseError itself: "file is not a database". Its other subclasses
                # (integrity, programming, data errors) are babysit's or the data's fault.
                if isinstance(orig, sqlite3.OperationalError) \
                        or type(orig) is sqlite3.DatabaseError:
                    return _REFUSED, e
                return None, e
            code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
            if code:
                if code.startswith("08") or code in _PG_OUTAGE:
                    return _OUTAGE, e
                if code in _PG_BRIEF:
                    return _BRIEF, e
                if code[:2] in _PG_REFUSED_CLASSES or code in _PG_REFUSED:
                    return _REFUSED, e
                return None, e
            if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
                # No SQLSTATE: libpq itself failed (refused, reset, timed out) before any
                # server answered, or a driver without codes (MySQL) lost its connection.
                return _OUTAGE, e
            return None, e
        e = e.__cause__
    return None, err


def _reason(err: BaseException) -> str:
    orig = getattr(err, "orig", None) or err
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


def _advice(err: BaseException) -> str:
    orig = getattr(err, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or ""
    text = str(orig or err).lower()
    if code == "42501" or "permission denied" in text:
        return "grant the database role rights on babysit's tables or use another role"
    if code == "25006" or "readonly" in text or "read-only" in text:
        return "make the database writable or pass another --storage"
    if code in ("42P01", "42703") or "no such table" in text or "no such column" in text:
        return ("its tables are missing or of another version; pass a storage babysit "
                "created, or a new one")
    if code.startswith("53") or "full" in text:
        return "free disk space on the database's machine, then rerun the same command"
    return "fix the database or pass another --storage, then rerun the same command"


# Storage URLs opened in this process, so that an error caught far from its storage (the
# command line's last resort) can still be printed with the password hidden.
_OPENED: list[str] = []


def storage_refusal(err: BaseException) -> StorageRefused | None:
    """``err`` as a one-line StorageRefused when it is a storage refusal, else None."""
    kind, cause = _classify(err)
    if kind != _REFUSED:
        return None
    reason = _reason(cause)
    for url in _OPENED:
        reason = redact_text(reason, url)
    where = f"storage {redact(_OPENED[-1])}" if len(set(_OPENED)) == 1 else "storage"
    return StorageRefused(f"{where} refused the operation ({reason}); {_advice(cause)}")


# The claim of a WAITING trial, written in the same transaction that makes it RUNNING, so
# that after a connection lost during the commit the process can tell whether it was its
# own claim that committed (run the trial) or another process's (skip it).
CLAIM_ATTR = "babysit:claim"


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
            print(f"babysit: storage {self.shown} unreachable; retrying for up to "
                  f"{self.reconnect:g} s", file=sys.stderr, flush=True)

    def _came_back(self, reached: bool) -> None:
        with self._down_lock:
            self._down -= 1
            last = self._down == 0
        if last and reached:
            print(f"babysit: storage {self.shown} reachable again", file=sys.stderr,
                  flush=True)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            _retrying_call(self, optuna.storages.RDBStorage.record_heartbeat, trial_id)
        except (StorageLost, StorageRefused):
            pass  # the thread must live on; the main thread reports the loss

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        if state == TrialState.RUNNING:
            token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
            return _retrying_call(self, _claim, trial_id, token, settle=_settle_claim)
        return _retrying_call(self, optuna.storages.RDBStorage.set_trial_state_values,
                              trial_id, state, values, settle=_settle_state)

    def delete_study(self, study_id: int) -> None:
        _retrying_call(self, optuna.storages.RDBStorage.delete_study, study_id,
                       settle=_settle_delete)

    def orphaned_trial_ids(self, study_id: int) -> list[int]:
        """RUNNING trials that never recorded a heartbeat, started over a grace period ago.

        Optuna's stale-heartbeat check skips a trial without any heartbeat, yet a worker
        starts its heartbeat right after taking the trial; a trial without one was taken by
        a process that died or lost its connection in between (a trial created twice by a
        retried commit), and without this nothing would ever fail it.
        """
        return _retrying_call(self, _orphaned_trial_ids, study_id)

    def _create_new_trial(self, study_id: int,
                          template_trial: FrozenTrial | None = None) -> FrozenTrial:
        return _retrying_call(self, _create_trial_once, study_id, template_trial)


def _claim(storage: _ReconnectingRDBStorage, trial_id: int, token: str) -> bool:
    """Optuna's WAITING -> RUNNING (RDBStorage.set_trial_state_values), plus the claim."""
    try:
        with _create_scoped_session(storage.scoped_session) as session:
            trial = _models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
            storage.check_trial_is_updatable(trial_id, trial.state)
            if trial.state != TrialState.WAITING:
                return False
            trial.state = TrialState.RUNNING
            trial.datetime_start = datetime.now()
            storage._set_trial_attr_without_commit(
                session, _models.TrialSystemAttributeModel, trial_id, CLAIM_ATTR, token
            )
    except sqlalchemy.exc.IntegrityError:
        return False
    return True


def _settle_claim(storage: _ReconnectingRDBStorage, trial_id: int, token: str) -> bool:
    attrs = optuna.storages.RDBStorage.get_trial_system_attrs(storage, trial_id)
    if attrs.get(CLAIM_ATTR) == token:
        return True  # our claim committed before the connection broke: the trial is ours
    return _claim(storage, trial_id, token)


def _settle_state(storage: _ReconnectingRDBStorage, trial_id: int, state: TrialState,
                  values: Sequence[float] | None = None) -> bool:
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
        return [t.trial_id for t in running
                if not t.heartbeats and t.datetime_start is not None
                and t.datetime_start < cutoff]


def _create_trial_once(storage: _ReconnectingRDBStorage, study_id: int,
                       template_trial: FrozenTrial | None) -> FrozenTrial:
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
            frozen.number = trial.number
            frozen.datetime_start = trial.datetime_start
            frozen._trial_id = trial.trial_id
            return frozen
        return FrozenTrial(
            number=trial.number, state=trial.state, value=None, values=None,
            datetime_start=trial.datetime_start, datetime_complete=None, params={},
            distributions={}, user_attrs={}, system_attrs={}, intermediate_values={},
            trial_id=trial.trial_id,
        )


def redact_text(text: str, url: str) -> str:
    """``text`` with the password of ``url`` (and the URL itself) hidden."""
    secrets: set[str] = set()
    parts = _userinfo(url)
    if parts is not None:
        password = parts[2]
        # As typed, percent-decoded (what the driver sends and may echo), and each piece
        # between '@'s (SQLAlchemy reads "p@ss@host" as password "p", host "ss@host").
        secrets |= {password, unquote(password), *password.split("@")}
    try:
        parsed = make_url(url)
        if parsed.password:
            secrets.add(str(parsed.password))
    except (ArgumentError, ValueError):
        pass
    text = text.replace(url, redact(url))
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


# A wrapped method calling another (create_new_study -> get_study_id_from_name) runs the
# inner one bare: the outermost call owns the deadline, so retries never nest.
_in_call = threading.local()


def _retrying_call(storage: _ReconnectingRDBStorage, method: Callable[..., Any],
                   *args: Any, settle: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
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


def _retry_loop(storage: _ReconnectingRDBStorage, method: Callable[..., Any],
                settle: Callable[..., Any] | None, args: tuple, kwargs: dict) -> Any:
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
            except (optuna.exceptions.StorageInternalError,
                    sqlalchemy.exc.SQLAlchemyError) as err:
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


for _name in (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_trial_user_attrs",
    "get_trial_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
    "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial_id_from_study_id_trial_number",
    "get_trial", "get_all_trials", "get_best_trial", "_get_stale_trial_ids",
    # Optuna's cache layer calls these private ones directly (study.get_trials, ask, suggest).
    "_get_trials", "_create_new_trial", "_set_trial_param", "_get_best_trial_id",
):
    if _name not in vars(_ReconnectingRDBStorage):  # those settle a possibly committed write
        setattr(_ReconnectingRDBStorage, _name, _retried(_name))


@dataclass
class Storage:
    url: str = field(repr=False)  # may hold a password; print .shown
    # An RDBStorage, or for grpc://host:port the client of `babysit storage-proxy`.
    rdb: optuna.storages.BaseStorage
    artifact_dir: Path
    # s3://bucket/prefix when artifacts live on object storage (then artifact_dir is unused).
    artifact_store: str | None = None
    _s3: Any = field(default=None, repr=False)

    @property
    def shown(self) -> str:
        return redact(self.url)

    @property
    def artifact_where(self) -> str:
        """Where artifacts go, for messages: the folder or the s3:// URL."""
        return self.artifact_store or str(self.artifact_dir)

    def artifact_flags(self) -> list[str]:
        """The flags that give a child process (a `--jobs` helper) the same artifact store."""
        if self.artifact_store:
            return ["--artifact-store", self.artifact_store]
        return ["--artifact-dir", str(self.artifact_dir)]

    @property
    def artifacts(self) -> Any:
        """An Optuna ArtifactStore (open_reader / write / remove)."""
        if self.artifact_store:
            if self._s3 is None:
                from babysit.remote import S3ArtifactStore

                self._s3 = S3ArtifactStore(self.artifact_store)
            return self._s3
        # Imported here: optuna.artifacts pulls in boto3 (~0.1 s), which `babysit status`
        # and `export` never need.
        from optuna.artifacts import FileSystemArtifactStore

        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        return FileSystemArtifactStore(str(self.artifact_dir))


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name} must be a whole number of seconds, got '{value}'") from None


def default_artifact_dir(url: str) -> Path:
    """Next to an SQLite file; ./babysit-artifacts for a server database or a proxy."""
    env = os.environ.get("BABYSIT_ARTIFACTS")
    if env:
        return Path(env)
    if url.startswith("grpc://"):
        return Path("babysit-artifacts")
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        db = Path(parsed.database)
        return db.with_name(db.name + ".artifacts")
    return Path("babysit-artifacts")


def open_storage(
    url: str | None = None,
    artifact_dir: str | Path | None = None,
    heartbeat: int | None = None,
    grace: int | None = None,
    create: bool = True,
    artifact_store: str | None = None,
) -> Storage:
    """Build the Optuna storage for ``url``; a bad or unreachable URL is a UsageError.

    ``grpc://host:port`` is a `babysit storage-proxy`; ``artifact_store`` (else
    $BABYSIT_ARTIFACT_STORE) ``s3://bucket/prefix`` puts artifacts on object storage.
    """
    url = resolve_url(url)
    shown = redact(url)
    if artifact_store and artifact_dir:
        raise UsageError("give --artifact-dir or --artifact-store, not both")
    # A flag beats the environment: --artifact-dir wins over $BABYSIT_ARTIFACT_STORE.
    store = artifact_store or (None if artifact_dir else os.environ.get(
        "BABYSIT_ARTIFACT_STORE")) or None
    if store and not store.startswith("s3://"):
        # A plain folder is accepted here too: --artifact-store DIR is --artifact-dir DIR.
        artifact_dir, store = artifact_dir or store, None
    if url.startswith("grpc://"):
        return _open_proxy(url, artifact_dir, store, heartbeat, grace)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise UsageError(
            f"cannot parse storage URL '{shown}'; use sqlite:///path.db or "
            "postgresql+psycopg://user@host/db"
        ) from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql", "mysql"):
        raise UsageError(
            f"unsupported storage '{shown}'; use sqlite:///path.db or "
            "postgresql+psycopg://user@host/db"
        )
    if backend == "postgresql" and parsed.drivername == "postgresql":
        # psycopg (v3) is the driver we ship; plain postgresql:// would ask for psycopg2.
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if backend == "sqlite":
        db = parsed.database
        if not db or db == ":memory:":
            raise UsageError("an in-memory SQLite storage keeps nothing; give sqlite:///file.db")
        path = Path(db)
        if not create and not path.exists():
            raise UsageError(f"no storage at {path}; run `babysit run` first or pass --storage")
        if not path.parent.exists():
            raise UsageError(f"folder {path.parent} for storage {shown} does not exist")
    interval = heartbeat if heartbeat is not None else _int_env(
        "BABYSIT_HEARTBEAT", DEFAULT_HEARTBEAT
    )
    grace_period = grace if grace is not None else _int_env("BABYSIT_GRACE", DEFAULT_GRACE)
    engine_kwargs: dict = {"pool_pre_ping": True}
    if backend == "sqlite":
        # Several processes share one file on one machine: wait for the lock, don't fail.
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = _ReconnectingRDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=interval,
                grace_period=grace_period,
            )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"cannot open storage {shown}: {redact_text(reason, url)}") from None
    rdb.shown = shown
    rdb.reconnect = _int_env("BABYSIT_RECONNECT", DEFAULT_RECONNECT)
    return _with_artifacts(Storage(url=url, rdb=rdb, artifact_dir=Path(".")), artifact_dir,
                           store)


def _with_artifacts(storage: Storage, artifact_dir: str | Path | None,
                    store: str | None) -> Storage:
    storage.artifact_dir = Path(artifact_dir) if artifact_dir else default_artifact_dir(
        storage.url)
    if store:
        from babysit.remote import S3ArtifactStore

        storage.artifact_store = store
        storage._s3 = S3ArtifactStore(store)
        storage._s3.check()
    return storage


def _open_proxy(url: str, artifact_dir: str | Path | None, store: str | None,
                heartbeat: int | None, grace: int | None) -> Storage:
    from babysit.remote import open_proxy

    interval = heartbeat if heartbeat is not None else _int_env(
        "BABYSIT_HEARTBEAT", DEFAULT_HEARTBEAT
    )
    grace_period = grace if grace is not None else _int_env("BABYSIT_GRACE", DEFAULT_GRACE)
    proxy = open_proxy(url, interval, grace_period,
                       reconnect=_int_env("BABYSIT_RECONNECT", DEFAULT_RECONNECT))
    return _with_artifacts(Storage(url=url, rdb=proxy, artifact_dir=Path(".")), artifact_dir,
                           store)


def run_names(storage: Storage) -> list[str]:
    """Every run in a storage, in creation order (a run is a set of <run>/<stage> studies)."""
    names: list[str] = []
    for summary in optuna.get_all_study_summaries(storage.rdb, include_best_trial=False):
        run, _, stage = summary.study_name.rpartition("/")
        if run and stage in STAGES and run not in names:
            names.append(run)
    return names


def find_study(storage: Storage, run: str, stage: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=study_name(run, stage), storage=storage.rdb)
    except KeyError:
        return None
