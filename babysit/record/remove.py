"""`babysit delete`: a run's studies and every artifact they name, local or on S3.

The artifacts are found as `babysit copy` finds them (babysit/record/transfer.py): the
files of the ``artifacts:`` system attrs (curves, the spec, plots, uploads in the
dashboard), the final's model and its JSON, and a checkpoint still named by the final
study. They are removed first and the studies last, so a delete stopped half-way leaves a
run that a second `babysit delete` finds and finishes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from babysit.record.runs import find_study
from babysit.record.runs import no_such_run
from babysit.record.transfer import artifact_ids
from babysit.schema import STAGES
from babysit.storage import Storage


@dataclass
class Doomed:
    """What deleting a run removes: its studies, their trials and the artifact ids."""

    run: str
    studies: list[optuna.Study]
    trials: int
    artifacts: list[str]
    running: int = 0  # trials RUNNING now: a process may still be working on the run


def doomed(storage: Storage, run: str) -> Doomed:
    """What `babysit delete --name RUN` would remove; a UsageError listing the runs there
    when the storage holds no run of that name."""
    studies = [s for s in (find_study(storage, run, stage) for stage in STAGES) if s]
    if not studies:
        raise no_such_run(storage, run)
    ids: list[str] = []
    for study in studies:
        ids += artifact_ids(study)
    trials = [t for s in studies for t in s.get_trials(deepcopy=False)]
    return Doomed(
        run,
        studies,
        len(trials),
        list(dict.fromkeys(ids)),
        running=sum(t.state == TrialState.RUNNING for t in trials),
    )


def delete_run(storage: Storage, what: Doomed) -> int:
    """Remove the artifacts, then the studies; returns how many artifacts were there."""
    from optuna.artifacts.exceptions import ArtifactNotFound

    present = [
        i
        for i in what.artifacts
        # Locally, one never uploaded here (a copy without its artifacts) or gone already
        # is skipped; asking the store would create its folder.
        if storage.artifact_store or (storage.artifact_dir / i).is_file()
    ]
    removed = 0
    if present:
        store = storage.artifacts
        for artifact_id in present:
            try:
                store.remove(artifact_id)
                removed += 1
            except ArtifactNotFound:
                pass
    if not storage.artifact_store:
        _prune_empty(storage.artifact_dir / what.run, storage.artifact_dir)
    for study in what.studies:
        optuna.delete_study(study_name=study.study_name, storage=storage.rdb)
    return removed


def _prune_empty(folder: Path, root: Path) -> None:
    """The run's folder in a local store (``<run>/model.pt`` was there), once it is empty,
    and the empty folders above it up to the store's root."""
    root = root.resolve()
    folder = folder.resolve()
    while folder != root and root in folder.parents and folder.is_dir():
        try:
            folder.rmdir()
        except OSError:
            return  # not empty: something else lives there
        folder = folder.parent
