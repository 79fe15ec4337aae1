"""The types every dataset shares: its splits, what a loader is asked for, the registry
entry, and the error for missing or bad data. Loaders import these from here; the package
(babysit.data) adds the lookup by name on top."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import torch

from babysit.errors import UsageError


class DataError(UsageError):
    """Missing, corrupt or unsafe data: exit 2 with a line that says what to do."""


# A published dataset that is missing is downloaded, as a user who typed `babysit run
# --dataset fddb` expects, unless downloads are off: `--offline`, or this variable set to
# anything but "", "0", "false" or "no" (for clusters whose nodes have no internet).
OFFLINE_ENV = "BABYSIT_OFFLINE"


def offline_by_env() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def wants_download(download: bool | None, offline: bool = False) -> bool:
    """Whether a loader may fetch a missing dataset: ``download`` True asks for it (the
    `--download` flag), False forbids it; None (the default) downloads unless offline."""
    if download is not None:
        return download
    return not (offline or offline_by_env())


def say_download(what: str, size: str, data_dir: Path, quiet: bool) -> None:
    """The line before a download starts: what, how big, where, and how not to."""
    if not quiet:
        print(
            f"{what} is not in {data_dir}: downloading it ({size}) into {data_dir}; "
            f"--offline or {OFFLINE_ENV}=1 stops this",
            file=sys.stderr,
            flush=True,
        )


@dataclass
class Splits:
    classes: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    # Counts and warnings from loading (skipped files, checksum mismatches), for the summary.
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    def sizes(self) -> dict[str, int]:
        return {
            "train": int(self.train_x.shape[0]),
            "val": int(self.val_x.shape[0]),
            "test": int(self.test_x.shape[0]),
        }

    def check(self, source: str) -> None:
        """Reject splits that would train on nonsense: wrong dtypes, shapes, labels."""
        for part in ("train", "val", "test"):
            x = getattr(self, f"{part}_x")
            y = getattr(self, f"{part}_y")
            if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
                raise DataError(
                    f"dataset {source}: {part} images must be a uint8 tensor (N, C, H, W)"
                )
            if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise DataError(
                    f"dataset {source}: {part} labels must be a 1-D tensor, one per image"
                )
            if x.shape[0] == 0:
                raise DataError(f"dataset {source}: the {part} split is empty")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
                raise DataError(
                    f"dataset {source}: {part} labels fall outside 0..{len(self.classes) - 1} "
                    f"({len(self.classes)} classes)"
                )


@dataclass(frozen=True)
class DataRequest:
    """What a loader is asked for: where files live and the spec's data options."""

    data_dir: Path
    seed: int
    download: bool
    options: Any  # babysit.spec.DataSpec
    # No progress bars (--quiet), for loaders that download or build at length.
    quiet: bool = False


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    summary: str
    load: Callable[[DataRequest], Splits]
    # Files present and where they are looked for, for `babysit datasets` (the split sizes
    # come from loading, see babysit.data.describe_dataset, so they are the ones a run uses).
    describe: Callable[[Path], dict[str, Any]]


_REGISTRY: dict[str, DatasetEntry] = {}


def register(entry: DatasetEntry) -> None:
    _REGISTRY[entry.name] = entry


def default_data_dir() -> Path:
    env = os.environ.get("BABYSIT_DATA")
    return Path(env) if env else Path.home() / ".cache" / "babysit"


def seeded_split(
    x: torch.Tensor, y: torch.Tensor, val_fraction: float, test_fraction: float, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Stratified train / val / test split that depends only on ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[], [], []]
    for label in torch.unique(y):
        idx = torch.nonzero(y == label).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_val = max(1, round(idx.numel() * val_fraction))
        n_test = max(1, round(idx.numel() * test_fraction))
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
        parts[0].append(idx[n_val + n_test :])
    out = []
    for chunks in parts:
        idx = torch.cat(chunks)
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        out.append((x[idx].contiguous(), y[idx].contiguous()))
    return tuple(out)
