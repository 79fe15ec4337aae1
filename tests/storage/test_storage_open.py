"""Opening a new storage from several processes at once: workers started together on a
new SQLite file or an empty PostgreSQL database all get in (Optuna creates the schema on
first open, and two creators race)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from babysit.storage import open_storage


def _open_together(url: str, artifact_dir: Path, n: int) -> list[str]:
    start = threading.Barrier(n)
    errors: list[str] = []

    def go() -> None:
        start.wait()
        try:
            open_storage(url, artifact_dir=artifact_dir).rdb.get_all_studies()
        except Exception as err:  # noqa: BLE001 - every failure is the finding
            errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=go) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_workers_opening_a_new_sqlite_file_together_all_get_in(tmp_path: Path) -> None:
    # Before the fix every round failed with "table studies already exists" or a
    # duplicate alembic_version row in all but one opener.
    for round_ in range(5):
        db = tmp_path / f"r{round_}.db"
        assert _open_together(f"sqlite:///{db}", tmp_path, 6) == []


@pytest.mark.postgres
def test_workers_opening_an_empty_postgres_database_together_all_get_in(
    tmp_path: Path, postgres_url: str
) -> None:
    assert _open_together(postgres_url, tmp_path, 6) == []
