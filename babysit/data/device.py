"""The three splits on the training device as uint8 tensors, plus the batched
preprocessing; a batch is an index slice of a permutation drawn on that device.
Beside babysit/data/streaming.py's StreamingData, the same interface over torch
Datasets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from babysit.data import Splits
from babysit.data.augment import Preprocess

if TYPE_CHECKING:
    # The same interface over torch Datasets (DataLoader batches); for the types only.
    pass


@dataclass
class DeviceData:
    """The three splits on the training device, plus the batched preprocessing."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    pre: Preprocess
    num_classes: int

    @classmethod
    def from_splits(cls, splits: Splits, pre: Preprocess, device: torch.device) -> DeviceData:
        return cls(
            splits.train_x.to(device),
            splits.train_y.to(device),
            splits.val_x.to(device),
            splits.val_y.to(device),
            splits.test_x.to(device),
            splits.test_y.to(device),
            pre.to(device),
            splits.num_classes,
        )

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    @property
    def train_size(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    def val_labels(self) -> torch.Tensor:
        return self.val_y

    def size(self, split: str) -> int:
        return int(getattr(self, f"{split}_x").shape[0])

    def head(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` training examples (already shuffled by the split), on the device."""
        return self.train_x[:n], self.train_y[:n]

    def train_batches(
        self, batch_size: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch: index slices of a permutation drawn on the device (airbench's loader).

        ``shard=(rank, world)``: every rank draws the same permutation and takes every
        world-th index of it from ``rank`` on (the last n % world dropped, so every rank
        runs the same number of steps); batch k of all ranks together is then batch k of
        one process at ``batch_size * world``.
        """
        n = self.train_size
        perm = torch.randperm(n, device=generator.device, generator=generator).to(self.device)
        rank, world = shard
        if world > 1:
            perm = perm[: n - n % world][rank::world]
            n = perm.shape[0]
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            yield self.train_x[idx], self.train_y[idx]

    def batches(self, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x = getattr(self, f"{split}_x")
        y = getattr(self, f"{split}_y")
        for start in range(0, x.shape[0], batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
