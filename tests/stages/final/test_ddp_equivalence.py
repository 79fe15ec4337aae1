"""Two DDP ranks (gloo, real processes) take the same steps as one process: the same weights
and the same BatchNorm running statistics after the same steps on the same global batches
(babysit/stages/final/ddp.py, ``sync_batch_norm``), where plain per-rank BatchNorm drifts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from babysit.stages.final.ddp import GlobalBatchNorm2d
from babysit.stages.final.ddp import wrap
from babysit.training.models import AlexNet
from babysit.training.step import make_optimizer
from babysit.training.step import train_step

# Two spawned ranks (torch imported in each): a few seconds alone, more on a loaded machine.
pytestmark = pytest.mark.slow

BATCH = 32  # global; 16 per rank
STEPS = 6
LR = 0.05


def _setup() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A small BatchNorm AlexNet (babysit's own, BatchNorm after every conv, no dropout) and
    the data of ``STEPS`` global batches, the same in every process."""
    torch.manual_seed(0)
    model = AlexNet(
        4,
        in_channels=1,
        conv_layers=3,
        fc_layers=2,
        fc_width=32,
        batch_norm="all",
        dropout=0.0,
        init="he",
    )
    x = torch.randn(STEPS * BATCH, 1, 8, 8)
    y = torch.randint(0, 4, (STEPS * BATCH,))
    x = x + y.view(-1, 1, 1, 1).float()  # something to learn
    return model, x, y


def _train(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int, world: int) -> None:
    opt = make_optimizer("sgd", net.parameters(), LR, 0.0, 0.9)
    for k in range(STEPS):
        # The shard rule of DeviceData.train_batches: rank r takes every world-th example.
        xb = x[k * BATCH : (k + 1) * BATCH][rank::world]
        yb = y[k * BATCH : (k + 1) * BATCH][rank::world]
        train_step(net, opt, xb, yb, "ce")


def _rank(rank: int, world: int, tmp: str, synced: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world
    )
    try:
        model, x, y = _setup()
        if synced:
            net = wrap(model)  # what the final's ranks train
        else:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model)  # per-rank BatchNorm, as before issue 24
        _train(net, x, y, rank, world)
        if rank == 0:
            torch.save(model.state_dict(), os.path.join(tmp, f"synced-{synced}.pt"))
    finally:
        dist.destroy_process_group()


def _gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {k: float((a[k].double() - b[k].double()).abs().max()) for k in a}


def test_two_ranks_take_the_steps_of_one_process(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model, x, y = _setup()
    _train(model, x, y, 0, 1)
    one = model.state_dict()
    results = {}
    for synced in (True, False):
        folder = tmp_path / str(synced)
        folder.mkdir()
        mp.spawn(_rank, args=(2, str(folder), synced), nprocs=2)
        results[synced] = torch.load(folder / f"synced-{synced}.pt", weights_only=True)
    # The checkpoint and the model file keep BatchNorm2d's keys.
    assert results[True].keys() == one.keys()
    synced_gap = _gap(results[True], one)
    plain_gap = _gap(results[False], one)
    weights = [k for k in one if k.endswith("weight") or k.endswith("bias")]
    stats = [k for k in one if k.endswith("running_mean") or k.endswith("running_var")]
    # Synchronised: one process's weights and running statistics, to float rounding.
    assert max(synced_gap[k] for k in weights + stats) < 1e-4, synced_gap
    # Per-rank BatchNorm: another training (the cause this guards against).
    assert max(plain_gap[k] for k in weights) > 1e-3, plain_gap
    assert max(plain_gap[k] for k in stats) > 1e-3, plain_gap


def test_global_batch_norm_is_batch_norm_without_a_process_group() -> None:
    torch.manual_seed(1)
    plain = torch.nn.BatchNorm2d(3)
    ours = GlobalBatchNorm2d(3)
    x = torch.randn(8, 3, 4, 4)
    for mode in (True, False):
        plain.train(mode)
        ours.train(mode)
        assert torch.allclose(plain(x), ours(x))
