"""`--budget`: the plan that fits the coarse, fine and final stages into a wall-clock budget,
by a stated rule (``BUDGET_RULE``), and what each stage reads of it from storage.

The planner is pure (``plan``, ``minimum_seconds``, ``expected_epochs``, ``measured_epoch``):
timings in, trials and epochs out, tested with made-up timings. What a run measured and
planned is stored on the coarse study (``budget``, ``budget_rule``); each search study holds its planned
``target`` and ``epochs``, the ``deadline`` its trials must end by and the ``trial_cost`` a
trial may take at most, which babysit/parallel/coordination.py reads before every trial, so
every process filling a stage (``--jobs``, ``babysit worker``) keeps the same plan. No torch
here: the measuring is in babysit/protocol/prepare.py.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial

from babysit.schema import FINISHED
from babysit.schema import Stage
from babysit.schema import StudyAttrs
from babysit.schema import TrialKey
from babysit.stages.samplers import HALVING_FACTOR
from babysit.stages.samplers import HALVING_STARTUP
from babysit.terminal import duration
from babysit.terminal import plural

# How the time left after sanity and overfit is shared out (coarse, fine, final).
SHARES = {Stage.COARSE: 0.35, Stage.FINE: 0.25, Stage.FINAL: 0.40}
# The least protocol a budget must fit: coarse 4 trials of 1 epoch, fine 2 of 1, final 1.
MIN_TRIALS = {Stage.COARSE: 4, Stage.FINE: 2}
# A search never plans more than this many times the spec's trials (coarse.trials,
# fine.trials): past that, more random or TPE draws in the same box add little.
MAX_TRIALS_FACTOR = 4
# The overfit stage stops once the subset is memorised: the least protocol counts it at
# this share of overfit.steps at its first LR. Measured: the default run on digits
# memorised at its first LR in 60 of its 200 steps (README), the tests' small network in
# 15 of 60 (docs/benchmarks.md, "A wall-clock budget"). Counting all its steps would have
# made the least protocol on default digits about three times the overfit stage's real cost.
OVERFIT_EXPECTED = 1 / 3
# Held back from the budget for what trains nothing: the notes and plots published after
# each stage, the LR probe and narrowing, storage writes.
RESERVE = 0.05

# The rule as stored on the coarse study (``budget_rule``); docs/protocol.md quotes it.
BUDGET_RULE = (
    "before the first trial, a few training steps and a validation pass on the real "
    "network and data give the cost of an epoch; {reserve:.0%} of the budget is held back, "
    "and what is left after sanity and overfit is shared {coarse:.0%} coarse, "
    "{fine:.0%} fine, {final:.0%} final; the final gets the epochs its share pays for, "
    "at most final.epochs, and what it does not use goes to the searches; a search keeps "
    "its spec's epochs per trial and runs as many trials as its share pays for (at least "
    "{min_coarse} coarse and {min_fine} fine, at most {factor}x its spec's trials), with "
    "fewer epochs per trial when the least count does not fit and more (at most "
    "final.epochs) when the most count leaves time over; a coarse trial under "
    "successive halving is counted at the epochs it runs on average, every other at all "
    "its epochs; before fine and before the final the plan is made again from the cost "
    "of the trials that finished and the time really left; a trial starts only when all "
    "its epochs fit in its stage's time, else the stage ends with the trials it has (its "
    "first trial always runs)"
)


def budget_rule() -> str:
    return BUDGET_RULE.format(
        reserve=RESERVE,
        coarse=SHARES[Stage.COARSE],
        fine=SHARES[Stage.FINE],
        final=SHARES[Stage.FINAL],
        min_coarse=MIN_TRIALS[Stage.COARSE],
        min_fine=MIN_TRIALS[Stage.FINE],
        factor=MAX_TRIALS_FACTOR,
    )


@dataclass(frozen=True)
class Timings:
    """What the stages cost on this data and machine, in seconds."""

    epoch_s: float  # one training epoch and one validation pass
    trial_s: float  # a trial beside its epochs: a fresh network, its optimiser, storage
    sanity_s: float
    overfit_s: float  # overfit at its first LR, OVERFIT_EXPECTED of its steps
    test_s: float  # the final's test pass


@dataclass(frozen=True)
class Shape:
    """What the spec asks of each stage, which the plan scales."""

    coarse_trials: int
    coarse_epochs: int
    coarse_pruner: str
    fine_trials: int
    fine_epochs: int
    fine_pruner: str
    final_epochs: int


def expected_epochs(epochs: int, pruner: str, trials: int) -> float:
    """The epochs a search trial runs on average: all of them, unless successive halving
    stops it at a rung (1, 3, 9, ...; the top 1/3 go on) once HALVING_STARTUP trials
    have finished. Trials stopped for divergence run fewer still; not counted."""
    if pruner != "halving" or trials <= HALVING_STARTUP:
        return float(epochs)
    halved, rung, reach = 0.0, 1, 1.0
    previous = 0
    while previous < epochs:
        top = min(rung, epochs)
        halved += reach * (top - previous)
        previous, rung, reach = top, rung * HALVING_FACTOR, reach / HALVING_FACTOR
    return (HALVING_STARTUP * epochs + (trials - HALVING_STARTUP) * halved) / trials


def _search(
    seconds: float,
    t: Timings,
    epochs: int,
    pruner: str,
    trials: tuple[int, int],
    longest: int,
    procs: int,
) -> dict[str, Any]:
    """The most trials (``trials``: at least, at most) that ``procs`` processes finish in
    ``seconds``, at the spec's epochs per trial, or fewer when the least count does not
    fit, or more (at most ``longest``) when the most count leaves time over."""
    least, cap = trials
    paid = seconds * procs
    for e in range(epochs, 0, -1):
        n = least
        while n < cap and _cost(n + 1, e, pruner, t) <= paid:
            n += 1
        if _cost(n, e, pruner, t) <= paid or e == 1:
            # Every trial the cap allows fits with time over: longer trials rank the
            # points better than more draws in the same box would.
            while n == cap and e < longest and _cost(n, e + 1, pruner, t) <= paid:
                e += 1
            return {"trials": n, "epochs": e, "seconds": round(seconds, 1)}
    raise AssertionError("unreachable")  # pragma: no cover


def _cost(n: int, epochs: int, pruner: str, t: Timings) -> float:
    return n * (expected_epochs(epochs, pruner, n) * t.epoch_s + t.trial_s)


def plan(
    left_s: float, t: Timings, shape: Shape, stages: tuple[str, ...], procs: int = 1
) -> dict[str, dict[str, Any]]:
    """Trials and epochs for ``stages`` (the ones still to run, in order) in ``left_s``
    seconds, by BUDGET_RULE. The shares of the stages not in ``stages`` are left out."""
    shares = {s: SHARES[s] for s in stages}
    total = sum(shares.values())
    out: dict[str, dict[str, Any]] = {}
    final_s = left_s * shares.get(Stage.FINAL, 0.0) / total
    if Stage.FINAL in stages:
        paid = math.floor((final_s - t.trial_s - t.test_s) / t.epoch_s)
        epochs = max(1, min(shape.final_epochs, paid))
        used = epochs * t.epoch_s + t.trial_s + t.test_s
        out[Stage.FINAL] = {"epochs": epochs, "seconds": round(used, 1)}
        final_s = used if len(stages) > 1 else final_s
    searches = [s for s in stages if s != Stage.FINAL]
    rest = left_s - final_s
    weight = sum(shares[s] for s in searches)
    for stage in searches:
        trials, epochs, pruner = (
            (shape.coarse_trials, shape.coarse_epochs, shape.coarse_pruner)
            if stage == Stage.COARSE
            else (shape.fine_trials, shape.fine_epochs, shape.fine_pruner)
        )
        out[stage] = _search(
            max(0.0, rest * shares[stage] / weight),
            t,
            epochs,
            pruner,
            (MIN_TRIALS[stage], max(MIN_TRIALS[stage], MAX_TRIALS_FACTOR * trials)),
            max(epochs, shape.final_epochs),
            max(1, procs),
        )
    return {s: out[s] for s in stages}


def minimum_seconds(t: Timings) -> float:
    """The least protocol (sanity, overfit at its first LR for a third of its steps,
    coarse 4 x 1 epoch, fine 2 x 1, final 1 epoch and its test), with the reserve on top."""
    trained = t.sanity_s + t.overfit_s + t.test_s
    trained += (MIN_TRIALS[Stage.COARSE] + MIN_TRIALS[Stage.FINE] + 1) * (t.epoch_s + t.trial_s)
    return trained / (1 - RESERVE)


def minimum_words(t: Timings) -> str:
    """What the minimum is made of, for the message that refuses a budget."""
    return (
        f"sanity {t.sanity_s:.1f} s, overfit {t.overfit_s:.1f} s "
        f"({OVERFIT_EXPECTED:.0%} of its steps), "
        f"{MIN_TRIALS[Stage.COARSE] + MIN_TRIALS[Stage.FINE] + 1} one-epoch trials of "
        f"{t.epoch_s + t.trial_s:.1f} s each, test {t.test_s:.1f} s, {RESERVE:.0%} reserve"
    )


def shown(seconds: float) -> str:
    """A duration as a person reads it (babysit/terminal.py)."""
    return duration(seconds)


def at_least(minimum: float) -> str:
    """The budget to ask for instead, rounded up to a whole minute (or 10 s under one)."""
    if minimum < 55:
        return f"{math.ceil(minimum / 10) * 10}s"
    return f"{math.ceil(minimum / 60)}m"


def measured_epoch(trials: list[FrozenTrial], t: Timings) -> float | None:
    """Seconds per epoch from finished trials: their durations less the measured cost of a
    trial beside its epochs, over the epochs they ran; None before any finished."""
    spent, epochs = 0.0, 0
    for tr in trials:
        ran = tr.user_attrs.get(TrialKey.EPOCHS_RUN)
        if tr.state in FINISHED and ran and tr.duration is not None:
            spent += max(0.0, tr.duration.total_seconds() - t.trial_s)
            epochs += int(ran)
    return spent / epochs if epochs else None


def workers_of(trials: list[FrozenTrial]) -> int:
    """How many processes ran a stage's trials."""
    return max(1, len({tr.user_attrs.get(TrialKey.WORKER) for tr in trials} - {None}))


