"""A command refused as bad input leaves no empty SQLite or journal file behind."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from contextlib import contextmanager
from pathlib import Path

from babysit.errors import UsageError


def _journal_file(url: str | None) -> Path | None:
    """The file a journal storage URL names (None for any other URL)."""
    from babysit.storage import resolve_url
    from babysit.storage.url import is_journal
    from babysit.storage.url import journal_path

    resolved = resolve_url(url)
    return journal_path(resolved) if is_journal(resolved) else None


def _sqlite_file(url: str | None) -> Path | None:
    """The file an SQLite storage URL names (None for a server database or a bad URL)."""
    from sqlalchemy.engine import make_url

    from babysit.storage import resolve_url

    try:
        parsed = make_url(resolve_url(url))
    except Exception:  # noqa: BLE001 - open_storage reports a bad URL in its own words
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)


@contextmanager
def nothing_left_if_rejected(url: str | None) -> Iterator[None]:
    """A command refused as bad input (exit 2) leaves no database behind: opening an SQLite
    storage creates its file before the dataset or the model has been checked, and an empty
    babysit.db in the working directory looked like a run had started. Removed only when
    this command created it and it holds no study (nothing stored is ever lost)."""
    journal = _journal_file(url)
    path = None if journal else _sqlite_file(url)
    existed = path is None or path.exists()
    journal_existed = journal is None or journal.exists()
    try:
        yield
    except UsageError:
        # A journal file holds a line per write: one this command created and left empty
        # holds nothing.
        if not journal_existed and journal is not None and journal.is_file():
            if journal.stat().st_size == 0:
                journal.unlink()
        if not existed and path is not None and path.exists():
            import sqlite3

            try:
                with closing(sqlite3.connect(path)) as db:
                    empty = db.execute("SELECT count(*) FROM studies").fetchone()[0] == 0
            except sqlite3.Error:  # not Optuna's tables, or unreadable: leave it alone
                empty = False
            if empty:
                for suffix in ("", "-journal", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
        raise
