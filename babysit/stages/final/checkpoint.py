"""The final training's files in the artifact store: its checkpoint and its trained model.

One checkpoint per run is kept while the final trains, the newest, named in the final
study's "checkpoint" attr; a rerun or another worker resumes from it. When to write one is
:func:`checkpoint_due`'s rule. Once the final passed the checkpoint is deleted
(:func:`delete_checkpoint`) and the trained weights alone remain, as ``<run>/model.pt`` in
the artifact store with ``<run>/model.json`` beside it (its card: what
:func:`babysit.stages.final.model.load_model` rebuilds the network from).
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from typing import Any
from typing import BinaryIO

import optuna
import torch

from babysit.record.model_file import MODEL_FILE
from babysit.record.model_file import artifact_location
from babysit.record.model_file import model_info_id
from babysit.schema import CheckpointKey
from babysit.schema import StudyKey
from babysit.schema import TrialKey
from babysit.stages.context import Context
from babysit.stages.final.model import model_card
from babysit.storage import Storage

_CKPT_ATTR = StudyKey.CHECKPOINT


def _checkpoint_prefix(run: str) -> str:
    return f"{run.replace('/', '_')}-final-epoch"


def save_checkpoint(
    ctx: Context, study: optuna.Study, trial: optuna.Trial, state: dict[str, Any], epoch: int
) -> None:
    """Write the newest checkpoint to the artifact store and drop the one before it.

    One checkpoint is kept, not one per epoch: an AlexNet checkpoint with optimiser state
    is ~200 MB.
    """
    store = ctx.storage.artifacts
    artifact_id = f"{_checkpoint_prefix(ctx.spec.name)}{epoch}-{trial.number}"
    # Through a temporary file, not a BytesIO: one copy of the state in memory, not two.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint.pt")
        torch.save(state, path)
        with open(path, "rb") as fh:
            store.write(artifact_id, fh)
    previous = study.user_attrs.get(_CKPT_ATTR)
    study.set_user_attr(
        _CKPT_ATTR,
        {
            CheckpointKey.ARTIFACT_ID: artifact_id,
            CheckpointKey.EPOCH: epoch,
            CheckpointKey.TRIAL: trial.number,
        },
    )
    if previous and previous.get(CheckpointKey.ARTIFACT_ID) not in (None, artifact_id):
        try:
            store.remove(previous[CheckpointKey.ARTIFACT_ID])
        except Exception:  # noqa: BLE001 - an already missing file is fine
            pass


def delete_checkpoint(ctx: Context, study: optuna.Study) -> None:
    """Remove the final's checkpoint once the final passed: a finished run needs only its
    model (the checkpoint adds the optimiser state and a second copy of the weights, ~279 MB
    for the digits AlexNet with Adam). The attr keeps the epoch and names the removed file
    under ``deleted``. Safe to call again: a rerun of a finished run finds nothing to do."""
    _remove_orphans(ctx)
    meta = study.user_attrs.get(_CKPT_ATTR)
    if not meta or not meta.get(CheckpointKey.ARTIFACT_ID):
        return
    artifact_id = meta[CheckpointKey.ARTIFACT_ID]
    try:
        ctx.storage.artifacts.remove(artifact_id)
    except Exception:  # noqa: BLE001 - already gone (removed by a process killed after it)
        pass
    kept = {k: v for k, v in meta.items() if k != CheckpointKey.ARTIFACT_ID}
    study.set_user_attr(_CKPT_ATTR, {**kept, CheckpointKey.DELETED: artifact_id})


def _remove_orphans(ctx: Context) -> None:
    """Checkpoints of the run no attr names: a kill between writing a checkpoint and
    removing the one before leaves one behind. Looked for in an artifact folder only (an
    object store is not listed); ``<run>-final-epoch<E>-<N>`` exactly, so another run's
    files, even of a name that starts alike, stay."""
    if ctx.storage.artifact_store or not ctx.storage.artifact_dir.is_dir():
        return
    name = re.compile(re.escape(_checkpoint_prefix(ctx.spec.name)) + r"\d+-\d+")
    for path in ctx.storage.artifact_dir.iterdir():
        if name.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def load_checkpoint(
    ctx: Context, study: optuna.Study, map_location: torch.device | str | None = None
) -> dict[str, Any] | None:
    """The newest checkpoint of the final study, or None (none written, or its file gone:
    then the final starts over, with a warning)."""
    meta = study.user_attrs.get(_CKPT_ATTR)
    if not meta or not meta.get(CheckpointKey.ARTIFACT_ID):
        return None  # none written, or deleted after the final passed
    try:
        with ctx.storage.artifacts.open_reader(meta[CheckpointKey.ARTIFACT_ID]) as fh:
            return torch.load(fh, map_location=map_location or ctx.device, weights_only=True)
    except Exception:  # noqa: BLE001 - a missing store is reported, then training restarts
        ctx.log(
            f"warning: checkpoint {meta['artifact_id']} not found in "
            f"{ctx.storage.artifact_where}; the final training starts over"
        )
        return None


def checkpoint_due(
    epoch: int, last_epoch: bool, trained_since: float, last_write: float | None, share: float
) -> bool:
    """The checkpoint rule (spec ``final.checkpoint_share``): always after the first and
    the last epoch; otherwise once the training since the previous write took at least
    ``1 / share`` times as long as that write, so writes cost at most ``share`` of the
    final's time."""
    if last_epoch or last_write is None:
        return True
    return trained_since * share >= last_write


def copy_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The best epoch's weights, kept for the test split while later epochs train on (a copy
    on the device, the weights only: no optimiser state)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def model_artifact_id(run: str) -> str:
    """The trained weights' artifact id: ``<run>/model.pt``, a file under the artifact
    folder (or a key under the bucket's prefix) named by the run."""
    return f"{run}/{MODEL_FILE}"


def _write(storage: Storage, artifact_id: str, body: BinaryIO) -> None:
    if not storage.artifact_store:
        # Optuna's file store writes into existing folders only; <run>/ is new.
        (storage.artifact_dir / artifact_id).parent.mkdir(parents=True, exist_ok=True)
    storage.artifacts.write(artifact_id, body)


def save_model(
    ctx: Context, trial: optuna.Trial, model: torch.nn.Module, results: dict[str, Any]
) -> str:
    """The trained weights (a state_dict: load with ``weights_only=True``) as
    ``<run>/model.pt`` in the artifact store, its card ``<run>/model.json`` beside it
    (:func:`babysit.stages.final.model.model_card` of ``results``); the id and the location
    stored on the final trial. Returns the location.

    Written through the run's artifact store, so on S3 the model is an object beside the
    run's other artifacts and no local copy is made: a host that trains for a shared bucket
    has no folder the team would look in (``babysit.load_run(name).model()`` fetches it)."""
    artifact_id = model_artifact_id(ctx.spec.name)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        torch.save(model.state_dict(), path)
        with open(path, "rb") as fh:
            _write(ctx.storage, artifact_id, fh)
    info = model_card(ctx, results)
    _write(
        ctx.storage,
        str(model_info_id(artifact_id)),
        io.BytesIO((json.dumps(info, indent=2) + "\n").encode()),
    )
    where = artifact_location(ctx.storage, artifact_id)
    trial.set_user_attr(TrialKey.MODEL_ARTIFACT, artifact_id)
    trial.set_user_attr(TrialKey.MODEL_PATH, where)
    return where
