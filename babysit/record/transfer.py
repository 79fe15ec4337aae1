"""Move a whole run between storages (SQLite on a laptop -> PostgreSQL for many machines).

The studies go through ``optuna.copy_study``, which copies directions, user and system
attrs and every trial as it is. Three things it leaves wrong for a run that is to go on in
the target, fixed here:

- A RUNNING trial arrives RUNNING with no heartbeat row, and Optuna never counts a trial
  without a heartbeat as stale: it would hold its place in the stage forever. Its process
  writes to the source, not here, so it is marked FAIL (reason "running when copied") and
  the stage runs a replacement.
- optuna-dashboard keeps trial notes in the study's system attrs under the trial's
  database id (``dashboard:<trial_id>:note_str:0``); ids differ in the target, so the keys
  are rewritten to the new ids.
- Notes link artifacts by database ids too (``/artifacts/<study_id>/<artifact_id>``, a
  trial's ``/artifacts/<study_id>/<trial_id>/<artifact_id>``): the links in every note
  of the run are rewritten to the target's ids, so the copy's plots load.
- Artifacts (the final model, the final training's checkpoint, the JSON curves and spec,
  files uploaded in the dashboard) live in the artifact store, not the database: the
  files referenced by the ``artifacts:`` system attrs and the final study's
  ``checkpoint`` attr are copied too, under the same ids, so attrs naming an artifact id
  (``data``, ``spec_artifact``, ``model_artifact``) stay right as they are.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from babysit.errors import UsageError
from babysit.record.model_file import model_info_id
from babysit.record.runs import no_such_run
from babysit.schema import ARTIFACT_PREFIX
from babysit.schema import STAGES
from babysit.schema import Reason
from babysit.schema import StudyAttrs
from babysit.schema import TrialKey
from babysit.schema import study_name
from babysit.schema import trial_attrs
from babysit.storage import Storage
from babysit.storage.private import storage_of
from babysit.storage.private import study_id
from babysit.storage.private import trial_id

_TRIAL_NOTE = re.compile(r"^dashboard:(\d+):(note_ver|note_str:\d+)$")
# optuna-dashboard's artifact URLs (artifact/_backend.py): study's, then a trial's.
_LINK = re.compile(r"/artifacts/(\d+)/(?:(\d+)/)?([0-9a-fA-F-]+)")


def copy_run(src: Storage, dst: Storage, run: str) -> dict[str, Any]:
    """Copy every ``<run>/<stage>`` study of ``src`` and their artifacts into ``dst``.

    Returns ``{"studies", "trials", "artifacts", "interrupted", "missing"}``: counts of what
    was copied, how many RUNNING trials were closed as FAIL, and the ids of artifacts the
    source store lacks. Refuses (UsageError, nothing written) when ``dst`` already holds
    any study of the run.
    """
    names = [study_name(run, stage) for stage in STAGES]
    present = set(optuna.get_all_study_names(src.rdb))
    mine = [n for n in names if n in present]
    if not mine:
        raise no_such_run(src, run)
    clash = [n for n in names if n in set(optuna.get_all_study_names(dst.rdb))]
    if clash:
        raise UsageError(
            f"{dst.shown} already holds {', '.join(clash)}; copy to another "
            "storage, or resume there with `babysit run --name "
            f"{run} --storage URL`"
        )
    copied: list[str] = []
    result: dict[str, Any] = {
        "studies": 0,
        "trials": 0,
        "artifacts": 0,
        "interrupted": 0,
        "missing": [],
    }
    named: list[str] = []
    study_ids: dict[int, int] = {}
    trial_ids: dict[int, int] = {}
    targets: list[optuna.Study] = []
    try:
        for name in mine:
            optuna.copy_study(from_study_name=name, from_storage=src.rdb, to_storage=dst.rdb)
            copied.append(name)
            source = optuna.load_study(study_name=name, storage=src.rdb)
            target = optuna.load_study(study_name=name, storage=dst.rdb)
            result["interrupted"] += _close_running(target)
            _renumber_notes(source, target)
            study_ids[study_id(source)] = study_id(target)
            trial_ids.update(_trial_ids(source, target))
            targets.append(target)
            named += artifact_ids(source)
            result["studies"] += 1
            result["trials"] += len(target.get_trials(deepcopy=False))
        for target in targets:  # after all: a note may link another stage's artifacts
            _relink_notes(target, study_ids, trial_ids)
        result["artifacts"], result["missing"] = _copy_artifacts(src, dst, named)
    except BaseException:
        for name in copied:  # all or nothing: a half-copied run would resume wrongly
            optuna.delete_study(study_name=name, storage=dst.rdb)
        raise
    return result


def _close_running(study: optuna.Study) -> int:
    storage = storage_of(study)
    closed = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial_id(t), TrialKey.REASON, Reason.RUNNING_WHEN_COPIED)
        storage.set_trial_state_values(trial_id(t), state=TrialState.FAIL)
        closed += 1
    return closed


def _renumber_notes(source: optuna.Study, target: optuna.Study) -> None:
    """Point the dashboard's trial notes at the target's trial ids."""
    ids = _trial_ids(source, target)
    storage = storage_of(target)
    attrs = storage.get_study_system_attrs(study_id(target))
    moved = {}
    for key, value in attrs.items():
        match = _TRIAL_NOTE.match(key)
        if match and int(match.group(1)) in ids:
            moved[f"dashboard:{ids[int(match.group(1))]}:{match.group(2)}"] = value
    stale = [k for k in attrs if _TRIAL_NOTE.match(k) and k not in moved]
    for key, value in moved.items():
        storage.set_study_system_attr(study_id(target), key, value)
    # A key naming a source id that is also a target id was just overwritten; the rest
    # would attach a note to whichever trial later gets that id, so they are emptied.
    for key in stale:
        storage.set_study_system_attr(study_id(target), key, 0 if key.endswith("note_ver") else "")


def _trial_ids(source: optuna.Study, target: optuna.Study) -> dict[int, int]:
    return {
        trial_id(s): trial_id(t)
        for s, t in zip(
            source.get_trials(deepcopy=False), target.get_trials(deepcopy=False), strict=True
        )
    }


def relink(text: str, study_ids: dict[int, int], trial_ids: dict[int, int]) -> str:
    """``text`` with each dashboard artifact link of a copied study pointed at the copy's
    study (and trial) id; links to studies not copied stay as they are."""

    def swap(m: re.Match[str]) -> str:
        study, trial, artifact = int(m.group(1)), m.group(2), m.group(3)
        if study not in study_ids or (trial is not None and int(trial) not in trial_ids):
            return m.group(0)
        middle = "" if trial is None else f"{trial_ids[int(trial)]}/"
        return f"/artifacts/{study_ids[study]}/{middle}{artifact}"

    return _LINK.sub(swap, text)


def _relink_notes(
    target: optuna.Study, study_ids: dict[int, int], trial_ids: dict[int, int]
) -> None:
    """Rewrite the artifact links in the study's note and its trials' notes."""
    from babysit.record.notes import note_module

    get_note_from_system_attrs = note_module().get_note_from_system_attrs
    save_note_with_version = note_module().save_note_with_version
    storage = storage_of(target)
    attrs = storage.get_study_system_attrs(study_id(target))
    for tid in [None, *(trial_id(t) for t in target.get_trials(deepcopy=False))]:
        note = get_note_from_system_attrs(attrs, tid)
        body = relink(note["body"], study_ids, trial_ids)
        if body != note["body"]:
            save_note_with_version(storage, study_id(target), tid, int(note["version"]) + 1, body)


def artifact_ids(study: optuna.Study) -> list[str]:
    """Every artifact the study names: its and its trials' uploads, the final's model and
    the JSON beside it, the checkpoint still named (`babysit copy` and `delete` use it)."""
    ids: list[str] = []
    attrs = [storage_of(study).get_study_system_attrs(study_id(study))]
    attrs += [t.system_attrs for t in study.get_trials(deepcopy=False)]
    for system_attrs in attrs:
        for key, value in system_attrs.items():
            if key.startswith(ARTIFACT_PREFIX):
                meta = json.loads(value) if isinstance(value, str) else value
                ids.append(meta.get("artifact_id") or key[len(ARTIFACT_PREFIX) :])
    for t in study.get_trials(deepcopy=False):
        model = trial_attrs(t).model_artifact
        if isinstance(model, str):
            ids.append(model)
            info = model_info_id(model)  # the JSON babysit.load_model rebuilds it from
            if info is not None:
                ids.append(info)
    checkpoint = StudyAttrs.from_attrs(study.user_attrs).checkpoint
    if isinstance(checkpoint, dict) and checkpoint.get("artifact_id"):
        ids.append(checkpoint["artifact_id"])
    return list(dict.fromkeys(ids))


def _copy_artifacts(src: Storage, dst: Storage, ids: list[str]) -> tuple[int, list[str]]:
    if not ids:
        return 0, []
    missing = [i for i in ids if not (src.artifact_dir / i).is_file()]
    present = [i for i in ids if i not in missing]
    if _same_dir(src.artifact_dir, dst.artifact_dir):
        return len(present), missing  # one shared store: writing a file onto itself empties it
    source, target = src.artifacts, dst.artifacts
    for artifact_id in present:
        if not dst.artifact_store:  # <run>/model.pt: the file store writes into folders only
            (dst.artifact_dir / artifact_id).parent.mkdir(parents=True, exist_ok=True)
        with source.open_reader(artifact_id) as fh:
            target.write(artifact_id, fh)
    return len(present), missing


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
