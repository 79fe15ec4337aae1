"""What the earlier stages learned, carried into the later ones by stated rules.

- **Anchor**: the LR that memorised the overfit subset is a working LR for this network
  and data, so the coarse lr range is centred on it instead of spanning five decades
  blind: ``[lr / 10^ANCHOR_BELOW, lr * 10^ANCHOR_ABOVE]``. A ``coarse.lr`` the user set
  (anything but the default) wins, and so does the LR range test.
- **Edge**: a best coarse value within ``narrow.edge`` decades of a bound of the range
  searched means the optimum may lie outside it. Instead of only warning, the range is
  widened by ``EDGE_DECADES`` on that side and a bounded extra round of coarse trials is
  drawn in the new strip, once; so is a round below the lowest lr that diverged when
  every trial of the first round diverged (a recovery). lr's upper edge is not widened
  past a divergence (babysit/stages/divergence.py).
- **Probe**: the top of a range babysit chose is trained alone for a few steps before the
  search, and brought down while it diverges (``PROBE_RULE``).

All are recorded on the coarse study (``lr_anchor``, ``lr_probe``, ``extension``), so
every worker and every rerun uses the same ranges.
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
from babysit.stages.budget import room_for_a_trial
from babysit.stages.context import Context
from babysit.stages.context import StageResult
from babysit.stages.divergence import below_ceiling
from babysit.stages.divergence import divergence_ceiling
from babysit.stages.divergence import lowest
from babysit.stages.divergence import probe_ceiling
from babysit.stages.search import search
from babysit.stages.study import open_stage
from babysit.terminal import plural
from babysit.terminal import shown_range

# Decades below and above the LR that memorised. Asymmetric because the overfit check
# stops at the first LR of its list that memorises 20 examples in up to 200 full-batch
# steps, while a coarse trial takes a few dozen minibatch steps: below that LR it barely
# moves. Measured on the tiny CNN with three shapes: lr 3e-4 memorised; coarse and fine
# trials at 3e-5..1e-4 stayed at chance (0.33) for 3-4 epochs, those at 3e-3..1e-2 reached
# 0.84-0.93. Half a decade below keeps the memorising LR off the edge.
ANCHOR_BELOW = 0.5
ANCHOR_ABOVE = 2.0
# The rule as stored on the coarse study (``lr_anchor.rule``); docs/protocol.md quotes it word for word.
ANCHOR_RULE = (
    "coarse lr = [overfit lr / 10^{below}, overfit lr x 10^{above}] around the lr "
    "{lr} that memorised the overfit subset"
)
# How far an edge is pushed out, and how many extra trials look there.
EDGE_DECADES = 2.0
# The "edge" of an extra round that recovers a first round in which every trial diverged.
BELOW_DIVERGENCE = "below divergence"


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


def edges(
    best: dict[str, Any],
    ranges: dict[str, list[float]],
    edge: float,
    ceiling: float | None = None,
) -> dict[str, str]:
    """{parameter: "lower"|"upper"} for each best value within ``edge`` decades of a bound.

    weight_decay's lower edge does not count: below the default 1e-6 a decay changes
    nothing measurable, so a best value there says "no decay", not "search lower". Nor
    does lr's upper edge when a trial diverged above the best one (``ceiling``): the
    search already saw where training explodes, and looks no higher."""
    out: dict[str, str] = {}
    for name, (lo, hi) in ranges.items():
        if name not in Param.LOG:  # dropout's range is all there is; a schedule has no edge
            continue
        b = math.log10(best["params"][name])
        if math.log10(hi) - b <= edge:
            if name == Param.LR and ceiling is not None:
                continue
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
        trials = study.get_trials(deepcopy=False)
        best = best_of(trials)
        ranges = study.user_attrs.get(StudyKey.RANGES)
        if not spec.coarse.extend or not ranges:
            return None
        probed = probe_ceiling(study.user_attrs.get(StudyKey.LR_PROBE))
        plan = _extension_plan(trials, best, ranges, spec, probed)
        if plan is None:
            return None
        attrs = StudyAttrs.from_attrs(study.user_attrs)
        if attrs.target is not None and plan["edges"]:
            # Under a --budget the extra round is coarse's too: only in coarse's time left.
            if not room_for_a_trial(attrs):
                ctx.log("coarse: no extra round at the edge; coarse's time under --budget is up")
                return None
            plan["target"] = attrs.target + plan["extra_trials"]
            study.set_user_attr(StudyKey.TARGET, plan["target"])
        study.set_user_attr(StudyKey.EXTENSION, plan)
    if not plan["edges"]:
        return None
    if study.user_attrs.get(StudyKey.RANGES) != plan["widened"]:
        study.set_user_attr(StudyKey.RANGES, plan["widened"])
    shown = ", ".join(
        f"{k} {v}" if v == BELOW_DIVERGENCE else f"{k} at its {v} edge"
        for k, v in plan["edges"].items()
    )
    ctx.log(
        f"coarse: best {shown}; {plan['extra_trials']} extra trials in "
        + ", ".join(f"{k} {shown_range(v)}" for k, v in plan["strip"].items())
    )
    bigger = dataclasses.replace(spec.coarse, trials=spec.coarse.trials + plan["extra_trials"])
    result = search(
        ctx, Stage.COARSE, bigger, plan["strip"], initial_loss=initial_loss, progress=progress
    )
    if plan.get("recovery") and result.status == "failed":
        result.verdict += (
            f"; the {plan['extra_trials']} extra trials below where the first round "
            "diverged did not complete either: move coarse.lr lower, or check the "
            "network and the input normalisation"
        )
    elif plan.get("recovery"):
        result.verdict += f"; {plan['recovery']}"
    else:
        result.verdict += (
            f"; the first round's best had {shown}, so "
            f"{plan['extra_trials']} extra trials looked {EDGE_DECADES:g} decades "
            "further out"
        )
    return result


def searched_ranges(spec: Spec) -> dict[str, list[Any]]:
    """The spec's coarse ranges of every searched dimension: lr and weight_decay always,
    dropout and the schedule when coarse.dropout / coarse.schedule name any."""
    ranges: dict[str, list[Any]] = {
        Param.LR: list(spec.coarse.lr),
        Param.WEIGHT_DECAY: list(spec.coarse.weight_decay),
    }
    if spec.coarse.dropout:
        ranges[Param.DROPOUT] = list(spec.coarse.dropout)
    if spec.coarse.schedule:
        ranges[Param.SCHEDULE] = list(spec.coarse.schedule)
    return ranges


def _coarse_ranges(ctx: Context, initial_loss: float) -> dict[str, list[float]]:
    """The spec's coarse ranges, the lr range the LR range test proposes, or the lr range
    anchored on the overfit LR (and probed at its top, PROBE_RULE); read back from the
    coarse study once a search stored them, so every worker and every rerun uses the same."""
    spec = ctx.spec
    ranges = searched_ranges(spec)
    study = open_stage(ctx, Stage.COARSE)
    stored = StudyAttrs.from_attrs(study.user_attrs).ranges
    if stored is not None:
        return stored
    if not spec.coarse.lr_range_test:
        chosen = anchored_ranges(ctx, ranges)
        # A range babysit chose is probed at its top; a range the user set is theirs.
        return chosen if user_set_lr(spec) else probe_top(ctx, chosen, initial_loss)
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


def _extension_plan(
    trials: list[FrozenTrial],
    best: dict[str, Any] | None,
    ranges: dict[str, list[float]],
    spec: Spec,
    probed: float | None = None,
) -> dict[str, Any] | None:
    """The extra round, decided once from the first round's trials: at an edge the best
    value sits on, or, when no trial completed because every one that trained diverged,
    below the lowest LR that diverged (a recovery, said so in the verdict). ``probed``:
    the lowest lr at which the probe of the top diverged, a bound like a trial's."""
    step = 10**EDGE_DECADES
    if best is None:
        diverged_at = divergence_ceiling(trials, 0.0)
        if diverged_at is None:
            return None  # nothing diverged: nothing says where to look instead
        top = below_ceiling(diverged_at)
        strip = {**ranges, Param.LR: [top / step, top]}
        n = extra_trials(spec.coarse.trials)
        lo, hi = ranges[Param.LR]
        return {
            "edges": {Param.LR: BELOW_DIVERGENCE},
            "before": ranges,
            "strip": strip,
            "widened": {**ranges, Param.LR: [min(lo, top / step), hi]},
            "extra_trials": n,
            "best_before": None,
            "recovery": (
                f"recovered: no trial of the first round completed (the lowest lr that "
                f"diverged was {diverged_at:.3g}), so {n} extra trials looked "
                f"{EDGE_DECADES:g} decades lower, from {top:.3g} down"
            ),
        }
    ceiling = lowest(divergence_ceiling(trials, float(best["params"][Param.LR])), probed)
    found = edges(best, ranges, spec.narrow.edge, ceiling)
    plan: dict[str, Any] = {"edges": found, "before": ranges}
    if found:
        strip = dict(ranges)
        widened = dict(ranges)
        for name, side in found.items():
            lo, hi = ranges[name]
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
    return plan


