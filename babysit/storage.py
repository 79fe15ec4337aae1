"""Storage URL -> Optuna storage, artifact store and study names. Nobody else parses URLs."""

from __future__ import annotations

import functools
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.artifacts import FileSystemArtifactStore
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


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for output, logs and attrs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<unparseable storage URL>"


class StorageLost(BabysitError):
    """The database stayed unreachable for longer than the reconnect window."""

    exit_code = 1


def _connection_error(err: BaseException) -> BaseException | None:
    """The connection-level error behind ``err`` (server gone, restarting, refusing), if any.

    Optuna wraps SQLAlchemy's errors in StorageInternalError; bad data raises other errors,
    which are not retried.
    """
    for e in (err, err.__cause__):
        if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return e
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return e
    return None


class _ReconnectingRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage that rides out a database restart.

    ``pool_pre_ping`` replaces the connections a restarted server dropped, but a call made
    while the server is down still fails, and Optuna gives up at once: the heartbeat thread
    dies (the live trial then looks stale and is failed under its worker) and the trial's
    next write crashes the worker with a traceback. Each call here retries for up to
    ``reconnect`` seconds, counted from the first failure, then raises StorageLost.
    """

    reconnect: float = DEFAULT_RECONNECT
    shown: str = ""
    _down_since: float | None = None

    def _lost(self, err: BaseException) -> StorageLost:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return StorageLost(
            f"lost the connection to storage {self.shown} for {self.reconnect:g} s "
            f"({redact_text(reason, self.url)}); finished trials are stored, the running one "
            "is marked FAIL once its heartbeat is stale. Rerun the same command when the "
            "database is back"
        )

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            _retrying_call(self, optuna.storages.RDBStorage.record_heartbeat, trial_id)
        except StorageLost:
            pass  # the thread must live on; the main thread reports the loss


def redact_text(text: str, url: str) -> str:
    """``text`` with the password of ``url`` (and the URL itself) hidden."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return text
    text = text.replace(url, redact(url))
    if parsed.password:
        text = text.replace(str(parsed.password), "***")
    return text


def _retrying_call(storage: _ReconnectingRDBStorage, method: Callable[..., Any],
                   *args: Any, **kwargs: Any) -> Any:
    delay = 0.25
    while True:
        try:
            result = method(storage, *args, **kwargs)
        except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as err:
            cause = _connection_error(err)
            if cause is None:
                raise
            now = time.monotonic()
            if storage._down_since is None:
                storage._down_since = now
                print(f"babysit: storage {storage.shown} unreachable; retrying for up to "
                      f"{storage.reconnect:g} s", file=sys.stderr, flush=True)
            if now - storage._down_since >= storage.reconnect:
                raise storage._lost(cause) from None
            time.sleep(delay)
            delay = min(2 * delay, 2.0)
            continue
        if storage._down_since is not None:
            storage._down_since = None
            print(f"babysit: storage {storage.shown} reachable again", file=sys.stderr,
                  flush=True)
        return result


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
