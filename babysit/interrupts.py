"""Ctrl-C and SIGTERM in the middle of a trial: the trial says so, and the rerun says so.

The CLI's handler (babysit/cli.py) raises KeyboardInterrupt; :func:`marking_interrupts`
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

from babysit.record import Reason
from babysit.record import TrialKey

if TYPE_CHECKING:
    from babysit.context import Context


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


# (storage URL, study name, trial number) of the interrupted trials this process has named.
_SAID: set[tuple[str, str, int]] = set()


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


def say_interrupted(ctx: Context, study: optuna.Study, stage: str) -> None:
    """A rerun's one line per trial the previous run's Ctrl-C stopped, said once: later
    trials replace it (a search draws a new one in its place; a single-trial stage runs
    its trial again, the final from its checkpoint)."""
    for t in interrupted_last(study.get_trials(deepcopy=False)):
        said = (ctx.storage.url, study.study_name, t.number)
        if said in _SAID:
            continue
        _SAID.add(said)
        again = (
            "a new trial takes its place" if stage in ("coarse", "fine") else "running it again"
        )
        ctx.log(f"{stage}: trial {t.number} was interrupted; {again}")