# ---------------------------------------------------------------------------- the probe
# Before the coarse search spends whole trials above where training diverges, its upper
# lr end is tried alone for a few steps; while that diverges, the end comes down. Cheap:
# PROBE_STEPS steps a probe (a coarse trial takes several epochs), at most PROBE_MOST.
PROBE_STEPS = 20
PROBE_DECADES = 0.5
PROBE_MOST = 4
# The rule as stored on the coarse study (``lr_probe.rule``); docs/protocol.md quotes it.
PROBE_RULE = (
    "before coarse, its top lr is trained alone for {steps} steps at the lowest "
    "weight_decay; while the loss diverges, the top comes down {decades} decade (at most "
    "{most} times, and never to within {decades} decade of the range's lowest lr)"
)


def probe_divergence(
    ctx: Context, lr: float, weight_decay: float, initial_loss: float, i: int
) -> int | None:
    """Train a fresh network at ``lr`` for up to PROBE_STEPS steps; the step at which its
    loss diverged (the searches' own test: NaN/inf or above diverge_factor x the initial
    loss), or None when it did not."""
    from babysit.stages.context import fresh_model
    from babysit.stages.context import generator_for
    from babysit.stages.context import seed_for
    from babysit.training.step import diverged as loss_diverged
    from babysit.training.step import make_optimizer
    from babysit.training.step import train_step

    spec = ctx.spec
    seed = seed_for(spec, Stage.COARSE, PROBE_SEED_BASE + i)
    model = fresh_model(ctx, seed)
    model.train()
    opt = make_optimizer(spec.optimizer, model.parameters(), lr, weight_decay, spec.momentum)
    generator = generator_for(ctx, seed)
    above = spec.coarse.diverge_factor * initial_loss
    step = 0
    while step < PROBE_STEPS:
        for xraw, yb in ctx.data.train_batches(ctx.batch_size, generator):
            xb = ctx.data.pre(xraw, train=True, generator=generator)
            loss, _ = train_step(model, opt, xb, yb, spec.loss)
            step += 1
            if loss_diverged(float(loss), above):
                return step
            if step >= PROBE_STEPS:
                break
    return None


