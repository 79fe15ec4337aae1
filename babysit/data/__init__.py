"""The dataset registry: a name (or ``module:callable``) -> fixed train / val / test splits.

Every entry yields uint8 images (N, C, H, W) and int64 labels, so the training loop can
hold a split as one tensor on the device and take batches as index slices.

The shared types (Splits, DataRequest, DatasetEntry, DataError) live in babysit.data.core,
which the loaders and babysit.refs import, so nothing the registry loads imports the
registry back; they are importable from here as before.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from babysit.data.core import _REGISTRY
from babysit.data.core import DataError
from babysit.data.core import DataRequest
from babysit.data.core import DatasetEntry
from babysit.data.core import Splits
from babysit.data.core import default_data_dir
from babysit.data.core import register
from babysit.data.core import seeded_split
from babysit.errors import UsageError
from babysit.spec import DataSpec

if TYPE_CHECKING:
    from babysit.data.streaming import DatasetSplits

__all__ = [
    "DataError",
    "DataRequest",
    "DatasetEntry",
    "Splits",
    "default_data_dir",
    "describe_dataset",
    "load_dataset",
    "register",
    "registered",
    "seeded_split",
]


def registered() -> dict[str, DatasetEntry]:
    _load_builtins()
    return dict(_REGISTRY)


def _load_builtins() -> None:
    # Imported here so that a dataset's heavy dependencies load only when it is used.
    from babysit.data import bundled  # noqa: F401

    for module in ("cifar10", "fddb", "imagefolder"):
        try:
            __import__(f"babysit.data.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"babysit.data.{module}":
                raise


def load_dataset(name: str, request: DataRequest) -> Splits | DatasetSplits:
    """Resolve ``name`` (a registered name or ``module:callable``) and load its splits
    (a ``module:callable`` may return Datasets, streamed rather than preloaded)."""
    _load_builtins()
    if ":" in name:
        from babysit.data.user import load_user_dataset

        splits = load_user_dataset(name, request)
    elif name in _REGISTRY:
        splits = _REGISTRY[name].load(request)
    else:
        known = ", ".join(sorted(_REGISTRY))
        raise UsageError(
            f"unknown dataset '{name}'; choose one of: {known}, or give module:callable"
        )
    splits.check(name)
    return splits


def describe_dataset(
    name: str, data_dir: Path, options: Any = None, seed: int = 0
) -> dict[str, Any]:
    """What `babysit datasets` says of a registered dataset: its files (the entry's
    describe) and, when they are here, the split sizes a run with ``options`` (default: the
    spec's data defaults) and ``seed`` stores, by loading it as a run does: one computation,
    so the listing cannot drift from the runs. When the data cannot be loaded, ``sizes`` is
    None and ``missing`` says why: ``not downloaded: ...`` when its files are not here,
    ``cannot be loaded: ...`` when they are but loading them fails."""
    entry = registered()[name]
    info: dict[str, Any] = {"name": name, "summary": entry.summary, **entry.describe(data_dir)}
    request = DataRequest(
        data_dir=Path(data_dir),
        seed=seed,
        download=False,
        options=options if options is not None else DataSpec(),
        quiet=True,
    )
    try:
        with warnings.catch_warnings():
            # Skipped files are a run's business; the listing only counts what loads.
            warnings.simplefilter("ignore")
            splits = load_dataset(name, request)
    except UsageError as err:
        why = "cannot be loaded" if info.get("present") else "not downloaded"
        info.update(present=False, sizes=None, missing=f"{why}: {err}")
        return info
    info.update(
        present=True,
        sizes=splits.sizes(),
        image=f"{splits.in_channels}x{splits.image_size}x{splits.image_size}",
    )
    return info
