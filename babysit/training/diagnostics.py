"""What a careful person watches while a network trains, recorded on every trial.

cs231n's "babysitting the learning process" and Karpathy's "A Recipe for Training Neural
Networks" name the signals: the ratio of each update to its weights, gradient norms, dead
ReLUs, activation statistics, a loss that does not move, a train/val gap. ``Monitor`` samples
them every few steps (the first step, every ``every``-th step and the first step of each
epoch), so a run pays a few percent at most; ``readings`` turns them into plain words.
Leslie Smith's LR range test is in babysit/stages/lr_range.py. Readings only: every figure (the
first-layer filters among them) is drawn in babysit/report/plots.py.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

import torch
from torch import nn

from babysit.schema import TrialKey
from babysit.terminal import plural

if TYPE_CHECKING:
    pass


# Sample every 20 steps and the first: on digits (~20 steps an epoch) that is one or two
# samples per epoch, on CIFAR-10 at batch 128 about 18; each costs a weight copy and a sync.
EVERY = 20
# cs231n: "the ratio of the update magnitudes to the value magnitudes ... should be somewhere
# around 1e-3. If it is lower than this then the learning rate might be too low. If it is
# higher then the learning rate is likely too high."
UPDATE_RATIO_TARGET = 1e-3
# The reading fires 100x above that target, when a step moves a hidden layer's weights by a
# tenth of their size. Not 10x: Adam moves every weight by ~lr per step whatever its
# gradient, which puts healthy Adam runs above cs231n's SGD-era 1e-3. Measured on digits
# (AlexNet, Adam, hidden layers): lr 1e-3, which learns, 7e-4 to 6e-3; lr 1e-2, which
# diverges on step 2, 2e-2 to 2e-1; lr 1e-1, 2e-1 to 2.
UPDATE_RATIO_HIGH = 1e-1
# The loss moved less than this fraction over the trial: "LR too low" (cs231n's "loss not
# going down"; the same 1 % as coarse.flat_tolerance).
FLAT_TOLERANCE = 0.01
# Train accuracy this far above validation accuracy: overfitting. cs231n's picture of a
# "big gap" is ~20 points; the babysitting report's healthy AlexNet ended within 10 points (78 vs 70 %).
GAP_POINTS = 0.15
# cs231n: "you may find that as much as 40% of your network can be 'dead' (i.e. neurons that
# never activate across the entire training dataset) if the learning rate is set too high."
# The reading fires above 60 %, not 40: on 8x8 digits AlexNet's conv3-5 see 1x1 maps, and
# ~40 % of their channels are silent over a batch of 64 from initialisation on (measured:
# 39 % after epoch 1, 46-51 % all through a run that reaches 85 % val accuracy).
DEAD_FRACTION = 0.6

_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ReLU6)


_Named = list[tuple[str, nn.Module]]
_Weighted = list[tuple[str, nn.Conv2d | nn.Linear]]


def layer_names(model: nn.Module) -> tuple[_Weighted, _Named]:
    """(weight layers, activations), named conv1.., fc1.. in registration order; an
    activation takes the name of the weight layer before it ("conv3": conv3's ReLU)."""
    weights: _Weighted = []
    acts: _Named = []
    counts = {"conv": 0, "fc": 0}
    last = ""
    for qualified, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and isinstance(
            getattr(module, "weight", None), torch.Tensor
        ):
            kind = "conv" if isinstance(module, nn.Conv2d) else "fc"
            counts[kind] += 1
            last = f"{kind}{counts[kind]}"
            weights.append((last, module))
        elif isinstance(module, _ACTIVATIONS):
            name = last or qualified
            if any(n == name for n, _ in acts):
                name = qualified
            acts.append((name, module))
    return weights, acts


def _compiled(model: nn.Module) -> bool:
    # Hooks added after torch.compile force recompiles: skip activation stats there.
    return getattr(model, "_compiled_call_impl", None) is not None


# Update ratios of layers bigger than this are read on an evenly strided sample of this many
# weights. Copying every weight before a sampled step cost 93 MB each time on the digits
# AlexNet (its 4096-wide FC layers), a spike on top of the optimiser state; smaller layers
# (every conv of it, every layer of a small network) are still read in full.
RATIO_SAMPLE = 65536


def _ratio_sample(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // RATIO_SAMPLE)]


class Monitor:
    """Called by ``fit`` after each backward as ``monitor(step, model, optimizer, loss)``.

    On a sampled step it reads each weight layer's gradient norm, copies its weights and
    hooks the optimizer's next step to measure ||w_after - w_before|| / ||w_before|| (the
    actual update, so Adam and momentum count as they act). Forward hooks on the activations
    are registered only for a sampled step's forward and removed right after it. Every
    other step costs one integer test.
    """

    def __init__(self, model: nn.Module, every: int = EVERY) -> None:
        self.every = max(1, every)
        self.weights, self.acts = layer_names(model)
        self.epochs: list[dict[str, Any]] = []
        self._samples: list[dict[str, Any]] = []
        self._act_values: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._activations = not _compiled(model)
        self._next_forced = True
        self._last_step = 0
        self._arm()

    # -------------------------------------------------------------- sampling

    def _sampled(self, step: int) -> bool:
        return step == 1 or step % self.every == 0

    def _arm(self) -> None:
        if not self._activations or self._handles:
            return
        for name, module in self.acts:
            self._handles.append(module.register_forward_hook(self._act_hook(name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _act_hook(self, name: str):  # noqa: ANN202
        def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            # Training forwards only: evaluation runs under inference_mode.
            if name in self._act_values or not torch.is_grad_enabled():
                return
            with torch.no_grad():
                out = output.detach()
                dims = tuple(d for d in range(out.dim()) if d != 1)
                # A unit fires when its output is positive (LeakyReLU's negative side is
                # "off" too); a conv unit is a channel, over every position and example.
                fired = (out > 0).any(dim=dims) if dims else out > 0
                std, mean = torch.std_mean(out.float())
                self._act_values[name] = torch.stack([mean, std, 1.0 - fired.float().mean()])

        return hook

    def __call__(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor
    ) -> None:
        self._last_step = step
        if self._next_forced or self._sampled(step):
            self._next_forced = False
            self._sample(step, optimizer, loss)
        if self._sampled(step + 1):
            self._arm()

    def _sample(self, step: int, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        self.detach()
        acts = self._act_values
        self._act_values = {}
        with torch.no_grad():
            zero = torch.zeros((), device=loss.device)
            grads = [
                m.weight.grad.float().norm() if m.weight.grad is not None else zero
                for _, m in self.weights
            ]
            before = [_ratio_sample(m.weight).clone() for _, m in self.weights]

        def after_step(*_hook_args: Any) -> None:
            handle.remove()
            act_names = list(acts)
            with torch.no_grad():
                ratios = [
                    (_ratio_sample(m.weight) - b).float().norm()
                    / b.float().norm().clamp_min(1e-12)
                    for (_, m), b in zip(self.weights, before, strict=True)
                ]
                parts = [
                    loss.detach().float().reshape(1),
                    *(g.reshape(1) for g in grads),
                    *(r.reshape(1) for r in ratios),
                    *(acts[n] for n in act_names),
                ]
            values = torch.cat(parts).tolist()  # the one sync of a sample
            n = len(self.weights)
            layers: dict[str, dict[str, float]] = {}
            for i, (name, _layer) in enumerate(self.weights):
                layers[name] = {"grad_norm": values[1 + i], "update_ratio": values[1 + n + i]}
            for j, name in enumerate(act_names):
                mean, std, dead = values[1 + 2 * n + 3 * j : 4 + 2 * n + 3 * j]
                layers.setdefault(name, {}).update(
                    {"act_mean": mean, "act_std": std, "dead": dead}
                )
            self._samples.append({"step": step, "loss": values[0], "layers": layers})

        handle = optimizer.register_step_post_hook(after_step)

    # -------------------------------------------------------------- per epoch

    def close_epoch(self, epoch: int) -> dict[str, Any] | None:
        """Aggregate the samples since the last call into one record, appended to
        ``epochs``: per layer, the median update ratio and gradient norm, the mean
        activation statistics and dead fraction. None when nothing was sampled."""
        self._next_forced = True
        self._arm()
        samples, self._samples = self._samples, []
        if not samples:
            return None
        layers: dict[str, dict[str, float | None]] = {}  # None: NaN/inf, which JSON lacks
        names = list(dict.fromkeys(n for s in samples for n in s["layers"]))
        for name in names:
            entry: dict[str, float | None] = {}
            for key, agg in (
                ("update_ratio", statistics.median),
                ("grad_norm", statistics.median),
                ("act_mean", statistics.fmean),
                ("act_std", statistics.fmean),
                ("dead", statistics.fmean),
            ):
                vals = [
                    s["layers"][name][key] for s in samples if key in s["layers"].get(name, {})
                ]
                if vals:
                    entry[key] = _finite(agg(vals))
            layers[name] = entry
        record = {
            "epoch": epoch,
            "steps": [s["step"] for s in samples],
            "loss": [_finite(s["loss"]) for s in samples],
            "last_step": self._last_step,
            # The last weight layer: its update ratio is not read as "LR too high" (below).
            "classifier": self.weights[-1][0] if self.weights else None,
            "layers": layers,
        }
        self.epochs.append(record)
        return record

    def finish(self, epoch: int) -> None:
        """After training: close a partial epoch (the one a diverged run stopped in) and
        take the hooks off the model."""
        self.detach()
        if self._samples:
            self.close_epoch(epoch)
            self.detach()


def _finite(value: float) -> float | None:
    # JSON (and so Optuna's user attrs) has no NaN: a diverged value is stored as None.
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------- readings


def _sci(x: float) -> str:
    """1e-1, 3e-2: the order of magnitude a person reads off a ratio."""
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def readings(
    diagnostics: Sequence[dict[str, Any]],
    curves: dict[str, list[float]] | None = None,
    *,
    warnings: Sequence[str] = (),
    flat_tolerance: float = FLAT_TOLERANCE,
    ratio_high: float = UPDATE_RATIO_HIGH,
    gap: float = GAP_POINTS,
    dead: float = DEAD_FRACTION,
) -> list[str]:
    """The readings a careful person would write down, from a trial's per-epoch
    diagnostics and curves; empty when the run looks healthy. ``warnings`` (narrowing's
    edge warnings) are passed through."""
    out: list[str] = []
    curves = curves or {}
    last = diagnostics[-1] if diagnostics else None
    losses = [v for d in diagnostics for v in d.get("loss", [])]
    if diagnostics and any(v is None for v in losses):
        step = next(
            s for d in diagnostics for s, v in zip(d["steps"], d["loss"], strict=True) if v is None
        )
        out.append(f"LR too high: the loss was NaN/inf by step {step}")
    elif losses and losses[0]:
        first = losses[0]
        # The last epoch's mean train loss is steadier than one batch's. A run stopped
        # within its first epoch has only a sample or two: too little to call flat.
        end = curves.get("train_loss", [])[-1:] or (losses[-1:] if len(losses) > 2 else [])
        if end and abs(first - end[0]) < flat_tolerance * abs(first):
            assert last is not None  # the losses came from the diagnostics
            out.append(
                f"LR too low: loss moved less than {flat_tolerance * 100:g} % in "
                f"{plural(last['last_step'], 'step')} ({first:.3f} -> {end[0]:.3f})"
            )
    if last is not None:
        # The classifier starts at N(0, 0.01) so that the initial loss is ln C; against such
        # small weights any useful step is large (Adam at lr 1e-3 moves it 1e-1 on step 1),
        # so only the hidden layers speak for the LR.
        ratios = {
            n: v["update_ratio"]
            for n, v in last["layers"].items()
            if v.get("update_ratio") is not None and n != last.get("classifier")
        }
        if ratios:
            worst = max(ratios, key=lambda n: ratios[n])
            if ratios[worst] > ratio_high:
                out.append(
                    f"LR too high: update ratio {_sci(ratios[worst])} in {worst} "
                    f"(cs231n: ~{_sci(UPDATE_RATIO_TARGET)})"
                )
        deads = {n: v["dead"] for n, v in last["layers"].items() if v.get("dead") is not None}
        for name, fraction in deads.items():
            if fraction > dead:
                out.append(f"dead units: {fraction * 100:.0f} % of {name} never fire")
    train_acc, val_acc = curves.get("train_acc", []), curves.get("val_acc", [])
    if train_acc and val_acc:
        epoch = min(len(train_acc), len(val_acc))
        diff = train_acc[epoch - 1] - val_acc[epoch - 1]
        if diff > gap:
            out.append(f"overfitting: train/val gap {diff * 100:.0f} points after epoch {epoch}")
    out.extend(warnings)
    return out


def record_diagnostics(
    monitor: Monitor,
    curves: dict[str, list[float]],
    *,
    epoch: int | None = None,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """Close the epoch's samples; return the trial's "diagnostics" and "readings" so far
    (the caller stores them as JSON artifacts, babysit.record.artifacts.store_trial_data).

    With ``epoch=None`` (after ``fit`` returns) it closes a partial epoch, the one a
    diverged trial stopped in, and removes the monitor's hooks from the model.
    """
    if epoch is None:
        monitor.finish(len(curves.get("train_loss", [])) + 1)
    else:
        monitor.close_epoch(epoch)
    return {
        TrialKey.DIAGNOSTICS: list(monitor.epochs),
        TrialKey.READINGS: readings(monitor.epochs, curves, warnings=warnings),
    }


# ---------------------------------------------------------------------------- filters