# Probe seeds sit far from the coarse trials' numbers, so no probe repeats a trial's draw.
PROBE_SEED_BASE = 5000


def probe_top(
    ctx: Context, ranges: dict[str, list[float]], initial_loss: float
) -> dict[str, list[float]]:
    """The coarse ranges with the lr top brought down below where a short probe diverges
    (PROBE_RULE); the probes and the decision are stored on the coarse study as
    ``lr_probe``. Off when divergence stopping is off (``coarse.diverge_factor = 0``)."""
    spec = ctx.spec
    if spec.coarse.diverge_factor <= 0 or not spec.coarse.probe:
        return ranges
    lo, hi = ranges[Param.LR]
    wd = ranges[Param.WEIGHT_DECAY][0]
    tried: list[dict[str, Any]] = []
    top = hi
    for i in range(PROBE_MOST + 1):
        step = probe_divergence(ctx, top, wd, initial_loss, i)
        tried.append({"lr": top, "diverged_at_step": step})
        if step is None:
            break
        lower = top / 10**PROBE_DECADES
        if lower <= lo or i == PROBE_MOST:
            break
        top = lower
    last = tried[-1]
    # The highest probe that trained; when every probe diverged, half a decade under the
    # last, but the range keeps at least half a decade above its lowest lr.
    if last["diverged_at_step"] is None:
        new_top = last["lr"]
    else:
        new_top = max(last["lr"] / 10**PROBE_DECADES, lo * 10**PROBE_DECADES)
    moved = {**ranges, Param.LR: [lo, min(hi, new_top)]}
    study = open_stage(ctx, Stage.COARSE)
    study.set_user_attr(
        StudyKey.LR_PROBE,
        {
            "tried": tried,
            "range": moved[Param.LR],
            "replaced": [lo, hi],
            "rule": PROBE_RULE.format(
                steps=PROBE_STEPS, decades=f"{PROBE_DECADES:g}", most=PROBE_MOST
            ),
        },
    )
    if moved[Param.LR][1] < hi:
        ctx.log(
            f"coarse: lr {hi:.3g} diverged within {plural(PROBE_STEPS, 'step')} "
            f"(at step {tried[0]['diverged_at_step']}); the lr range is now "
            f"[{lo:.3g}, {moved[Param.LR][1]:.3g}] ({plural(len(tried), 'probe')})"
        )
    return moved
