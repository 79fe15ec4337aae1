"""The run's figures, drawn from stored trials: overfit curves, search scatters, final curves.

Figures are built with matplotlib's object API on the Agg canvas, never through pyplot, so
no global figure state is shared between threads (the dashboard serves from several) and
nothing needs a display.
"""

from __future__ import annotations

import io
import math
from typing import Any
from typing import Final

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from babysit import schema
from babysit.record import stored
from babysit.schema import FINISHED
from babysit.schema import Narrowed
from babysit.schema import Param
from babysit.schema import Reason
from babysit.schema import Stage
from babysit.schema import TrialAttrs
from babysit.schema import trial_attrs
from babysit.storage import Storage

# Small and at 100 dpi: a figure renders in a few hundred milliseconds at most and a PNG
# stays ~30-60 kB, so every stage can publish its plots without slowing the run.
_DPI = 100
_WIDE = (9.0, 3.6)
_SQUARE = (6.0, 4.6)
_LAYOUT: Final = "constrained"


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def _finite(values: list[Any]) -> list[float]:
    return [float(v) if v is not None and math.isfinite(float(v)) else math.nan for v in values]


def overfit_curve(
    trials: list[FrozenTrial], samples: int | None = None, attrs: list[TrialAttrs] | None = None
) -> Figure:
    """Training loss and train accuracy against step, one line per learning rate tried;
    ``attrs`` (one per trial) carry the curves read from their artifacts."""
    found = {t.number: a for t, a in zip(trials, attrs or [], strict=False)}
    fig = Figure(figsize=_WIDE, dpi=_DPI, layout=_LAYOUT)
    ax_loss, ax_acc = fig.subplots(1, 2)
    losses: list[float] = []
    drawn = 0
    for t in sorted(trials, key=lambda t: t.params.get(Param.LR, 0.0)):
        curve = found.get(t.number, trial_attrs(t)).curve or []
        if not curve:
            continue
        steps = [c["step"] for c in curve]
        loss = _finite([c["loss"] for c in curve])
        # A short curve (a run stopped after a few steps) would be invisible as a line alone.
        style = {"marker": "o", "markersize": 3} if len(curve) <= 20 else {}
        label = f"lr {t.params.get(Param.LR, float('nan')):.3g}"
        ax_loss.plot(steps, loss, label=label, **style)
        ax_acc.plot(steps, _finite([c["train_acc"] for c in curve]), label=label, **style)
        losses += [v for v in loss if v > 0 and math.isfinite(v)]
        drawn += 1
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    if losses and max(losses) > 10 * min(losses):
        ax_loss.set_yscale("log")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("train accuracy")
    ax_acc.set_ylim(-0.02, 1.05)
    ax_acc.axhline(1.0, color="0.6", linestyle=":", linewidth=1)
    if drawn:
        ax_acc.legend(loc="lower right", fontsize="small")
    what = f"{samples} examples, " if samples else ""
    fig.suptitle(f"overfit: memorising {what}no regularisation")
    return fig


def search_scatter(
    trials: list[FrozenTrial],
    stage: str,
    bounds: dict[str, list[float]],
    box: dict[str, list[float]] | None = None,
) -> Figure:
    """lr against weight_decay on log axes: completed trials coloured by validation accuracy,
    diverged ones as red crosses, pruned and failed ones grey; ``box`` is the narrowed range."""
    lr, wd = Param.LR, Param.WEIGHT_DECAY
    real = [t for t in schema.real(trials) if lr in t.params and wd in t.params]
    # Every other searched dimension (dropout, the schedule) gets a panel of its own: val
    # accuracy against its value, the narrowed part shaded.
    others = [n for n in Param.ALL if n not in Param.LOG and any(n in t.params for t in real)]
    fig = Figure(figsize=(_SQUARE[0] + 3.0 * len(others), _SQUARE[1]), dpi=_DPI, layout=_LAYOUT)
    axes = fig.subplots(
        1, 1 + len(others), width_ratios=[2.0] + [1.0] * len(others), squeeze=False
    )[0]
    ax = axes[0]
    for name, panel in zip(others, axes[1:], strict=True):
        _dimension_panel(panel, real, name, (box or {}).get(name), (bounds or {}).get(name))

    def xy(ts: list[FrozenTrial]) -> tuple[list[float], list[float]]:
        return [t.params[lr] for t in ts], [t.params[wd] for t in ts]

    complete = schema.scored(real)  # a diverged trial is COMPLETE at chance: drawn as diverged
    diverged = [t for t in real if trial_attrs(t).reason == Reason.DIVERGED]
    pruned = [t for t in real if t.state == TrialState.PRUNED and t not in diverged]
    failed = [t for t in real if t.state == TrialState.FAIL]
    if pruned:
        ax.scatter(*xy(pruned), s=36, c="0.75", edgecolors="0.5", label="pruned", zorder=2)
    if failed:
        ax.scatter(*xy(failed), s=36, c="none", edgecolors="0.5", label="failed", zorder=2)
    if diverged:
        ax.scatter(
            *xy(diverged),
            s=48,
            marker="x",
            c="tab:red",
            linewidths=1.5,
            label="diverged",
            zorder=3,
        )
    if complete:
        values = [t.value for t in complete if t.value is not None]  # all of them: scored()
        sc = ax.scatter(
            *xy(complete),
            s=52,
            c=values,
            cmap="viridis",
            edgecolors="black",
            linewidths=0.5,
            label="complete",
            zorder=4,
        )
        fig.colorbar(sc, ax=ax, label="val accuracy")
        best = max(complete, key=lambda t: (t.value, -t.number))
        ax.scatter(
            [best.params[lr]],
            [best.params[wd]],
            s=220,
            marker="*",
            c="none",
            edgecolors="tab:orange",
            linewidths=1.5,
            label="best",
            zorder=5,
        )
    if box is not None:
        _narrowed_box(ax, box[lr], box[wd])
    ax.set_xscale("log")
    ax.set_yscale("log")
    if bounds:
        ax.set_xlim(*_padded(bounds[lr]))
        ax.set_ylim(*_padded(bounds[wd]))
    ax.set_xlabel("lr")
    ax.set_ylabel("weight_decay")
    ax.set_title(f"{stage} search: {len(real)} trials")
    if real or box is not None:
        ax.legend(loc="best", fontsize="small", framealpha=0.8)
    return fig


