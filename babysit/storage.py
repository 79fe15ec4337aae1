"""Storage URL -> Optuna storage, artifact store and study names. Nobody else parses URLs."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
from optuna.artifacts import FileSystemArtifactStore
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from babysit.errors import UsageError

DEFAULT_STORAGE = "sqlite:///babysit.db"
STAGES = ("sanity", "overfit", "coarse", "fine", "final")

# A worker whose heartbeat is older than the grace period is presumed dead and its trial
# is marked FAIL (and replaced). 10 s / 60 s keep the database load low while a killed
# worker's trial is reclaimed within a minute.
DEFAULT_HEARTBEAT = 10
DEFAULT_GRACE = 60


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


@dataclass
class Storage:
    url: str
    rdb: optuna.storages.RDBStorage
    artifact_dir: Path

    @property
    def shown(self) -> str:
        return redact(self.url)

    @property
    def artifacts(self) -> FileSystemArtifactStore:
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
    """Next to an SQLite file; ./babysit-artifacts for a server database."""
    env = os.environ.get("BABYSIT_ARTIFACTS")
    if env:
        return Path(env)
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
) -> Storage:
    """Build the Optuna storage for ``url``; a bad or unreachable URL is a UsageError."""
    url = resolve_url(url)
    shown = redact(url)
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
            rdb = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=interval,
                grace_period=grace_period,
            )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        reason = reason.replace(url, shown)
        if parsed.password:
            reason = reason.replace(parsed.password, "***")
        raise UsageError(f"cannot open storage {shown}: {reason}") from None
    art = Path(artifact_dir) if artifact_dir else default_artifact_dir(url)
    return Storage(url=url, rdb=rdb, artifact_dir=art)


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
