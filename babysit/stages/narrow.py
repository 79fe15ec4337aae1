"""Narrowing: the fine ranges drawn from the best coarse trials, by the rule stored
on the fine study (``NARROW_RULE``, which docs/protocol.md quotes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from optuna.trial import FrozenTrial

from babysit.errors import ProtocolError
from babysit.schema import Narrowed
from babysit.schema import Param
from babysit.schema import Stage
from babysit.schema import StudyKey
from babysit.schema import scored
from babysit.spec import CoarseSpec
from babysit.stages.context import Context
from babysit.stages.divergence import CEILING_RULE
from babysit.stages.divergence import DIVERGE_MARGIN
from babysit.stages.divergence import below_ceiling
from babysit.stages.divergence import divergence_ceiling
from babysit.stages.divergence import lowest
from babysit.stages.divergence import probe_ceiling
from babysit.stages.study import open_stage

# The rule as stored on the fine study (``narrowed.rule``); docs/protocol.md quotes this template
# word for word (tests/test_readme.py), so the two cannot drift apart.
NARROW_RULE = (
    "top {top} of the {good} complete coarse trials with val accuracy >= "
    "{threshold} (half-way from chance {chance} to the best {best}); each searched number: "
    "their span (log10 for lr and weight_decay, linear for dropout) padded by {pad} decades "
    "or {share} of the coarse range, clipped to it; each searched choice: the values they "
    "used"
)
# A linear dimension's pad as a share of its coarse range, per decade of ``narrow.pad``: the
# default 0.5 decades is a tenth of the default 5-decade lr range, and so a tenth of the
# dropout range.
LINEAR_PAD_SHARE = 0.2


def narrow(
    trials: list[FrozenTrial],
    coarse: CoarseSpec,
    top_k: int,
    pad: float,
    edge: float,
    chance: float = 0.0,
    probed: float | None = None,
) -> Narrowed:
    """Fine ranges from the best coarse trials, by a rule stated in full.

    Keep the COMPLETE coarse trials that got at least half of the best trial's gain over
    chance (a trial at chance level says nothing about where the good region is), take
    the top k of them by validation accuracy; for each searched number take the span of
    their values on its search scale (log10 for lr and weight_decay, linear for dropout),
    pad it by ``pad`` decades (linear: ``pad`` x LINEAR_PAD_SHARE of the coarse range) on
    both sides and clip it to the coarse range; a searched choice keeps the values used.
    Warn when the best value lies within ``edge`` decades of a coarse bound: the optimum
    may lie outside the range searched. lr stays below a divergence (``_spans``).
    """
    complete = scored(trials)
    if not complete:
        raise ProtocolError(
            "no coarse trial completed, so there is nothing to narrow from: "
            "every trial diverged or failed; lower the upper end of coarse.lr"
        )
    valued = [(t, t.value) for t in complete if t.value is not None]  # all of them: scored()
    best_value = max(v for _, v in valued)
    threshold = chance + 0.5 * (best_value - chance)
    good = [(t, v) for t, v in valued if v >= threshold]
    if best_value <= chance or not good:
        # Every trial is at chance level (or below): by the rule above none says where the
        # good region is, and with none above chance the half-way threshold keeps no trial.
        raise ProtocolError(
            f"narrowing failed: none of the {len(complete)} complete coarse trials beat "
            f"chance (best val accuracy {best_value:.3f}, chance {chance:.3f}: always "
            "guessing the most common class), so there is no good region to narrow to; "
            "the network learned nothing in the coarse budget. Give coarse more epochs "
            "(coarse.epochs) or trials (coarse.trials), or move coarse.lr, and rerun under a "
            "new --name (`babysit report` shows every coarse trial)"
        )
    top = [t for t, _ in sorted(good, key=lambda tv: (-tv[1], tv[0].number))[:top_k]]
    spans, ceiling = _spans(trials, top, coarse, pad, probed)
    ranges, warnings_ = _ranges(top, spans, coarse, edge)
    rule = NARROW_RULE.format(
        top=len(top),
        good=len(good),
        threshold=f"{threshold:.3f}",
        chance=f"{chance:.3f}",
        best=f"{best_value:.3f}",
        pad=f"{pad:g}",
        share=f"{pad * LINEAR_PAD_SHARE:g}",
    )
    return Narrowed(
        ranges=ranges,
        rule=rule,
        top=[t.number for t in top],
        threshold=threshold,
        chance=chance,
        warnings=warnings_,
        # The divergence bound (None when no coarse trial diverged above the best one).
        ceiling=None
        if ceiling is None
        else {
            "diverged_lr": ceiling,
            "max_lr": ranges[Param.LR][1],
            "rule": CEILING_RULE.format(margin=f"{10**-DIVERGE_MARGIN:.2g}", span=f"{2 * pad:g}"),
        },
    )


def _ranges(
    top: list[FrozenTrial], spans: dict[str, tuple[float, float]], coarse: CoarseSpec, edge: float
) -> tuple[dict[str, list[Any]], list[str]]:
    """The fine range of every dimension the ``top`` trials searched (``spans`` in log10
    for lr and weight_decay, plain for dropout; a choice keeps the values they used), and a
    warning for each best log value within ``edge`` decades of a coarse bound."""
    best = top[0]
    ranges: dict[str, list[Any]] = {}
    warnings_: list[str] = []
    for name in Param.ALL:
        if name not in best.params:
            continue
        if name in Param.CHOICE:  # the choices the top trials used, in the coarse order
            used = {t.params.get(name) for t in top}
            ranges[name] = [c for c in getattr(coarse, name) if c in used] or sorted(used)
            continue
        if name in Param.LINEAR:
            ranges[name] = list(spans[name])
            continue
        lo_c, hi_c = (math.log10(v) for v in getattr(coarse, name))
        lo, hi = spans[name]
        ranges[name] = [10**lo, 10**hi]
        b = math.log10(best.params[name])
        if b - lo_c <= edge or hi_c - b <= edge:
            side = "lower" if b - lo_c <= edge else "upper"
            warnings_.append(
                f"best {name} {best.params[name]:.3g} sits at the {side} edge of the coarse "
                f"range [{10**lo_c:.3g}, {10**hi_c:.3g}]: widen coarse.{name} and rerun"
            )
    return ranges, warnings_


def _spans(
    trials: list[FrozenTrial],
    top: list[FrozenTrial],
    coarse: CoarseSpec,
    pad: float,
    probed: float | None,
) -> tuple[dict[str, tuple[float, float]], float | None]:
    """The log10 span of each parameter over the ``top`` trials, padded and clipped to the
    coarse range, lr's capped below a divergence; and that divergence's lr (or None)."""
    spans: dict[str, tuple[float, float]] = {}
    for name in Param.LOG:
        lo_c, hi_c = (math.log10(v) for v in getattr(coarse, name))
        logs = [math.log10(t.params[name]) for t in top]
        spans[name] = (max(lo_c, min(logs) - pad), min(hi_c, max(logs) + pad))
    for name in Param.LINEAR:
        if name not in top[0].params:
            continue
        lo_c, hi_c = getattr(coarse, name)
        values = [float(t.params[name]) for t in top]
        margin = pad * LINEAR_PAD_SHARE * (hi_c - lo_c)
        spans[name] = (max(lo_c, min(values) - margin), min(hi_c, max(values) + margin))
    # Divergence is evidence (babysit/stages/divergence.py, CEILING_RULE): fine's lr stays
    # below where coarse trials of the good weight-decay region (or the probe of the top)
    # diverged. An lr that diverged for one trial is no place to search, even below a good
    # one: when the cap cuts below the top trials, fine searches the decade under the cap,
    # and the final still compares the best coarse trial with fine's.
    wd_lo, wd_hi = spans[Param.WEIGHT_DECAY]
    ceiling = lowest(divergence_ceiling(trials, 0.0, (10**wd_lo, 10**wd_hi)), probed)
    if ceiling is not None:
        lo, hi = spans[Param.LR]
        hi = min(hi, math.log10(below_ceiling(ceiling)))
        spans[Param.LR] = (min(lo, hi - 2 * pad), hi)
    return spans, ceiling


def narrow_stage(ctx: Context) -> Narrowed:
    fine = open_stage(ctx, Stage.FINE)
    stored = fine.user_attrs.get(StudyKey.NARROWED)
    if stored is not None:
        return Narrowed.from_attrs(stored)
    coarse = open_stage(ctx, Stage.COARSE)
    spec = ctx.spec
    # Chance: always guessing the most common validation class.
    counts = torch.bincount(ctx.data.val_labels(), minlength=ctx.data.num_classes)
    chance = float(counts.max()) / max(1, int(counts.sum()))
    # Clip to the range the coarse search really used (the LR range test may have set it).
    bounds = dataclasses.replace(spec.coarse, **coarse.user_attrs.get(StudyKey.RANGES, {}))
    try:
        result = narrow(
            coarse.get_trials(deepcopy=False),
            bounds,
            spec.narrow.top_k,
            spec.narrow.pad,
            spec.narrow.edge,
            chance=chance,
            probed=probe_ceiling(coarse.user_attrs.get(StudyKey.LR_PROBE)),
        )
    except ProtocolError as err:
        # The verdict stays with the run: `babysit status` and the report show it on fine.
        fine.set_user_attr(StudyKey.VERDICT, str(err))
        raise
    fine.set_user_attr(StudyKey.NARROWED, result.to_attrs())
    return result
