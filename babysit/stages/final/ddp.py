"""The collectives the final stage calls while it runs as one rank of DistributedDataParallel.

Apart from babysit/stages/final/launch.py (which launches the ranks and imports the final stage), so
the final stage can use them without importing its own launcher back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def wrap(model: nn.Module) -> nn.Module:
    """DistributedDataParallel around ``model``, on the rank's own device."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_mean(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return [float(v) / dist.get_world_size() for v in t.cpu()]


def from_rank0(values: list[float]) -> list[float]:
    """Rank 0's numbers on every rank, so every rank takes the same decisions."""
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.broadcast(t, 0)
    return [float(v) for v in t.cpu()]


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (its RNG states, for an exact resume) in a list on rank 0."""
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
