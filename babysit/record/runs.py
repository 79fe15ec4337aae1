"""The runs in a storage and a run's stage studies, found by name without creating one.

Apart from stored.py so that artifacts.py, which stored.py builds on, can find a study too.
"""

from __future__ import annotations

import optuna

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