def _dimension_panel(
    ax: Any,
    trials: list[FrozenTrial],
    name: str,
    narrowed: list[Any] | None,
    bound: list[Any] | None,
) -> None:
    """Val accuracy against one searched dimension: complete trials as dots, diverged ones
    as red crosses at chance, the narrowed range (or the choices fine kept) shaded."""
    done = [t for t in trials if name in t.params and t.value is not None]
    choices: list[Any] = []
    if name in Param.CHOICE:
        for v in list(bound or []) + [t.params[name] for t in done]:
            if v not in choices:
                choices.append(v)

    def x(t: FrozenTrial) -> float:
        v = t.params[name]
        return float(choices.index(v)) if choices else float(v)

    for diverged in (False, True):
        group = [t for t in done if schema.diverged(t) == diverged]
        if group:
            ax.scatter(
                [x(t) for t in group],
                [t.value for t in group],
                s=48 if diverged else 36,
                marker="x" if diverged else "o",
                c="tab:red" if diverged else "tab:blue",
                label="diverged" if diverged else "trials",
                zorder=3,
            )
    if narrowed:
        if choices:
            for v in narrowed:
                if v in choices:
                    i = choices.index(v)
                    ax.axvspan(i - 0.3, i + 0.3, alpha=0.15, color="tab:green")
        else:
            ax.axvspan(narrowed[0], narrowed[1], alpha=0.15, color="tab:green", label="narrowed")
    if choices:
        ax.set_xticks(range(len(choices)), [str(c) for c in choices])
        ax.set_xlim(-0.5, len(choices) - 0.5)
    elif bound:
        ax.set_xlim(bound[0] - 0.02, bound[1] + 0.02)
    ax.set_xlabel(name)
    ax.set_ylabel("val accuracy")


def _narrowed_box(ax: Any, x: list[float], y: list[float]) -> None:
    """The narrowed ranges as a dashed rectangle behind the trials."""
    (x0, x1), (y0, y1) = x, y
    ax.add_patch(
        Rectangle(
            (x0, y0),
            x1 - x0,
            y1 - y0,
            fill=False,
            edgecolor="tab:blue",
            linestyle="--",
            linewidth=1.5,
            label="narrowed",
            zorder=1,
        )
    )


def _padded(bounds: list[float]) -> tuple[float, float]:
    # A tenth of a decade of margin, so trials on the bounds are not cut in half.
    lo, hi = math.log10(bounds[0]), math.log10(bounds[1])
    pad = max(0.1, 0.05 * (hi - lo))
    return 10 ** (lo - pad), 10 ** (hi + pad)


