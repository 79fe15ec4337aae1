"""Leslie Smith's LR range test (Cyclical Learning Rates, 2017, section 3.3), and the coarse
learning-rate range it proposes for a run (``coarse.lr_range_test``).

Numbers only: the test's curve is drawn in babysit/report/plots.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING
from typing import Any

import torch
from torch import nn

from babysit.data.device import DeviceData
from babysit.training.diagnostics import FLAT_TOLERANCE
from babysit.training.step import diverged
from babysit.training.step import make_optimizer
from babysit.training.step import train_step

if TYPE_CHECKING:
    from babysit.data.streaming import StreamingData
    from babysit.stages.context import Context


def lr_range_test(
    model: nn.Module,
    data: DeviceData | StreamingData,
    *,
    optimizer: str = "adam",
    loss: str = "ce",
    batch_size: int = 64,
    start: float = 1e-7,
    end: float = 10.0,
    steps: int = 300,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    diverge_factor: float = 4.0,
    smoothing: float = 0.98,
    seed: int = 0,
) -> dict[str, Any]:
    """Leslie Smith's LR range test (Cyclical Learning Rates, 2017, section 3.3).

    The LR grows exponentially from ``start`` to ``end`` over ``steps`` steps, one batch
    each; the test stops when the smoothed loss exceeds ``diverge_factor`` x its minimum
    (fastai's 4x) or turns NaN. The model is trained in place: pass a fresh one.

    The proposed coarse range, ``suggested = [low, high]``: ``high`` is the LR at the
    smoothed loss's minimum (beyond it the loss climbs: Smith's upper bound); ``low`` is
    the LR where the smoothed loss first fell ``FLAT_TOLERANCE`` below its start (below
    it the loss barely moves), at most ``high``/100 so the search spans two decades.
    """
    opt = make_optimizer(optimizer, model.parameters(), start, weight_decay, momentum)
    gen = torch.Generator(device=data.device).manual_seed(seed)
    factor = (end / start) ** (1.0 / max(1, steps - 1))
    lrs: list[float] = []
    losses: list[float] = []
    smooth = 0.0
    best = math.inf
    stopped = "end"
    model.train()
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(())
    for i in range(steps):
        lr = start * factor**i
        for group in opt.param_groups:
            group["lr"] = lr
        try:
            xraw, yb = next(batches)
        except StopIteration:
            batches = data.train_batches(batch_size, gen)
            xraw, yb = next(batches)
        xb = data.pre(xraw, train=True, generator=gen)
        batch_loss, _ = train_step(model, opt, xb, yb, loss)
        value = float(batch_loss)
        if diverged(value):
            stopped = "nan"
            break
        # Debiased exponential average, as fastai's lr_find: raw batch losses are too noisy
        # to read a minimum from.
        smooth = smoothing * smooth + (1 - smoothing) * value
        value = smooth / (1 - smoothing ** (i + 1))
        lrs.append(lr)
        losses.append(value)
        best = min(best, value)
        if value > diverge_factor * best:
            stopped = "diverged"
            break
    suggested = _suggest(lrs, losses) if lrs else [start, end]
    return {"lrs": lrs, "losses": losses, "suggested": suggested, "stopped": stopped}


def _suggest(lrs: list[float], losses: list[float]) -> list[float]:
    i_min = min(range(len(losses)), key=lambda i: losses[i])
    high = lrs[i_min]
    first = losses[0]
    moving = next(
        (lrs[i] for i in range(i_min + 1) if losses[i] < first * (1 - FLAT_TOLERANCE)), high
    )
    low = min(moving, high / 100)
    return [low, high]


def propose_coarse_lr(ctx: Context, steps: int = 300) -> dict[str, Any]:
    """The LR range test on a fresh copy of the run's network; ``suggested`` is the
    proposed ``coarse.lr``."""
    from babysit.training.models import build_model
    from babysit.training.models import fit_head_to_data

    spec = ctx.spec
    torch.manual_seed(spec.seed)
    data = ctx.data
    model = build_model(
        spec.model, data.num_classes, data.in_channels, data.pre.resize or data.image_size
    ).to(ctx.device)
    fit_head_to_data(model, spec.model.name, data, spec.loss)  # as every trial's network is
    return lr_range_test(
        model,
        data,
        optimizer=spec.optimizer,
        loss=spec.loss,
        batch_size=ctx.batch_size,
        steps=steps,
        momentum=spec.momentum,
        seed=spec.seed,
    )
