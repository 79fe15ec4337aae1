"""Divergence is evidence (cs231n: a loss that explodes means the learning rate is too
high, and a careful person never searches above where they saw it explode).

Every LR at which a search trial (or the probe of the coarse top, babysit/stages/learned.py)
diverged bounds the searches from then on, a factor 10^DIVERGE_MARGIN below it:

- **moved**: while no coarse trial has trained without diverging, each new coarse trial
  draws its lr below the lowest lr that diverged (MOVE_RULE), within the stage's budget;
- **ceiling**: the fine lr range stays below the lowest lr that diverged in the good
  weight-decay region (CEILING_RULE, applied by narrowing in babysit/stages/narrow.py);
- **edge**: the coarse edge round does not widen lr upwards past a divergence
  (babysit/stages/learned.py).

Pure functions of stored trials, so every process and every rerun decides the same.
"""

from __future__ import annotations

from typing import Any

from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from babysit.schema import Param
from babysit.schema import diverged
from babysit.schema import real

# The margin below an lr that diverged: it did so for one seed, and its neighbours just
# below often do too. 0.3 decades: half the lr.
DIVERGE_MARGIN = 0.3
# The rule as stored on the fine study (``narrowed.ceiling_rule``); docs/protocol.md quotes it.
CEILING_RULE = (
    "fine lr stays below {margin}x the lowest lr at which a coarse trial in the fine "
    "weight_decay range, or the probe of the coarse top, diverged; when that cuts below "
    "the top trials, fine searches the {span} decade below it"
)


def divergence_ceiling(
    trials: list[FrozenTrial],
    above: float,
    weight_decay: tuple[float, float] | None = None,
) -> float | None:
    """The lowest LR above ``above`` at which a trial diverged (among those whose
    weight_decay lies in ``weight_decay``, when given); None when none did. Narrowing
    counts every LR (``above=0``); the edge round only those above the best trial's, the
    side it would widen."""
    lrs = [
        float(t.params[Param.LR])
        for t in trials
        if diverged(t)
        and Param.LR in t.params
        and float(t.params[Param.LR]) > above
        and (
            weight_decay is None
            or weight_decay[0]
            <= float(t.params.get(Param.WEIGHT_DECAY, weight_decay[0]))
            <= weight_decay[1]
        )
    ]
    return min(lrs) if lrs else None


def probe_ceiling(probe: dict[str, Any] | None) -> float | None:
    """The lowest lr at which the probe of the coarse range's top (``lr_probe``) diverged."""
    lrs = [float(p["lr"]) for p in (probe or {}).get("tried", []) if p["diverged_at_step"]]
    return min(lrs) if lrs else None


def lowest(*ceilings: float | None) -> float | None:
    """The lowest of the bounds that exist."""
    known = [c for c in ceilings if c is not None]
    return min(known) if known else None


def below_ceiling(ceiling: float) -> float:
    """The highest LR the searches may draw under a divergence ``ceiling``."""
    return ceiling / 10**DIVERGE_MARGIN


# How many diverged trials, and none that trained, move the coarse lr range down.
MOVE_AFTER = 2
# How far below the cap a moved range reaches (decades).
MOVE_DECADES = 2.0
# The rule as stored on the coarse study (``moved.rule``); docs/protocol.md quotes it.
MOVE_RULE = (
    "once {after} coarse trials have diverged and none has trained without diverging, each "
    "new coarse trial draws lr from the {decades} decades below {margin}x the lowest lr "
    "that diverged"
)


def moved_range(
    trials: list[FrozenTrial], ranges: dict[str, list[float]]
) -> dict[str, list[float]] | None:
    """The coarse ranges a new trial draws from under MOVE_RULE, or None while the rule
    does not apply (fewer than MOVE_AFTER diverged, or some trial trained)."""
    finished = [t for t in real(trials) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if any(not diverged(t) for t in finished):
        return None
    cap = divergence_ceiling(finished, 0.0)
    if cap is None or sum(diverged(t) for t in finished) < MOVE_AFTER:
        return None
    top = min(below_ceiling(cap), ranges[Param.LR][1])
    return {**ranges, Param.LR: [top / 10**MOVE_DECADES, top]}
