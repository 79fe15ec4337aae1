"""`babysit status` and `babysit runs`: where each stage of a run stands, read through
babysit.record.

The summary (the same dict as ``--summary-json``) plus ``progress``: per stage the trials
finished of the target, the stage's wall time from its trials' stored start and end, and
the RUNNING trials with the worker holding each. ``wall_seconds``, which a summary read
from storage leaves None, is the sum of the stages' wall times here.
"""

from __future__ import annotations

from typing import Any

from babysit.errors import UsageError
from babysit.record import stored
from babysit.record.runs import run_names
from babysit.schema import SEARCHES
from babysit.schema import STAGES
from babysit.schema import Stage
from babysit.schema import counts_text
from babysit.storage import Storage
from babysit.terminal import epoch_tested
from babysit.terminal import plural


def statuses(storage: Storage, name: str | None = None) -> list[dict[str, Any]]:
    """The status of run ``name``, or of every run in the storage."""
    out = []
    for run in [name] if name else run_names(storage):
        stages = stored.load_run(storage, run)
        s = stored.summary(storage, run, stages)
        s["progress"] = stored.progress(storage, run, stages)
        s["wall_seconds"] = s["progress"]["wall_seconds"]
        out.append(s)
    return out


def _secs(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def status_lines(s: dict[str, Any]) -> list[str]:
    """A run's status as text: a header line, then one line per stage."""
    lines = [
        f"run {s['name']}  ({s['dataset']}, {s['optimizer']}; "
        f"{s['epochs_spent']:.1f} epochs spent; {_secs(s['wall_seconds'])} in stages)"
    ]
    budget = s.get("budget")
    if budget:
        lines.append("  " + budget_line(budget))
    for stage, v in s["stages"].items():
        lines.append(_stage_line(stage, v, s["progress"]["stages"][stage]))
    model = s["stages"][Stage.FINAL].get("model_path")
    if model:
        lines.append(f"  model    {model}")
    return lines


def budget_line(b: dict[str, Any]) -> str:
    """``budget 2m: coarse 9 trials x 3 epochs, fine 6 x 4, final 12 epochs; used 1m55s``."""
    plan = dict(b.get("plan") or {})
    for replan in (b.get("replans") or {}).values():
        plan.update({k: v for k, v in replan.items() if isinstance(v, dict)})
    if b.get("final_epochs") is not None:
        plan[Stage.FINAL] = {**plan.get(Stage.FINAL, {}), "epochs": b["final_epochs"]}
    parts = [
        f"{stage} {plural(p['trials'], 'trial')} x {plural(p['epochs'], 'epoch')}"
        if "trials" in p
        else f"{stage} {plural(p['epochs'], 'epoch')}"
        for stage, p in plan.items()
    ]
    used = b.get("used_s")
    return (
        f"budget {b.get('budget')} ({b.get('budget_s'):g} s): plan {', '.join(parts)}; "
        f"epoch {b.get('epoch_s')} s; used {_secs(used)}"
    )


def _stage_line(stage: str, v: dict[str, Any], p: dict[str, Any]) -> str:
    line = f"  {stage:<8} {v['status']:<8}"
    if stage in (Stage.COARSE, Stage.FINE):
        line += f" {v['trials']} of {v['target']} trials finished: {counts_text(v)}"
        if v["best"]:
            line += f"; best {v['best']['value']:.4f}"
        if v.get("recovery"):
            line += f"; {v['recovery']}"
    elif stage == Stage.OVERFIT:
        # A stage of tries: it stops at the first LR that memorises the subset.
        line += f" {p['finished']} of up to {p['target']} LRs tried"
        if v["train_accuracy"] is not None:
            line += f"; best train accuracy {v['train_accuracy']:.0%}"
            if v.get("lr") is not None:
                line += f" at lr {v['lr']:g}"
    else:
        line += f" {p['finished']} of {p['target']} trials"
        if stage == Stage.SANITY and v["initial_loss"] is not None:
            line += f"; initial loss {v['initial_loss']:.3f} (expected {v['expected_loss']:.3f})"
        elif stage == Stage.FINAL and v.get("test_accuracy") is not None:
            line += (
                f"; test accuracy {v['test_accuracy']:.4f} {epoch_tested(v)}, "
                f"val {v['val_accuracy']:.4f}"
            )
    if p["wall_seconds"] is not None:
        line += f"; {_secs(p['wall_seconds'])}"
    if p["running"]:
        line += "; running: " + ", ".join(
            f"#{r['trial']} on {r['worker'] or '?'}" for r in p["running"]
        )
    return line


def run_rows(storage: Storage) -> list[dict[str, Any]]:
    """`babysit runs`: one row per run in the storage, oldest first: its name, dataset and
    model, each stage's state, its best accuracy (the final's test accuracy once there is
    one, else the best validation accuracy of the searches), when its first trial started
    and the wall time of its stages."""
    rows = []
    for run in run_names(storage):
        stages = stored.load_run(storage, run)
        started = [t.datetime_start for r in stages.values() for t in r.trials if t.datetime_start]
        row: dict[str, Any] = {
            "name": run,
            "dataset": None,
            "model": None,
            "stages": {stage: "skipped" for stage in stages},
            "test_accuracy": None,
            "best_val_accuracy": None,
            "started": min(started).isoformat(timespec="seconds") if started else None,
            "wall_seconds": None,
        }
        try:
            s = stored.summary(storage, run, stages)
        except UsageError:  # studies named like a run's, without babysit's spec
            rows.append(row)
            continue
        row.update(dataset=s["dataset"], model=s["model"])
        row["stages"] = {stage: v["status"] for stage, v in s["stages"].items()}
        row["test_accuracy"] = s["stages"][Stage.FINAL].get("test_accuracy")
        vals = [
            v["best"]["value"]
            for stage, v in s["stages"].items()
            if stage in SEARCHES and v.get("best")
        ]
        row["best_val_accuracy"] = max(vals) if vals else None
        row["wall_seconds"] = stored.progress(storage, run, stages)["wall_seconds"]
        rows.append(row)
    return rows


def runs_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The runs as a table: name, dataset, model, each stage's state, best, start, wall."""
    head = ["run", "dataset", "model", *(s for s in STAGES), "best", "started", "wall"]
    table = [head]
    for r in rows:
        if r["test_accuracy"] is not None:
            best = f"test {r['test_accuracy']:.4f}"
        elif r["best_val_accuracy"] is not None:
            best = f"val {r['best_val_accuracy']:.4f}"
        else:
            best = "-"
        table.append(
            [
                r["name"],
                r["dataset"] or "?",
                r["model"] or "?",
                *(r["stages"][s] for s in STAGES),
                best,
                (r["started"] or "-").replace("T", " "),
                _secs(r["wall_seconds"]),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    ]
