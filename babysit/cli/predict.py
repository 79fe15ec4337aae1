"""`babysit predict`: a finished run's model on image files: one line per image on stdout
(its likeliest classes and their probabilities) and, with ``--out``, a table of every
class's probability.

No torch at import (docs/design.md): the model is loaded, and torch imported, inside
:func:`predict` once every flag and path has been checked.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from babysit.errors import UsageError
from babysit.record.model_file import MODEL_FILE
from babysit.record.model_file import MODEL_INFO_FILE
from babysit.record.model_file import model_info_id
from babysit.record.runs import no_such_run
from babysit.record.runs import run_names
from babysit.record.stored import load_stage
from babysit.schema import Stage
from babysit.schema import trial_attrs
from babysit.storage import Storage
from babysit.terminal import plural

TABLE_FORMATS = (".csv", ".json", ".parquet")


def check_out(out: Path | None) -> None:
    if out is not None and out.suffix.lower() not in TABLE_FORMATS:
        raise UsageError(
            f"--out {out}: the table is written as {', '.join(TABLE_FORMATS)} by its "
            "extension; name the file e.g. preds.csv"
        )


def model_artifacts(storage: Storage, run: str) -> tuple[str, str]:
    """The artifact ids of run ``run``'s trained weights and their card; a one-line
    UsageError when the run is unknown, has no passed final, or predates the card."""
    rec = load_stage(storage, run, Stage.FINAL)
    if rec.study is None and run not in run_names(storage):
        raise no_such_run(storage, run)  # the line every verb gives, listing the runs there
    complete = rec.complete
    if not complete:
        raise UsageError(
            f"run '{run}' has no trained model: its final stage has not passed; "
            f"finish it with `babysit run --name {run}` (`babysit status --name {run}` says "
            "where it stands)"
        )
    artifact = trial_attrs(complete[0]).model_artifact
    info = model_info_id(artifact) if isinstance(artifact, str) else None
    if artifact is None or info is None:
        raise UsageError(
            f"run '{run}' was trained by an older babysit that stored its model without "
            f"{MODEL_INFO_FILE}; load it with babysit.load_run('{run}').model() instead"
        )
    return artifact, info


def _fetch(storage: Storage, artifact_id: str, to: Path) -> None:
    try:
        with storage.artifacts.open_reader(artifact_id) as src, to.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    except Exception as err:  # noqa: BLE001 - a missing file or object, an unreachable S3
        raise UsageError(
            f"{artifact_id} is not in {storage.artifact_where} ({type(err).__name__}); pass "
            "the run's --artifact-dir or --artifact-store"
        ) from None


def image_paths(given: list[Path]) -> list[Path]:
    """The files named and the images under the folders named (by extension, sorted)."""
    from babysit.data.imagefolder import EXTENSIONS
    from babysit.data.imagefolder import image_files

    out: list[Path] = []
    for path in given:
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise UsageError(f"folder {path} holds no images ({', '.join(EXTENSIONS)})")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise UsageError(f"{path} does not exist; give image files or folders of images")
    return out


def _table(paths: list[Path], classes: list[str], probs: Any) -> list[dict[str, Any]]:
    rows = []
    for path, p in zip(paths, probs.tolist(), strict=True):
        best = max(range(len(classes)), key=p.__getitem__)
        rows.append(
            {
                "path": str(path),
                "class": classes[best],
                "probability": p[best],
                "probabilities": dict(zip(classes, p, strict=True)),
            }
        )
    return rows


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    """JSON: one record per image, its probabilities by class; CSV and Parquet: path, class,
    probability, then a ``prob_<class>`` column per class."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=2) + "\n")
        return
    import pandas as pd

    flat = [
        {
            **{k: v for k, v in r.items() if k != "probabilities"},
            **{f"prob_{c}": v for c, v in r["probabilities"].items()},
        }
        for r in rows
    ]
    frame = pd.DataFrame(flat)
    if out.suffix.lower() == ".csv":
        frame.to_csv(out, index=False)
    else:
        frame.to_parquet(out, index=False)


def predict(
    storage: Storage,
    run: str,
    given: list[Path],
    top: int = 1,
    out: Path | None = None,
    device: str = "auto",
    batch_size: int = 256,
) -> int:
    """`babysit predict`; returns the exit code."""
    if top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    check_out(out)
    weights, card = model_artifacts(storage, run)
    paths = image_paths(given)
    import torch

    from babysit.stages.final.model import load_model
    from babysit.training.step import device_for

    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is visible")
    dev = device_for(device)
    with tempfile.TemporaryDirectory(prefix="babysit-model-") as tmp:
        _fetch(storage, weights, Path(tmp) / MODEL_FILE)
        _fetch(storage, card, Path(tmp) / MODEL_INFO_FILE)
        model = load_model(Path(tmp) / MODEL_FILE, map_location=dev)
    probs = model.probabilities(paths, batch_size=batch_size)
    k = min(top, len(model.classes))
    values, index = probs.topk(k, dim=1)
    for path, ps, ix in zip(paths, values.tolist(), index.tolist(), strict=True):
        picks = "\t".join(f"{model.classes[i]}\t{p:.4f}" for p, i in zip(ps, ix, strict=True))
        print(f"{path}\t{picks}")
    told = f"classified {plural(len(paths), 'image')} with the model of run {run}"
    if out is not None:
        write_table(_table(paths, model.classes, probs), out)
        told += f"; table: {out}"
    print(f"{told} (on {dev.type})", file=sys.stderr)
    return 0
