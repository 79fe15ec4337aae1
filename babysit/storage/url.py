"""Storage URLs: the default, the environment, and how a URL is shown with its password
hidden (in output, logs, attrs and error messages)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_STORAGE = "sqlite:///babysit.db"
# Optuna's journal file storage: everything after the scheme is the file's path, as in a
# file:// URL, so journal:///shared/runs/run.journal is absolute and journal://run.journal
# is relative to the working directory.
JOURNAL_SCHEME = "journal://"


def resolve_url(url: str | None) -> str:
    return url or os.environ.get("BABYSIT_STORAGE") or DEFAULT_STORAGE


def is_journal(url: str) -> bool:
    return url.startswith(JOURNAL_SCHEME)


def journal_path(url: str) -> Path:
    """The journal file a ``journal://PATH`` URL names."""
    return Path(url[len(JOURNAL_SCHEME) :])


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
        return f"{scheme}{user}:***@{url[len(scheme) + len(user) + 1 + len(password) + 1 :]}"
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        # Shown as typed ("nonsense"), so the person sees what was wrong; only a text that
        # may hold a password (user info before an '@') stays hidden.
        return "<unparseable storage URL>" if "@" in url else url


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


def default_artifact_dir(url: str) -> Path:
    """Next to an SQLite or journal file; ./babysit-artifacts for a server database or a
    proxy."""
    env = os.environ.get("BABYSIT_ARTIFACTS")
    if env:
        return Path(env)
    if url.startswith("grpc://"):
        return Path("babysit-artifacts")
    if is_journal(url):
        path = journal_path(url)
        return path.with_name(path.name + ".artifacts")
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        db = Path(parsed.database)
        return db.with_name(db.name + ".artifacts")
    return Path("babysit-artifacts")
