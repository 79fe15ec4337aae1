"""A storage URL becomes an Optuna storage and an artifact store (open.py); URLs and their
redaction (url.py), what a failed call means (errors.py), the reconnecting RDBStorage
(rdb.py), the gRPC proxy and S3 (remote.py). Knows no run and no stage. The face below is
what the rest of the package imports."""

from __future__ import annotations

from babysit.storage.errors import StorageLost
from babysit.storage.errors import StorageRefused
from babysit.storage.errors import storage_refusal
from babysit.storage.open import Storage
from babysit.storage.open import open_storage
from babysit.storage.url import DEFAULT_STORAGE
from babysit.storage.url import redact
from babysit.storage.url import resolve_url

__all__ = [
    "DEFAULT_STORAGE",
    "Storage",
    "StorageLost",
    "StorageRefused",
    "open_storage",
    "redact",
    "resolve_url",
    "storage_refusal",
]
