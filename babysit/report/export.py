"""`babysit export`: a run's trials as one table, and their curves as a second one.

The trials table has one row per trial of every stage and one column per meaning: the
objective Optuna calls ``value`` means an initial loss in sanity, a train accuracy in
overfit and a validation accuracy in the searches and the final, so it lands in the
column of that name (``initial_loss``, ``train_accuracy``, ``val_accuracy``); the params
are ``lr`` and ``weight_decay``; every scalar trial attr is a column of its own name
(babysit.record.TrialKey). ``outcome`` says how each trial ended as every count of trials
says it (complete, diverged, pruned, failed, running; schema.outcome) and ``diverged`` is
True for a diverged trial, which Optuna stores COMPLETE at chance. Columns keep their type: counts and epochs are nullable
integers, not floats, in Parquet, and written without a ".0" in CSV.

Curves go to the long-format curves table (``--curves``): one row per (run, stage, trial,
epoch or step, metric, value), from the overfit curve (by step), the per-epoch curves of
the searches and the final, and the per-epoch diagnostics' numbers. Only pandas is
imported, and only when a table is built.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from babysit import schema
from babysit.errors import UsageError
from babysit.record import stored
from babysit.record.artifacts import trial_data
from babysit.record.runs import no_such_run
from babysit.schema import Outcome
from babysit.schema import Reason
from babysit.schema import Stage
from babysit.schema import TrialKey
from babysit.storage import Storage

if TYPE_CHECKING:
    import pandas as pd

# What a trial's objective value means, by stage: the column it goes to.
OBJECTIVE = {
    Stage.SANITY: TrialKey.INITIAL_LOSS,
    Stage.OVERFIT: TrialKey.TRAIN_ACCURACY,
    Stage.COARSE: TrialKey.VAL_ACCURACY,
    Stage.FINE: TrialKey.VAL_ACCURACY,
    Stage.FINAL: TrialKey.VAL_ACCURACY,
}
# Attrs that are curves: in the curves table, not in a cell of the trials table.
_CURVE_KEYS = (TrialKey.CURVE, TrialKey.CURVES, TrialKey.DIAGNOSTICS, TrialKey.DATA)
_LEAD = [
    "run",
    "stage",
    "study",
    "trial",
    "state",
    "outcome",
    "diverged",
    "datetime_start",
    "datetime_complete",
    "duration_s",
    "worker",
    "reason",
]
CURVE_COLUMNS = ["run", "stage", "trial", "epoch", "step", "metric", "value"]


def _stages(storage: Storage, run: str) -> dict[str, stored.StageRecord]:
    stages = {s: r for s, r in stored.load_run(storage, run).items() if r.study is not None}
    if not stages:
        raise no_such_run(storage, run)
    return stages


def _cell(key: str, value: Any) -> list[tuple[str, Any]]:
    """A trial attr as (column, value) pairs: scalars as they are, a dict of scalars one
    column per entry, a list of texts joined, anything else as JSON text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return [(key, value)]
    if isinstance(value, dict) and all(isinstance(v, (int, float, str)) for v in value.values()):
        return [(f"{key}_{k}", v) for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [(key, "; ".join(value))]
    return [(key, json.dumps(value))]


def _column(name: str, values: list[Any]) -> Any:
    """One column in the narrowest type that holds all its values, missing ones as NA."""
    import pandas as pd

    if name.startswith("datetime_"):
        return pd.to_datetime(pd.Series(values, dtype="object"))
    kinds = {type(v) for v in values if v is not None and not _isnan(v)}
    if kinds == {bool}:
        return pd.array(values, dtype="boolean")
    if kinds == {int}:
        return pd.array(values, dtype="Int64")
    if kinds and kinds <= {int, float}:
        return pd.array([math.nan if v is None else float(v) for v in values], dtype="float64")
    # Text, or text mixed with numbers (an attr stored as both): text, so Parquet can type
    # it and CSV reads it back the same.
    return pd.array([None if v is None or _isnan(v) else str(v) for v in values], dtype="string")


def trials_frame(storage: Storage, run: str) -> pd.DataFrame:
    """Every trial of every stage, one row each, one column per meaning (module doc)."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for stage, rec in _stages(storage, run).items():
        assert rec.study is not None
        for t in sorted(rec.trials, key=lambda t: t.number):
            row: dict[str, Any] = {
                "run": run,
                "stage": stage,
                "study": rec.study.study_name,
                "trial": t.number,
                "state": t.state.name,
                # How it ended as every count says it (schema.outcome): a diverged trial is
                # stored COMPLETE at chance, so `state` alone would call it complete.
                "outcome": schema.outcome(t) or Reason.SURPLUS,
                "diverged": schema.outcome(t) == Outcome.DIVERGED,
                "datetime_start": t.datetime_start,
                "datetime_complete": t.datetime_complete,
                "duration_s": t.duration.total_seconds() if t.duration is not None else None,
            }
            for name, v in t.params.items():
                row[name if name not in row else f"param_{name}"] = v
            # The readings come from their artifact (an older run's from its attrs).
            for key, value in sorted(trial_data(storage, t).to_attrs().items()):
                if key not in _CURVE_KEYS:
                    row.update({k: v for k, v in _cell(key, value) if k not in row})
            if t.value is not None:
                row.setdefault(OBJECTIVE[stage], t.value)
            rows.append(row)
    names = list(dict.fromkeys(k for row in rows for k in row))
    lead = [c for c in _LEAD if c in names]
    params = [c for c in schema.Param.ALL if c in names]
    rest = sorted(c for c in names if c not in lead and c not in params)
    return pd.DataFrame(
        {c: _column(c, [row.get(c) for row in rows]) for c in lead + params + rest}
    )


def _diagnostic_points(epoch_info: dict[str, Any], prefix: str) -> list[tuple[str, float]]:
    """The numbers of one epoch's diagnostics as (dotted name, value); lists are left out."""
    out: list[tuple[str, float]] = []
    for key, value in epoch_info.items():
        if isinstance(value, dict):
            out += _diagnostic_points(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
            out.append((f"{prefix}{key}", float(value)))
    return out


def curves_frame(storage: Storage, run: str) -> pd.DataFrame:
    """Every stored curve point of the run, long format (columns ``CURVE_COLUMNS``)."""
    import pandas as pd

    rows: list[tuple[Any, ...]] = []
    for stage, rec in _stages(storage, run).items():
        for t in sorted(rec.trials, key=lambda t: t.number):
            a = trial_data(storage, t)
            for point in a.curve or []:
                step = point.get("step")
                rows += [
                    (run, stage, t.number, None, step, k, v)
                    for k, v in point.items()
                    if k != "step"
                ]
            for metric, values in (a.curves or {}).items():
                rows += [
                    (run, stage, t.number, i, None, metric, v)
                    for i, v in enumerate(values, start=1)
                ]
            for info in a.diagnostics or []:
                rows += [
                    (run, stage, t.number, info.get("epoch"), None, name, v)
                    for name, v in _diagnostic_points(info, "diagnostics.")
                ]
    frame = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    for col in ("trial", "epoch", "step"):
        frame[col] = frame[col].astype("Int64")
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce").astype("float64")
    for col in ("run", "stage", "metric"):
        frame[col] = frame[col].astype("string")
    return frame


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _write(frame: pd.DataFrame, fmt: str, out: Path) -> None:
    if not out.parent.exists():
        raise UsageError(
            f"folder {out.parent} for {out.name} does not exist; create it or pass another --out"
        )
    if fmt == "csv":
        frame.to_csv(out, index=False)
    else:
        frame.to_parquet(out, index=False)


def export_trials(
    storage: Storage, run: str, fmt: str, out: Path, curves: Path | None = None
) -> tuple[Path, int]:
    """Write every trial of the run to ``out`` as CSV or Parquet, and with ``curves`` the
    curves table there in the same format; returns (path, trial rows)."""
    if fmt not in ("csv", "parquet"):
        raise UsageError(f"unknown export format '{fmt}'; use csv or parquet")
    frame = trials_frame(storage, run)
    _write(frame, fmt, Path(out))
    if curves is not None:
        _write(curves_frame(storage, run), fmt, Path(curves))
    return Path(out), len(frame)
