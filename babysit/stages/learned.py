"""What the earlier stages learned, carried into the later ones by stated rules.

- **Anchor**: the LR that memorised the overfit subset is a working LR for this network
  and data, so the coarse lr range is centred on it instead of spanning five decades
  blind: ``[lr / 10^ANCHOR_BELOW, lr * 10^ANCHOR_ABOVE]``. A ``coarse.lr`` the user set
  (anything but the default) wins, and so does the LR range test.
- **Edge**: a best coarse value within ``narrow.edge`` decades of a bound of the range
  searched means the optimum may lie outside it. Instead of only warning, the range is
  widened by ``EDGE_DECADES`` on that side and a bounded extra round of coarse trials is
  drawn in the new strip, once.

Both are recorded on the coarse study (``lr_anchor``, ``extension``), so every worker and
every rerun uses the same ranges.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from babysit.schema import Param
from babysit.schema import Stage
from babysit.schema import StudyAttrs
from babysit.schema import StudyKey
from babysit.schema import best_of
from babysit.spec import CoarseSpec
from babysit.spec import Spec
from babysit.stages.context import Context
from babysit.stages.context import StageResult
from babysit.stages.search import search
from babysit.stages.study import open_stage

# Decades below and above the LR that memorised. Asymmetric because the overfit check
# stops at the first LR of its list that memorises 20 examples in up to 200 full-batch
# steps, while a coarse trial takes a few dozen minibatch steps: below that LR it barely
# moves. Measured on the tiny CNN with three shapes: lr 3e-4 memorised; coarse and fine
# trials at 3e-5..1e-4 stayed at chance (0.33) for 3-4 epochs, those at 3e-3..1e-2 reached
# 0.84-0.93. Half a decade below keeps the memorising LR off the edge.
ANCHOR_BELOW = 0.5
ANCHOR_ABOVE = 2.0
# The rule as stored on the coarse study (``lr_anchor.rule``); README.md quotes it word for word.
ANCHOR_RULE = (
    "coarse lr = [overfit lr / 10^{below}, overfit lr x 10^{above}] around the lr "
    "{lr} that memorised the overfit subset"
)
# How far an edge is pushed out, and how many extra trials look there.
EDGE_DECADES = 2.0


def extra_trials(trials: int) -> int:
    """The extra round's size: a quarter of the coarse budget, at least two trials."""
    return max(2, trials // 4)


def user_set_lr(spec: Spec) -> bool:
    """Whether ``coarse.lr`` was chosen by the user: set explicitly in this process
    (``build_spec`` records the keys it was given), or different from the default (a
    worker rebuilds the spec from storage and reads the stored ranges anyway)."""
    return "coarse.lr" in spec.explicit_keys or list(spec.coarse.lr) != CoarseSpec().lr


def overfit_lr(ctx: Context) -> float | None:
    """The LR that memorised the overfit subset, or None when none did (``--force``)."""
    study = open_stage(ctx, Stage.OVERFIT)
    passed = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.COMPLETE and (t.value or 0.0) >= 1.0 and "lr" in t.params
    ]
    if not passed:
        return None
    return float(min(passed, key=lambda t: t.number).params["lr"])


def anchored_ranges(ctx: Context, ranges: dict[str, list[float]]) -> dict[str, list[float]]:
    """The coarse ranges with lr anchored on the overfit LR when the rule applies; the
    decision is stored on the coarse study as ``lr_anchor``."""
    spec = ctx.spec
    if not spec.coarse.lr_from_overfit or user_set_lr(spec):
        return ranges
    lr = overfit_lr(ctx)
    if lr is None:
        return ranges
    anchored = [lr / 10**ANCHOR_BELOW, lr * 10**ANCHOR_ABOVE]
    study = open_stage(ctx, Stage.COARSE)
    study.set_user_attr(
        StudyKey.LR_ANCHOR,
        {
            "overfit_lr": lr,
            "range": anchored,
            "replaced": list(ranges["lr"]),
            "rule": ANCHOR_RULE.format(
                below=f"{ANCHOR_BELOW:g}", above=f"{ANCHOR_ABOVE:g}", lr=f"{lr:g}"
            ),
        },
    )
    ctx.log(
        f"coarse: lr range [{anchored[0]:.3g}, {anchored[1]:.3g}] anchored on the "
        f"overfit lr {lr:g} ({ANCHOR_BELOW:g} decade below, {ANCHOR_ABOVE:g} above)"
    )
    return {**ranges, "lr": anchored}


