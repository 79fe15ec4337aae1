"""The final training's files in the artifact store: its checkpoint and its trained model.

One checkpoint per run is kept, the newest, named in the final study's "checkpoint" attr; a
rerun or another worker resumes from it. When to write one is :func:`checkpoint_due`'s rule.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import optuna
import torch

from babysit.context import Context
from babysit.record import StudyKey
from babysit.record import TrialKey

_CKPT_ATTR = StudyKey.CHECKPOINT


def save_checkpoint(ctx: Context, study: optuna.Study, trial: optuna.Trial,
                    state: dict[str, Any], epoch: int) -> None:
    """Write the newest checkpoint to the artifact store and drop the one before it.

    One checkpoint is kept, not one per epoch: an AlexNet checkpoint with optimiser state
    is ~200 MB.
    """
    store = ctx.storage.artifacts
    artifact_id = f"{ctx.spec.name.replace('/', '_')}-final-epoch{epoch}-{trial.number}"
    # Through a temporary file, not a BytesIO: one copy of the state in memory, not two.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint.pt")
        torch.save(state, path)
        with open(path, "rb") as fh:
            store.write(artifact_id, fh)
    previous = study.user_attrs.get(_CKPT_ATTR)
    study.set_user_attr(_CKPT_ATTR, {"artifact_id": artifact_id, "epoch": epoch,
                                     "trial": trial.number})
    if previous and previous.get("artifact_id") != artifact_id:
        try:
            store.remove(previous["artifact_id"])
        except Exception:  # noqa: BLE001 - an already missing file is fine
            pass


def load_checkpoint(ctx: Context, study: optuna.Study,
                    map_location: torch.device | str | None = None) -> dict[str, Any] | None:
    """The newest checkpoint of the final study, or None (none written, or its file gone:
    then the final starts over, with a warning)."""
    meta = study.user_attrs.get(_CKPT_ATTR)
    if not meta:
        return None
    try:
        with ctx.storage.artifacts.open_reader(meta["artifact_id"]) as fh:
            return torch.load(fh, map_location=map_location or ctx.device, weights_only=True)
    except Exception:  # noqa: BLE001 - a missing store is reported, then training restarts
        ctx.log(f"warning: checkpoint {meta['artifact_id']} not found in "
                f"{ctx.storage.artifact_where}; the final training starts over")
        return None


def checkpoint_due(epoch: int, last_epoch: bool, trained_since: float,
                   last_write: float | None, share: float) -> bool:
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


def save_model(ctx: Context, trial: optuna.Trial, model: torch.nn.Module) -> None:
    """The trained weights as an Optuna artifact of the final trial (load with weights_only)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        torch.save(model.state_dict(), path)
        artifact_id = optuna.artifacts.upload_artifact(
            artifact_store=ctx.storage.artifacts, file_path=path, study_or_trial=trial)
    trial.set_user_attr(TrialKey.MODEL_ARTIFACT, artifact_id)
