"""One plain training step, read top to bottom: zero grads, forward, loss, backward, step
(:func:`train_step`), and the loops built on it: :func:`fit` (epochs of minibatches),
:func:`memorise` (full-batch steps on a small subset); lr_range.lr_range_test uses it too.

The splits live on the training device as uint8 tensors; a batch is an index slice of a
permutation drawn on that device; augmentation and normalisation run batched there too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from babysit.data.augment import Preprocess
from babysit.data.device import DeviceData
from babysit.errors import raise_if_interrupted
from babysit.memory import tune_for_training

if TYPE_CHECKING:
    # The same interface over torch Datasets (DataLoader batches); for the types only.
    from babysit.data.streaming import StreamingData


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    seconds: float


@dataclass
class History:
    epochs: list[EpochStats] = field(default_factory=list)
    # Set when training stopped early: "diverged" (loss NaN/inf or above the bound).
    stopped: str | None = None
    stopped_at_step: int | None = None
    steps: int = 0
    examples: int = 0
    first_loss: float | None = None
    last_loss: float | None = None


def device_for(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def configure_device(device: torch.device) -> None:
    # Fresh gradients every step: from the heap, not from freshly faulted-in mmaps.
    tune_for_training()
    if device.type == "cuda":
        # Fixed input shapes: let cuDNN pick the fastest kernels once.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def channels_last_pays(device: torch.device, model_name: str) -> bool:
    """Whether to hold the network's weights channels-last (NHWC).

    On CUDA tensor cores want NHWC. On the CPU oneDNN's convolutions run NHWC without
    reordering every activation: an AlexNet step at batch 128 took 0.81x the time
    (docs/benchmarks.md, issue 16). On the CPU only for babysit's own networks: a user's
    forward that calls ``.view`` on a conv output fails on a channels-last tensor.
    """
    return device.type == "cuda" or (device.type == "cpu" and model_name == "alexnet")


def autocast(device: torch.device):  # noqa: ANN201
    """bf16 autocast on CUDA; nothing on the CPU, where it would only slow things down."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def make_optimizer(
    name: str,
    params,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,  # noqa: ANN001
) -> torch.optim.Optimizer:
    """adam, adamw (decoupled weight decay), sgd or nesterov (SGD with Nesterov momentum).

    Fused kernels: one pass over all parameters instead of a loop of small ops. On the CPU
    an Adam step over AlexNet's 23M weights drops from 145 ms to 15 ms (SGD: 52 to 12)."""
    params = list(params)
    kinds = {
        "adam": (torch.optim.Adam, {}),
        "adamw": (torch.optim.AdamW, {}),
        "sgd": (torch.optim.SGD, {"momentum": momentum}),
        "nesterov": (torch.optim.SGD, {"momentum": momentum, "nesterov": True}),
    }
    kind, extra = kinds[name]
    try:
        return kind(params, lr=lr, weight_decay=weight_decay, fused=True, **extra)
    except (RuntimeError, ValueError):  # a device or dtype without fused kernels
        return kind(params, lr=lr, weight_decay=weight_decay, **extra)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The share of the initial lr that epoch ``epoch`` (0-based) of ``epochs`` trains at:
    "none" 1; "step" x0.1 from half the epochs on and x0.01 from three quarters on;
    "cosine" 0.5 (1 + cos(pi epoch / epochs)), from 1 at the first epoch towards 0."""
    if schedule == "step":
        return 0.1 ** sum(
            epoch >= math.ceil(epochs * share) for share in (0.5, 0.75) if epochs > 1
        )
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))
    return 1.0


def set_epoch_lr(optimizer: torch.optim.Optimizer, schedule: str, epoch: int, epochs: int) -> None:
    """Each group's lr for ``epoch``: its initial lr (kept in the group, so a checkpoint
    resumes the schedule where it was) times :func:`lr_factor`."""
    for group in optimizer.param_groups:
        base = group.setdefault("initial_lr", group["lr"])
        group["lr"] = base * lr_factor(schedule, epoch, epochs)


def loss_fn(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "bce":
        target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, y)


def expected_initial_loss(kind: str, num_classes: int) -> float:
    """A fresh classifier predicts uniformly: ln C for softmax CE, ln 2 for one-hot BCE."""
    return math.log(2.0) if kind == "bce" else math.log(num_classes)


def forward_loss(
    model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, loss: str, *, mixed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, logits as float32) of one batch. ``mixed``: under :func:`autocast` (bf16
    on CUDA); the sanity check reads the untrained network in full precision."""
    with autocast(xb.device) if mixed else nullcontext():
        logits = model(xb)
    logits = logits.float()
    return loss_fn(loss, logits, yb), logits


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    xb: torch.Tensor,
    yb: torch.Tensor,
    loss: str,
    monitor: Callable[[int, nn.Module, torch.optim.Optimizer, torch.Tensor], None] | None = None,
    step: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: zero grads, forward, loss, backward, ``monitor`` (diagnostics, before the
    weights move), optimizer step. Returns the batch's loss and logits, detached and still
    on the device: reading them is a sync, left to the caller (see :func:`diverged`)."""
    optimizer.zero_grad(set_to_none=True)
    batch_loss, logits = forward_loss(model, xb, yb, loss)
    batch_loss.backward()
    if monitor is not None:  # diagnostics
        monitor(step, model, optimizer, batch_loss)
    optimizer.step()
    return batch_loss.detach(), logits.detach()


def diverged(value: float, above: float | None = None) -> bool:
    """The divergence check on a loss read off the device: NaN/inf, or above ``above``."""
    return not math.isfinite(value) or (above is not None and value > above)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: DeviceData | StreamingData,
    split: str,
    loss: str,
    batch_size: int = 1024,
) -> tuple[float, float]:
    """Mean loss and accuracy over a whole split, in large batches."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=data.device)
    correct = torch.zeros((), device=data.device, dtype=torch.long)
    n = 0
    for xraw, yb in data.batches(split, batch_size):
        xb = data.pre(xraw, train=False)
        with autocast(data.device):
            logits = model(xb)
        total_loss += loss_fn(loss, logits.float(), yb) * yb.shape[0]
        correct += (logits.argmax(dim=1) == yb).sum()
        n += yb.shape[0]
    model.train(was_training)
    return float(total_loss) / max(1, n), float(correct) / max(1, n)


