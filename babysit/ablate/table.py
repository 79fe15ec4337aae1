"""The table of `babysit ablate`, built from storage alone: one row per variant (means over
its finished repeats, the spread of test accuracy), as markdown, CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

from babysit.ablate.config import Ablation
from babysit.record import stored
from babysit.record.artifacts import trial_data
from babysit.schema import STAGES
from babysit.schema import Param
from babysit.schema import Stage
from babysit.schema import trial_attrs
from babysit.storage import Storage
from babysit.terminal import plural


def _run_facts(storage: Storage, run: str) -> dict[str, Any] | None:
    """Test accuracy and loss, params, epochs and seconds of one run, from storage."""
    stages = stored.load_run(storage, run)
    final = stages[Stage.FINAL]
    if final.study is None:
        return _earlier_failure(storage, run, stages)
    seconds = sum(
        float(trial_attrs(t).seconds or 0.0) for rec in stages.values() for t in rec.trials
    )
    if not final.complete:
        reasons = [v for v in (trial_attrs(t).verdict for t in final.trials) if v]
        return {
            "done": False,
            "status": f"failed: {reasons[-1]}" if reasons else "not finished",
            "seconds": seconds,
        }
    t = final.complete[0]
    a = trial_data(storage, t)  # the readings are an artifact
    return {
        "done": True,
        "status": "done",
        "params": dict(t.params),
        "test_accuracy": a.test_accuracy,
        "test_loss": a.test_loss,
        "val_accuracy": a.val_accuracy,
        "epochs": a.epochs_run,
        "seconds": seconds,
        "readings": list(a.readings or []),
        "epochs_spent": stored.summary(storage, run, stages)["epochs_spent"],
    }


def _earlier_failure(
    storage: Storage, run: str, records: dict[str, stored.StageRecord]
) -> dict[str, Any] | None:
    """Mode "full": a run that stopped before final (sanity or overfit failed) says where."""
    if not any(rec.study is not None for rec in records.values()):
        return None
    stages = stored.summary(storage, run, records)["stages"]
    for stage in STAGES:
        if stages[stage].get("status") == "failed":
            verdict = stages[stage].get("verdict") or ""
            return {
                "done": False,
                "status": f"{stage} failed: {verdict}".rstrip(": "),
                "seconds": 0.0,
            }
    return {"done": False, "status": "not finished", "seconds": 0.0}


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def table_rows(storage: Storage, ablation: Ablation) -> list[dict[str, Any]]:
    """One row per variant: means over its finished repeats, the spread of test accuracy
    (sample standard deviation), and the status of any repeat not finished."""
    rows: list[dict[str, Any]] = []
    for variant in ablation.variants:
        names = [spec.name for v, _, spec in ablation.runs if v is variant]
        facts = [(name, _run_facts(storage, name)) for name in names]
        done = [f for _, f in facts if f is not None and f["done"]]
        accs = [f["test_accuracy"] for f in done if f["test_accuracy"] is not None]
        losses = [f["test_loss"] for f in done if f["test_loss"] is not None]
        params = [f["params"] for f in done]
        spent = [f["epochs_spent"] for f in done]
        readings = list(dict.fromkeys(r for f in done for r in f["readings"]))
        problems = [
            f"{name}: {f['status'] if f else 'not run'}"
            for name, f in facts
            if f is None or not f["done"]
        ]
        rows.append(
            {
                "variant": variant.name,
                "change": variant.change,
                "runs": len(names),
                "runs_done": len(done),
                "lr": params[0].get(Param.LR) if params else None,
                "weight_decay": params[0].get(Param.WEIGHT_DECAY) if params else None,
                "same_params": all(p == params[0] for p in params),
                "test_accuracy_mean": _mean(accs),
                "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else None,
                "test_loss_mean": _mean(losses),
                "epochs": _mean([float(f["epochs"]) for f in done if f["epochs"] is not None]),
                "epochs_spent": _mean(spent),
                "seconds_mean": _mean([f["seconds"] for f in done]),
                "reported": variant.reported,
                "status": "done" if not problems else "; ".join(problems),
                "readings": readings,
                "run_names": names,
            }
        )
    return rows


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f} %"


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "" if v is None else format(v, fmt)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_markdown(rows: list[dict[str, Any]], ablation: Ablation) -> str:
    header = [
        "variant",
        "change",
        "params",
        "test accuracy",
        "test loss",
        "epochs",
        "seconds",
        "reported",
        "readings",
    ]
    if ablation.mode == "full":
        header.insert(6, "epochs spent")
    lines = [
        f"## Ablation {ablation.name} (mode {ablation.mode}, "
        f"{ablation.repeats} repeat{'s' if ablation.repeats > 1 else ''} per variant)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for r in rows:
        if r["lr"] is None:
            params = ""
        else:
            params = f"lr {r['lr']:.3g}, weight_decay {r['weight_decay']:.3g}"
            if not r["same_params"]:
                params += " (repeat 0; the repeats differ)"
        if r["runs_done"] == 0:
            acc = r["status"]
        else:
            acc = _pct(r["test_accuracy_mean"])
            if r["test_accuracy_std"] is not None:
                acc += f" ± {100 * r['test_accuracy_std']:.2f}"
            if r["runs"] > 1 or r["runs_done"] < r["runs"]:
                acc += f" ({r['runs_done']} of {plural(r['runs'], 'run')})"
        cells = [
            r["variant"],
            r["change"],
            params,
            acc,
            _num(r["test_loss_mean"]),
            _num(r["epochs"], ".0f"),
            _num(r["seconds_mean"], ".0f"),
            _pct(r["reported"]),
            "; ".join(r["readings"]),
        ]
        if ablation.mode == "full":
            cells.insert(6, _num(r["epochs_spent"], ".1f"))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


_CSV_FIELDS = (
    "variant",
    "change",
    "runs",
    "runs_done",
    "lr",
    "weight_decay",
    "test_accuracy_mean",
    "test_accuracy_std",
    "test_loss_mean",
    "epochs",
    "epochs_spent",
    "seconds_mean",
    "reported",
    "status",
    "readings",
    "run_names",
)


def table_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=_CSV_FIELDS, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for r in rows:
        writer.writerow(
            {**r, "readings": "; ".join(r["readings"]), "run_names": " ".join(r["run_names"])}
        )
    return buf.getvalue()


def write_table(rows: list[dict[str, Any]], markdown: str, folder: Path) -> list[Path]:
    """ablation.md, ablation.csv and ablation.json in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / "ablation.md"
    md.write_text(markdown)
    table = folder / "ablation.csv"
    table.write_text(table_csv(rows))
    js = folder / "ablation.json"
    js.write_text(json.dumps(rows, indent=2))
    return [md, table, js]