def final_curves(trial: FrozenTrial, attrs: TrialAttrs | None = None) -> Figure:
    """Loss and accuracy per epoch, train and validation; the test result as a marker at
    the tested epoch (the best on validation, whose weights were tested; the last epoch
    for a run that stored none), with a dotted line there. ``attrs``: the trial's, with
    the curves read from their artifact."""
    fig = Figure(figsize=_WIDE, dpi=_DPI, layout=_LAYOUT)
    ax_loss, ax_acc = fig.subplots(1, 2)
    a = attrs or trial_attrs(trial)
    curves = a.curves or {}
    epochs = list(range(1, len(curves.get("train_loss", [])) + 1))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        if curves.get(key):
            ax_loss.plot(epochs, _finite(curves[key]), marker="o", markersize=3, label=label)
    for key, label in (("train_acc", "train"), ("val_acc", "val")):
        if curves.get(key):
            ax_acc.plot(epochs, _finite(curves[key]), marker="o", markersize=3, label=label)
    tested = a.best_epoch if a.best_epoch in epochs else (epochs[-1] if epochs else None)
    if tested is not None and (a.test_loss is not None or a.test_accuracy is not None):
        for ax in (ax_loss, ax_acc):
            ax.axvline(tested, color="tab:red", linestyle=":", linewidth=1)
    if a.test_loss is not None and epochs:
        ax_loss.scatter(
            [tested],
            [a.test_loss],
            marker="D",
            c="tab:red",
            zorder=5,
            label=f"test {a.test_loss:.3f}",
        )
    if a.test_accuracy is not None and epochs:
        ax_acc.scatter(
            [tested],
            [a.test_accuracy],
            marker="D",
            c="tab:red",
            zorder=5,
            label=f"test {a.test_accuracy:.3f} (epoch {tested})",
        )
    for ax, what in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if epochs:
            ax.legend(fontsize="small")
    lr = trial.params.get(Param.LR)
    wd = trial.params.get(Param.WEIGHT_DECAY)
    title = "final training"
    if lr is not None and wd is not None:
        title += f": lr {lr:.3g}, weight_decay {wd:.3g}"
    if a.test_accuracy is not None and tested is not None:
        title += f"; test accuracy {a.test_accuracy:.3f} at epoch {tested} of {len(epochs)}"
    fig.suptitle(title)
    return fig


def lr_range_figure(result: dict[str, Any]) -> Figure:
    """The LR range test's curve (lr_range.lr_range_test): log LR against smoothed loss,
    the proposed coarse range shaded."""
    fig = Figure(figsize=(6, 4), dpi=_DPI, layout=_LAYOUT)
    ax = fig.subplots()
    ax.plot(result["lrs"], result["losses"])
    low, high = result["suggested"]
    ax.axvspan(low, high, alpha=0.15, color="tab:green", label="proposed coarse lr")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed train loss")
    ax.set_title(f"LR range test: [{low:.2g}, {high:.2g}] ({result.get('stopped', '')})")
    ax.legend()
    return fig


def first_layer_filters(model: Any) -> Figure:
    """The first conv's filters of ``model`` (a torch module) as a grid of tiles, each scaled
    to its own range (RGB for 3 input channels, grey otherwise): smooth, varied filters mean
    a trained first layer, noise means it barely learnt (cs231n, "visualizing the
    first-layer weights")."""
    import torch  # here, not on import: the dashboard and report draw without torch's weights

    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if conv is None:
        raise ValueError("the model has no Conv2d layer to draw")
    w = conv.weight.detach().float().cpu()
    if w.shape[1] != 3:
        w = w.mean(dim=1, keepdim=True)
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    hi = w.amax(dim=(1, 2, 3), keepdim=True)
    w = (w - lo) / (hi - lo).clamp_min(1e-12)
    n, c, kh, kw = w.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    # One mosaic, tiles one pixel apart on white, drawn by a single imshow: a subplot per
    # filter costs seconds for AlexNet's 64-96 filters.
    mosaic = torch.ones(c, rows * (kh + 1) + 1, cols * (kw + 1) + 1)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = 1 + r * (kh + 1), 1 + q * (kw + 1)
        mosaic[:, top : top + kh, left : left + kw] = w[i]
    image = mosaic.permute(1, 2, 0).numpy()
    fig = Figure(figsize=(6, 6), dpi=_DPI)
    ax = fig.subplots()
    if c == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"first-layer filters: {n} x {tuple(conv.weight.shape[1:])}", fontsize=8)
    return fig


def stage_figure(storage: Storage, run: str, stage: str) -> Figure | None:
    """The stage's plot drawn from its stored trials, or None when there is nothing to draw."""
    from babysit.record.artifacts import trial_data

    rec = stored.load_stage(storage, run, stage)
    trials = rec.trials
    if rec.study is None:
        return None
    if stage == Stage.OVERFIT:
        found = [trial_data(storage, t) for t in trials]
        if not any(a.curve for a in found):
            return None
        return overfit_curve(
            trials, next((a.samples for a in found if a.samples is not None), None), found
        )
    if stage in (Stage.COARSE, Stage.FINE):
        if not any(t.state in FINISHED for t in trials):
            return None
        coarse = rec if stage == Stage.COARSE else stored.load_stage(storage, run, Stage.COARSE)
        fine = rec if stage == Stage.FINE else stored.load_stage(storage, run, Stage.FINE)
        bounds = coarse.attrs.ranges or rec.attrs.ranges or {}
        narrowed = fine.attrs.narrowed
        box = Narrowed.from_attrs(narrowed).ranges if narrowed else None
        return search_scatter(trials, stage, bounds, box)
    if stage == Stage.FINAL:
        done = rec.complete
        data = trial_data(storage, done[0]) if done else None
        if data is None or not data.curves:
            return None
        return final_curves(done[0], data)
    return None
