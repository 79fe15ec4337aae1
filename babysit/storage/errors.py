"""What a failed storage call means: an outage to wait out, a brief conflict to retry, or
a refusal that ends the run at once (see _classify), and the errors babysit raises for them."""

from __future__ import annotations

import sqlite3

import sqlalchemy

from babysit.errors import BabysitError
from babysit.errors import UsageError
from babysit.storage.url import redact
from babysit.storage.url import redact_text


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
    for _ in range(8):  # StorageInternalError -> SQLAlchemy error -> driver error
        if e is None:
            break
        if isinstance(e, sqlalchemy.exc.PendingRollbackError):
            # A statement ran on a transaction that an earlier error spoilt: Optuna's
            # _get_trials falls back to a slower query in the same session after an
            # OperationalError, so a server restart mid-query surfaces as this. What it
            # means is what the earlier error (its context) meant; "can't reconnect" is
            # SQLAlchemy's words for a connection invalidated inside a transaction. Optuna's
            # scoped session rolls back on the way out, so a retry starts clean.
            if e.__context__ is not None:
                kind, cause = _classify(e.__context__)
                if kind is not None:
                    return kind, cause
            if "can't reconnect" in str(e).lower():
                return _OUTAGE, e
            return None, e
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
                if (
                    isinstance(orig, sqlite3.OperationalError)
                    or type(orig) is sqlite3.DatabaseError
                ):
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
        return (
            "its tables are missing or of another version; pass a storage babysit "
            "created, or a new one"
        )
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
