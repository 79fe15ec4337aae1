"""Storage URL -> Optuna storage, artifact store and study names. Nobody else parses URLs.

The pieces live beside it: babysit.storage.url (defaults, redaction), babysit.storage.errors
(what a failed call means) and babysit.storage.rdb (the reconnecting RDBStorage); their
public names are importable from here."""

from __future__ import annotations

import os
import random
import time
import warnings
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from babysit.errors import UsageError
from babysit.storage.rdb import DEFAULT_GRACE
from babysit.storage.rdb import DEFAULT_HEARTBEAT
from babysit.storage.rdb import DEFAULT_RECONNECT
from babysit.storage.rdb import _ReconnectingRDBStorage
from babysit.storage.url import default_artifact_dir
from babysit.storage.url import is_journal
from babysit.storage.url import journal_path
from babysit.storage.url import redact
from babysit.storage.url import redact_text
from babysit.storage.url import resolve_url


@dataclass
class Storage:
    url: str = field(repr=False)  # may hold a password; print .shown
    # An RDBStorage, for grpc://host:port the client of `babysit storage-proxy`, for
    # journal://PATH Optuna's JournalStorage (babysit/storage/journal.py).
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
                from babysit.storage.remote import S3ArtifactStore

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


_CREATE_ATTEMPTS = 8


def _lost_creation_race(err: BaseException) -> bool:
    """Whether opening failed only because another process was creating the same schema.

    Optuna creates its tables and then inserts the schema version row; two processes
    doing it at once on a new database see "table ... already exists" or a duplicate
    version row (SQLite), or a duplicate type or relation (PostgreSQL).
    """
    text = str(err).lower()
    if isinstance(err, sqlalchemy.exc.IntegrityError):
        return "alembic_version" in text or "pg_type" in text or "duplicate key" in text
    return isinstance(err, sqlalchemy.exc.OperationalError | sqlalchemy.exc.ProgrammingError) and (
        "already exists" in text
    )


def _check_sqlite_file(db: str | None, create: bool, shown: str) -> None:
    """An SQLite storage is a file: one that keeps something, in a folder that exists, and
    already there unless ``create``."""
    if not db or db == ":memory:":
        raise UsageError("an in-memory SQLite storage keeps nothing; give sqlite:///file.db")
    path = Path(db)
    if not create and not path.exists():
        raise UsageError(f"no storage at {path}; run `babysit run` first or pass --storage")
    if not path.parent.exists():
        raise UsageError(f"folder {path.parent} for storage {shown} does not exist")


def check_url(url: str) -> Any:
    """The parsed database URL, or the one line that says what is wrong with it; touches
    nothing (`babysit submit` checks the URL its jobs will open before submitting them)."""
    shown = redact(url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise UsageError(
            f"cannot parse storage URL '{shown}'; use sqlite:///path.db, "
            "journal:///shared/path/run.journal or postgresql+psycopg://user@host/db"
        ) from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql", "mysql"):
        raise UsageError(
            f"unsupported storage '{shown}'; use sqlite:///path.db, "
            "journal:///shared/path/run.journal or postgresql+psycopg://user@host/db"
        )
    return parsed


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
    store = (
        artifact_store
        or (None if artifact_dir else os.environ.get("BABYSIT_ARTIFACT_STORE"))
        or None
    )
    if store and not store.startswith("s3://"):
        # A plain folder is accepted here too: --artifact-store DIR is --artifact-dir DIR.
        artifact_dir, store = artifact_dir or store, None
    if url.startswith("grpc://"):
        return _open_proxy(url, artifact_dir, store, heartbeat, grace)
    if is_journal(url):
        return _open_journal(url, artifact_dir, store, heartbeat, grace, create)
    parsed = check_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql" and parsed.drivername == "postgresql":
        # psycopg (v3) is the driver we ship; plain postgresql:// would ask for psycopg2.
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if backend == "sqlite":
        _check_sqlite_file(parsed.database, create, shown)
    interval = (
        heartbeat if heartbeat is not None else _int_env("BABYSIT_HEARTBEAT", DEFAULT_HEARTBEAT)
    )
    grace_period = grace if grace is not None else _int_env("BABYSIT_GRACE", DEFAULT_GRACE)
    engine_kwargs: dict = {"pool_pre_ping": True}
    if backend == "sqlite":
        # Several processes share one file on one machine: wait for the lock, don't fail.
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                rdb = _ReconnectingRDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=interval,
                    grace_period=grace_period,
                )
            break
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as err:
            if _lost_creation_race(err) and attempt + 1 < _CREATE_ATTEMPTS:
                # Another process created the schema at the same moment (workers started
                # together on a new file); its tables are there now, so opening again works.
                time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
                continue
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UsageError(f"cannot open storage {shown}: {redact_text(reason, url)}") from None
    rdb.shown = shown
    rdb.reconnect = _int_env("BABYSIT_RECONNECT", DEFAULT_RECONNECT)
    return _with_artifacts(Storage(url=url, rdb=rdb, artifact_dir=Path(".")), artifact_dir, store)


def _with_artifacts(
    storage: Storage, artifact_dir: str | Path | None, store: str | None
) -> Storage:
    storage.artifact_dir = (
        Path(artifact_dir) if artifact_dir else default_artifact_dir(storage.url)
    )
    if store:
        from babysit.storage.remote import S3ArtifactStore

        storage.artifact_store = store
        storage._s3 = S3ArtifactStore(store)
        storage._s3.check()
    return storage


def _open_proxy(
    url: str,
    artifact_dir: str | Path | None,
    store: str | None,
    heartbeat: int | None,
    grace: int | None,
) -> Storage:
    from babysit.storage.remote import open_proxy

    interval = (
        heartbeat if heartbeat is not None else _int_env("BABYSIT_HEARTBEAT", DEFAULT_HEARTBEAT)
    )
    grace_period = grace if grace is not None else _int_env("BABYSIT_GRACE", DEFAULT_GRACE)
    proxy = open_proxy(
        url, interval, grace_period, reconnect=_int_env("BABYSIT_RECONNECT", DEFAULT_RECONNECT)
    )
    return _with_artifacts(
        Storage(url=url, rdb=proxy, artifact_dir=Path(".")), artifact_dir, store
    )


def _open_journal(
    url: str,
    artifact_dir: str | Path | None,
    store: str | None,
    heartbeat: int | None,
    grace: int | None,
    create: bool,
) -> Storage:
    """Optuna's journal file storage: a file on a (shared) disk, no server."""
    from babysit.storage.journal import HeartbeatJournalStorage

    path = journal_path(url)
    if not str(path) or str(path) in (".", "/") or path.is_dir():
        raise UsageError(f"storage {url} names no file; give journal:///shared/path/run.journal")
    if not create and not path.exists():
        raise UsageError(f"no storage at {path}; run `babysit run` first or pass --storage")
    if not path.parent.exists():
        raise UsageError(f"folder {path.parent} for storage {url} does not exist")
    interval = (
        heartbeat if heartbeat is not None else _int_env("BABYSIT_HEARTBEAT", DEFAULT_HEARTBEAT)
    )
    grace_period = grace if grace is not None else _int_env("BABYSIT_GRACE", DEFAULT_GRACE)
    try:
        journal = HeartbeatJournalStorage(str(path), heartbeat=interval, grace=grace_period)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot open storage {url}: {err}") from None
    return _with_artifacts(
        Storage(url=url, rdb=journal, artifact_dir=Path(".")), artifact_dir, store
    )
