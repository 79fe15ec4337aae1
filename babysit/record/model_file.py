"""Where the final's trained model lies: ``<run>/model.pt`` in the run's artifact store,
``<run>/model.json`` beside it (what ``babysit.load_model`` rebuilds the network from).

Without torch: the summary, `babysit status` and `babysit copy` read it.
"""

from __future__ import annotations

from babysit.storage import Storage

# The final's trained weights are the artifact ``<run>/model.pt`` (TrialKey.MODEL_ARTIFACT),
# with what builds their network in ``<run>/model.json`` beside them.
MODEL_FILE = "model.pt"
MODEL_INFO_FILE = "model.json"


def model_info_id(model_id: str) -> str | None:
    """The artifact id of the JSON beside a model's weights; None for a model stored under
    a bare id (runs of an older babysit: one UUID, no JSON)."""
    folder, _, name = model_id.rpartition("/")
    return f"{folder}/{MODEL_INFO_FILE}" if folder and name == MODEL_FILE else None


def artifact_location(storage: Storage, artifact_id: str) -> str:
    """Where an artifact lies, for people: an absolute file path for an artifact folder,
    the ``s3://`` URL for an object store."""
    if storage.artifact_store:
        return f"{storage.artifact_store.rstrip('/')}/{artifact_id}"
    return str((storage.artifact_dir / artifact_id).resolve())


def model_path(storage: Storage, model_artifact: str | None, stored: str | None) -> str | None:
    """The final's model file as this storage reaches it (a copied run's, in the copy's
    artifact store); the path stored at training time for a model under a bare id."""
    if model_artifact and model_info_id(model_artifact):
        return artifact_location(storage, model_artifact)
    return stored
