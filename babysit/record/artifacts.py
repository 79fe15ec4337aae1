"""JSON artifacts of a run: what is too large for a user attr (see babysit.record).

optuna-dashboard lays every user attr out in full on the trial and study pages, so curves,
diagnostics, readings, the overfit curve and the spec go to the artifact store as JSON, and
an attr names them: ``data`` (the id of ``trial.json``) on a trial, ``spec_artifact`` on
a study. The readers here read both layouts: a run of an older babysit kept them as attrs.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from babysit.errors import UsageError
from babysit.schema import DATA_FIELDS
from babysit.schema import MAX_ATTR_BYTES
from babysit.schema import StudyAttrs
from babysit.schema import StudyKey
from babysit.schema import SystemKey
from babysit.schema import TrialAttrs
from babysit.schema import TrialKey
from babysit.schema import trial_attrs
from babysit.spec import Spec
from babysit.storage import Storage
from babysit.storage.private import storage_of
from babysit.storage.private import study_id

# The spec as a study system attr (see store_spec).


def upload_bytes(
    storage: Storage,
    owner: optuna.Study | optuna.Trial,
    name: str,
    data: bytes,
    mimetype: str | None = None,
) -> str:
    """``data`` as the artifact ``name`` of a study or trial; returns its id. Every artifact
    babysit uploads (JSON, the dashboard's plots, the filters) goes through here; None as
    ``mimetype`` lets Optuna guess it from the name."""
    # Imported here: optuna.artifacts pulls in boto3, which the readers' verbs do without.
    from optuna.artifacts import upload_artifact

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as fh:
            fh.write(data)
        return upload_artifact(
            artifact_store=storage.artifacts,
            file_path=path,
            study_or_trial=owner,
            mimetype=mimetype,
        )


def upload_json(
    storage: Storage, study_or_trial: optuna.Study | optuna.Trial, name: str, value: Any
) -> str:
    """``value`` as the JSON artifact ``name`` of the study or trial; returns its id."""
    # NaN/inf as JSON's NaN/Infinity: a diverged curve stays one.
    data = json.dumps(value).encode()
    return upload_bytes(storage, study_or_trial, name, data, "application/json")


def read_json(storage: Storage, artifact_id: str) -> Any:
    """A JSON artifact's value; None when the store lacks it (a copy without artifacts)."""
    try:
        with storage.artifacts.open_reader(artifact_id) as fh:
            return json.load(fh)
    except Exception:  # noqa: BLE001 - ArtifactNotFound, a missing folder, an S3 error
        return None


def store_trial_data(storage: Storage, trial: optuna.Trial, **fields: Any) -> None:
    """Store ``fields`` (names from DATA_FIELDS) as the trial's JSON artifact
    ``trial.json``, named by the trial attr ``data`` (its artifact id); fields stored
    before are kept, and replaced when given again.

    One artifact and one id per trial: the dashboard shows an attr on one unwrapped line,
    so ``data`` stays a 36-character id rather than a dict of ids.
    """
    for name in fields:
        if name not in DATA_FIELDS:
            raise ValueError(f"{name} is not an artifact-kept trial field")
    before = trial.user_attrs.get(TrialKey.DATA)
    merged = dict(read_json(storage, before) or {}) if isinstance(before, str) else {}
    merged.update(fields)
    # The replaced artifact stays: its record on the trial would point at nothing.
    trial.set_user_attr(TrialKey.DATA, upload_json(storage, trial, "trial.json", merged))


def trial_data(storage: Storage, t: FrozenTrial) -> TrialAttrs:
    """The trial's attrs with the artifact-kept fields read from its ``data`` artifact; an
    older run's trial, which kept them as attrs, reads the same."""
    a = trial_attrs(t)
    found = read_json(storage, a.data) if isinstance(a.data, str) else None
    for name, value in (found or {}).items():
        if name in DATA_FIELDS and getattr(a, name) is None:
            setattr(a, name, value)
    return a


def trial_curves(storage: Storage, t: FrozenTrial) -> dict[str, list[float]]:
    """The per-epoch curves of a search or final trial ({} when it has none)."""
    return dict(trial_data(storage, t).curves or {})


def spec_summary(spec: Spec) -> dict[str, str]:
    """The few spec keys a study shows as an attr (the whole spec is an artifact)."""
    return {
        "name": spec.name,
        "dataset": str(spec.dataset),
        "model": str(spec.model),
        "optimizer": str(spec.optimizer),
    }


def study_spec(storage: Storage, study: optuna.Study) -> dict[str, Any] | None:
    """The spec dict a study carries: an older run's attr, else the system attr, else the
    spec artifact."""
    attrs = StudyAttrs.from_attrs(study.user_attrs)
    if attrs.spec is not None or not attrs.spec_artifact:
        return attrs.spec
    system = storage_of(study).get_study_system_attrs(study_id(study))
    if isinstance(system.get(SystemKey.SPEC), dict):
        return dict(system[SystemKey.SPEC])
    found = read_json(storage, attrs.spec_artifact)
    if not isinstance(found, dict):
        raise UsageError(
            f"the spec of {study.study_name} (artifact {attrs.spec_artifact}) is not in "
            f"the artifact store {storage.artifact_where}; pass the run's store with "
            "--artifact-dir or --artifact-store"
        )
    return found


def store_spec(storage: Storage, spec: Spec, study: optuna.Study) -> None:
    """The spec on a new stage study: the run's ``spec.json`` artifact named by the attr
    ``spec_artifact``, the few keys of ``spec_summary``, and a copy in a system attr.

    The copy is what the readers use: `babysit status`, export and workers need the spec
    on a machine without the artifact store, and the dashboard shows no system attr.
    """
    study.set_user_attr(StudyKey.SPEC_ARTIFACT, spec_artifact(storage, spec, study))
    study.set_user_attr(StudyKey.SPEC_SUMMARY, spec_summary(spec))
    storage_of(study).set_study_system_attr(
        study_id(study), SystemKey.SPEC, json.loads(json.dumps(spec.to_dict()))
    )


def oversized_attrs(attrs: Mapping[str, Any]) -> dict[str, int]:
    """The attrs over MAX_ATTR_BYTES as JSON, with their sizes (for the tests and checks)."""
    sizes = {k: len(json.dumps(v)) for k, v in attrs.items()}
    return {k: n for k, n in sizes.items() if n > MAX_ATTR_BYTES}


def spec_artifact(storage: Storage, spec: Spec, study: optuna.Study) -> str:
    """The id of the run's spec artifact: the one another stage study of the run names when
    the spec is the same, else ``spec`` uploaded now as ``spec.json`` of ``study``."""
    from babysit.record.runs import find_study
    from babysit.schema import STAGES

    mine = json.loads(json.dumps(spec.to_dict()))  # as read back: tuples are lists
    for stage in STAGES:
        other = find_study(storage, spec.name, stage)
        found = StudyAttrs.from_attrs(other.user_attrs).spec_artifact if other else None
        if found and read_json(storage, found) == mine:
            return found
    return upload_json(storage, study, "spec.json", mine)
