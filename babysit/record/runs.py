"""The runs in a storage and a run's stage studies, found by name without creating one.

Apart from stored.py so that artifacts.py, which stored.py builds on, can find a study too.
"""

from __future__ import annotations

import optuna

from babysit.errors import UsageError
from babysit.schema import STAGES
from babysit.schema import study_name
from babysit.storage import Storage


def run_names(storage: Storage) -> list[str]:
    """Every run in a storage, in creation order (a run is a set of <run>/<stage> studies)."""
    names: list[str] = []
    for summary in optuna.get_all_study_summaries(storage.rdb, include_best_trial=False):
        run, _, stage = summary.study_name.rpartition("/")
        if run and stage in STAGES and run not in names:
            names.append(run)
    return names


def find_study(storage: Storage, run: str, stage: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=study_name(run, stage), storage=storage.rdb)
    except KeyError:
        return None


_LISTED = 20  # the most run names an error message lists


def no_such_run(storage: Storage, run: str) -> UsageError:
    """The error for a run name the storage does not hold: one line listing those it does,
    so a mistyped name is corrected without another command."""
    names = [n for n in run_names(storage) if n != run]
    # Studies named like a run's but without babysit's spec (another tool made them).
    foreign = " (its studies hold no babysit spec)" if find_any(storage, run) else ""
    if not names:
        there = "it holds no runs; start one with `babysit run`"
    else:
        more = len(names) - _LISTED
        listed = ", ".join(names[:_LISTED]) + (
            f" and {more} more (`babysit runs` lists them)" if more > 0 else ""
        )
        there = f"runs there: {listed}"
    return UsageError(f"no run named '{run}'{foreign} in storage {storage.shown}; {there}")


def find_any(storage: Storage, run: str) -> bool:
    """Whether any stage study of ``run`` exists."""
    present = set(optuna.get_all_study_names(storage.rdb))
    return any(study_name(run, stage) in present for stage in STAGES)