@dataclass
class Budget:
    """A run's budget as this process holds it: the seconds given, the clock it started
    at (Unix time), what was measured, and the plan as last made."""

    seconds: float
    started: float
    timings: Timings
    plan: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def deadline(self) -> float:
        """When the last trial must have ended: the budget less its reserve."""
        return self.started + self.seconds * (1 - RESERVE)

    def left(self) -> float:
        return self.deadline - time.time()

    def end(self) -> float:
        """When the whole budget is spent (the reserve included)."""
        return self.started + self.seconds

    def record(self) -> dict[str, Any]:
        """What is stored on the coarse study (``budget``)."""
        return {
            "budget_s": self.seconds,
            "started": self.started,
            "epoch_s": round(self.timings.epoch_s, 3),
            "timings": {k: round(v, 3) for k, v in dataclasses.asdict(self.timings).items()},
            "plan": self.plan,
        }


def plan_words(p: dict[str, dict[str, Any]]) -> str:
    """``coarse 9 trials x 3 epochs, fine 6 trials x 4 epochs, final 12 epochs``."""
    parts = []
    for stage in (Stage.COARSE, Stage.FINE):
        if stage in p:
            n, e = p[stage]["trials"], p[stage]["epochs"]
            parts.append(f"{stage} {plural(n, 'trial')} x {plural(e, 'epoch')}")
    if Stage.FINAL in p:
        parts.append(f"final {plural(p[Stage.FINAL]['epochs'], 'epoch')}")
    return ", ".join(parts)


def stage_plan(attrs: StudyAttrs) -> tuple[int, int] | None:
    """A search study's planned (target, epochs per trial), or None without a budget."""
    if attrs.target is None or attrs.epochs is None:
        return None
    return int(attrs.target), int(attrs.epochs)


def room_for_a_trial(attrs: StudyAttrs) -> bool:
    """Whether a search study's stored deadline leaves time for one more whole trial (True
    without a budget)."""
    if attrs.deadline is None or attrs.trial_cost is None:
        return True
    return attrs.time_up is None and attrs.deadline - time.time() >= attrs.trial_cost
