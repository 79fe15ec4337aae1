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
    """DistributedDataParallel around ``model``, on the rank's own device, its BatchNorm
    layers normalising over the global batch (:func:`sync_batch_norm`)."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    sync_batch_norm(model)
    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks. Backward: each rank's input fed every rank's
    output, so its gradient is the sum of the output gradients over the ranks.
    (torch.distributed.nn.functional.all_reduce does the same and is deprecated.)"""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch: the
    per-channel mean and variance summed over every rank's shard (gloo, on the CPU, where
    torch's SyncBatchNorm refuses to run). Two collectives per layer and step: the sums
    and counts, then the squared deviations from the global mean (two passes, as
    F.batch_norm computes them, rather than E[x^2] - E[x]^2). Both are
    :class:`_SumOverRanks`, a sum with a backward: the gradient of each rank's loss reaches
    the other ranks' activations through the shared statistics, as in one process. In eval mode it is a plain BatchNorm2d with the running
    statistics (no collective: rank 0 alone evaluates the test split)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _SumOverRanks.apply
        dims = [0, 2, 3]
        count = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x - mean.view(1, -1, 1, 1)
        var = all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None and self.num_batches_tracked is not None
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out


def sync_batch_norm(model: nn.Module) -> None:
    """Every BatchNorm2d of ``model`` normalising over the global batch, in place.

    Why (issue 24): with plain BatchNorm each rank normalises its activations over its
    own shard, ``batch // N`` examples, and keeps running statistics of its own (DDP then
    copies rank 0's to the others at each forward). The same step on one process
    normalises over the whole batch, so N ranks compute another function of the weights,
    with noisier statistics, and another gradient. Measured
    (tests/stages/final/test_ddp_equivalence.py: a small AlexNet with BatchNorm after every
    conv, 6 SGD steps, global batch 32): 2 gloo ranks with per-rank BatchNorm ended up to
    1.6e-2 from one process's weights and 0.39 from its running statistics; synchronised,
    1.2e-7 and 4.8e-7. The default AlexNet has no BatchNorm (``model.batch_norm =
    "none"``); there 2 ranks already took one process's steps, and the 1-vs-2 gaps seen at
    a few epochs are seed noise (docs/benchmarks.md, "One process or two"). Synchronised, step k of N ranks is step k of one process. CUDA:
    torch's SyncBatchNorm (NCCL); elsewhere :class:`GlobalBatchNorm2d`. The new layers hold
    the old ones' parameters and a copy of their buffers under the same names, so
    state_dict keys, checkpoints and the model file do not change."""
    device = next(model.parameters()).device
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.BatchNorm2d:
                continue
            if device.type == "cuda":
                synced: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(child)
            else:
                synced = GlobalBatchNorm2d(
                    child.num_features,
                    child.eps,
                    child.momentum,
                    child.affine,
                    child.track_running_stats,
                )
                synced.load_state_dict(child.state_dict())
                synced.to(device)
                if child.affine:
                    synced.weight, synced.bias = child.weight, child.bias
                synced.train(child.training)
            setattr(parent, name, synced)


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
