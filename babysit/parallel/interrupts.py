"""Ctrl-C and SIGTERM in the middle of a trial: the trial says so, and the rerun says so.

The CLI's handler (babysit/cli/main.py) raises KeyboardInterrupt; :func:`marking_interrupts`
writes ``reason=interrupted`` on the trial it stopped, before Optuna stores it FAIL. The next
``babysit run`` of the run names such a trial in one line as it opens the stage
(:func:`say_interrupted`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from babysit.schema import Reason
from babysit.schema import TrialKey

if TYPE_CHECKING:
    pass


def marking_interrupts(
    objective: Callable[[optuna.Trial], float],
) -> Callable[[optuna.Trial], float]:
    """``objective``, with a Ctrl-C or SIGTERM that lands in it written on the trial as
    ``reason=interrupted`` before Optuna stores the trial FAIL and the interrupt goes on."""

    def run(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except KeyboardInterrupt:
            try:
                trial.set_user_attr(TrialKey.REASON, Reason.INTERRUPTED)
            except Exception:  # noqa: BLE001 - the interrupt matters more than its label
                pass
            raise

    return run


def interrupted_last(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials a Ctrl-C stopped, when they are the stage's newest (no trial numbered
    after them but surplus ones and other interrupted ones): what a rerun goes on from."""
    out: list[FrozenTrial] = []
    for t in sorted(trials, key=lambda t: t.number, reverse=True):
        reason = t.user_attrs.get(TrialKey.REASON)
        if reason == Reason.SURPLUS:
            continue
        if t.state != TrialState.FAIL or reason != Reason.INTERRUPTED:
            break
        out.append(t)
    return out[::-1]