def edges(best: dict[str, Any], ranges: dict[str, list[float]], edge: float) -> dict[str, str]:
    """{parameter: "lower"|"upper"} for each best value within ``edge`` decades of a bound.

    weight_decay's lower edge does not count: below the default 1e-6 a decay changes
    nothing measurable, so a best value there says "no decay", not "search lower"."""
    out: dict[str, str] = {}
    for name, (lo, hi) in ranges.items():
        b = math.log10(best["params"][name])
        if math.log10(hi) - b <= edge:
            out[name] = "upper"
        elif b - math.log10(lo) <= edge and name != "weight_decay":
            out[name] = "lower"
    return out


def extend_coarse(
    ctx: Context,
    initial_loss: float,
    progress: Callable[[int, int, FrozenTrial | None], None] | None = None,
) -> StageResult | None:
    """After the coarse search: when its best value sits on an edge, widen that side by
    ``EDGE_DECADES`` and run ``extra_trials`` more coarse trials in the new strip, once.

    Returns the coarse stage's result after the extra round, or None when there was
    none. The widened ranges replace the coarse study's ``ranges``, so narrowing clips
    to what was really searched.
    """
    spec = ctx.spec
    study = open_stage(ctx, Stage.COARSE)
    plan = study.user_attrs.get(StudyKey.EXTENSION)
    if plan is None:
        best = best_of(study.get_trials(deepcopy=False))
        ranges = study.user_attrs.get(StudyKey.RANGES)
        if not spec.coarse.extend or best is None or not ranges:
            return None
        found = edges(best, ranges, spec.narrow.edge)
        plan = {"edges": found, "before": ranges}
        if found:
            strip = dict(ranges)
            widened = dict(ranges)
            for name, side in found.items():
                lo, hi = ranges[name]
                step = 10**EDGE_DECADES
                strip[name] = [lo / step, lo] if side == "lower" else [hi, hi * step]
                widened[name] = [min(lo, strip[name][0]), max(hi, strip[name][1])]
            plan.update(
                {
                    "strip": strip,
                    "widened": widened,
                    "extra_trials": extra_trials(spec.coarse.trials),
                    "best_before": best,
                }
            )
        study.set_user_attr(StudyKey.EXTENSION, plan)
    if not plan["edges"]:
        return None
    if study.user_attrs.get(StudyKey.RANGES) != plan["widened"]:
        study.set_user_attr(StudyKey.RANGES, plan["widened"])
    shown = ", ".join(f"{k} at its {v} edge" for k, v in plan["edges"].items())
    ctx.log(
        f"coarse: best {shown}; {plan['extra_trials']} extra trials in "
        + ", ".join(f"{k} [{a:.3g}, {b:.3g}]" for k, (a, b) in plan["strip"].items())
    )
    bigger = dataclasses.replace(spec.coarse, trials=spec.coarse.trials + plan["extra_trials"])
    result = search(
        ctx, Stage.COARSE, bigger, plan["strip"], initial_loss=initial_loss, progress=progress
    )
    result.verdict += (
        f"; the first round's best had {shown}, so "
        f"{plan['extra_trials']} extra trials looked {EDGE_DECADES:g} decades "
        "further out"
    )
    return result


def _coarse_ranges(ctx: Context) -> dict[str, list[float]]:
    """The spec's coarse ranges, the lr range the LR range test proposes, or the lr range
    anchored on the overfit LR (babysit/stages/learned.py); read back from the coarse study once a
    search stored them, so every worker and every rerun uses the same."""
    spec = ctx.spec
    ranges = {Param.LR: list(spec.coarse.lr), Param.WEIGHT_DECAY: list(spec.coarse.weight_decay)}
    study = open_stage(ctx, Stage.COARSE)
    stored = StudyAttrs.from_attrs(study.user_attrs).ranges
    if stored is not None:
        return stored
    if not spec.coarse.lr_range_test:
        from babysit.stages.learned import anchored_ranges

        return anchored_ranges(ctx, ranges)
    from babysit.stages.lr_range import propose_coarse_lr

    test = propose_coarse_lr(ctx)
    from babysit.record.artifacts import upload_json

    # The curve (a few kB) as a JSON artifact; the attr keeps the proposal and names it.
    curve = upload_json(
        ctx.storage,
        study,
        "lr_range_test.json",
        {k: test[k] for k in ("lrs", "losses", "suggested")},
    )
    study.set_user_attr(
        StudyKey.LR_RANGE_TEST, {"suggested": list(test["suggested"]), "artifact": curve}
    )
    lr = ranges[Param.LR] = [float(v) for v in test["suggested"]]
    ctx.log(
        f"LR range test: loss fell fastest around lr {lr[0]:.3g} .. "
        f"{lr[1]:.3g}; that is the coarse lr range"
    )
    return ranges