def _epoch_batches(
    data: DeviceData | StreamingData,
    batch_size: int,
    generator: torch.Generator,
    shard: tuple[int, int],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's training batches: all of them, or a rank's shard of the permutation."""
    if shard[1] == 1:
        return data.train_batches(batch_size, generator)
    # Streamed data (babysit/data/streaming.py) has no shards; it never runs data parallel
    # (babysit/stages/final/launch.py trains it on one process).
    assert isinstance(data, DeviceData), type(data)
    return data.train_batches(batch_size, generator, shard=shard)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DeviceData | StreamingData,
    *,
    epochs: int,
    batch_size: int,
    loss: str,
    generator: torch.Generator,
    start_epoch: int = 0,
    diverge_above: float | None = None,
    stop_on_divergence: bool = True,
    check_every: int = 1,
    on_epoch: Callable[[EpochStats], None] | None = None,
    # diagnostics (babysit.training.diagnostics.Monitor): called after each backward, before the step
    monitor: Callable[[int, nn.Module, torch.optim.Optimizer, torch.Tensor], None] | None = None,
    # Data parallel (babysit.stages.final.launch): this rank's shard of each epoch's permutation,
    # and a generator of its own for augmentation (``generator`` draws the permutation,
    # which must stay the same on every rank).
    shard: tuple[int, int] = (0, 1),
    augment_generator: torch.Generator | None = None,
    # LR decay over ``epochs`` (lr_factor); "none" leaves the optimiser's lr alone.
    schedule: str = "none",
) -> History:
    """Train for ``epochs`` epochs; stop on the step the loss diverges.

    ``diverge_above``: a loss above it (or NaN/inf) stops training with
    ``history.stopped == "diverged"``. ``stop_on_divergence=False`` trains on regardless,
    the way the reference reports did (for measuring what stopping saves). ``on_epoch`` sees
    each epoch's stats after validation and may raise (Optuna's TrialPruned) to stop.
    """
    history = History()
    dev = data.device
    # The loss is read every ``check_every`` steps (1 on the CPU, 8 on a GPU: protocol.prepare).
    model.train()
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        if schedule != "none":
            set_epoch_lr(optimizer, schedule, epoch, epochs)
        run_loss = torch.zeros((), device=dev)
        run_correct = torch.zeros((), device=dev, dtype=torch.long)
        seen = 0
        for xraw, yb in _epoch_batches(data, batch_size, generator, shard):
            xb = data.pre(xraw, train=True, generator=augment_generator or generator)
            batch_loss, logits = train_step(
                model, optimizer, xb, yb, loss, monitor, history.steps + 1
            )
            raise_if_interrupted()
            history.steps += 1
            history.examples += yb.shape[0]
            seen += yb.shape[0]
            run_loss += batch_loss * yb.shape[0]
            run_correct += (logits.argmax(dim=1) == yb).sum()
            # Reading the loss forces a device sync, so on a GPU it is read every few steps.
            if history.steps % check_every == 0 or history.first_loss is None:
                value = float(batch_loss)
                if history.first_loss is None:
                    history.first_loss = value
                history.last_loss = value
                if stop_on_divergence and diverged(value, diverge_above):
                    history.stopped = "diverged"
                    history.stopped_at_step = history.steps
                    return history
        train_loss = float(run_loss) / max(1, seen)
        train_acc = float(run_correct) / max(1, seen)
        history.last_loss = train_loss
        val_loss, val_acc = evaluate(model, data, "val", loss)
        stats = EpochStats(
            epoch + 1, train_loss, train_acc, val_loss, val_acc, time.perf_counter() - t0
        )
        history.epochs.append(stats)
        if stop_on_divergence and not math.isfinite(val_loss):
            history.stopped = "diverged"
            history.stopped_at_step = history.steps
            return history
        if on_epoch is not None:
            on_epoch(stats)
    return history


@torch.inference_mode()
def _accuracy(model: nn.Module, xb: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with autocast(xb.device):
        correct = (model(xb).argmax(dim=1) == y).float().mean()
    model.train(was_training)
    return float(correct)


def memorise(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    pre: Preprocess,
    *,
    steps: int,
    loss: str,
    eval_every: int = 5,
) -> tuple[float, list[dict[str, float]], int]:
    """Full-batch steps on a small subset until train accuracy is 100 %.

    Returns (best train accuracy, curve, steps taken). Accuracy is measured in eval mode
    (no dropout) on the same examples: memorised means the network gets every one right.
    """
    xb = pre(x, train=False)
    curve: list[dict[str, float]] = []
    acc = 0.0
    model.train()
    for step in range(1, steps + 1):
        batch_loss, _ = train_step(model, optimizer, xb, y, loss)
        if step % eval_every == 0 or step == steps:
            value = float(batch_loss)
            acc = _accuracy(model, xb, y)
            curve.append({"step": step, "loss": value, "train_acc": acc})
            if diverged(value) or acc >= 1.0:
                return acc, curve, step
    return acc, curve, steps


def time_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DeviceData | StreamingData,
    *,
    batch_size: int,
    loss: str,
    generator: torch.Generator,
    warm: int = 3,
    timed: int = 5,
    limit: int | None = None,
) -> float:
    """Seconds per training step as :func:`fit` takes it (the batch's preprocessing and
    augmentation included): ``warm`` steps untimed, then the mean of ``timed``. ``limit``
    cuts each batch to its first examples (the overfit stage's full-batch steps)."""
    model.train()
    done, t0 = 0, 0.0
    last = torch.zeros((), device=data.device)
    while done < warm + timed:
        for xraw, yb in data.train_batches(batch_size, generator):
            if done == warm:
                float(last)  # a sync: the warm steps are over on the device too
                t0 = time.perf_counter()
            if limit is not None:
                xraw, yb = xraw[:limit], yb[:limit]
            xb = data.pre(xraw, train=True, generator=generator)
            last, _ = train_step(model, optimizer, xb, yb, loss)
            done += 1
            if done == warm + timed:
                break
    float(last)
    return (time.perf_counter() - t0) / timed
