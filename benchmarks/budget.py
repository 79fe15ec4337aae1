"""Does `babysit run --budget T` end within T? Wall time against T, per dataset.

    python benchmarks/budget.py                                  # digits and faces at 2m and 6m
    python benchmarks/budget.py --datasets digits --budgets 2m   # one run

Each run is the real CLI in a subprocess in a fresh temporary folder with its own SQLite
file (`--optimizer adam`, the default spec otherwise). Wall time is the child's, from its
start to its exit (the final's verdict and the closing lines included), measured here;
the plan, the final's epochs and the time babysit counted as used (from the budget's start
to the last trial's end) come from its summary JSON. The load average before each run is
printed too: on a shared machine it moves the epoch cost the plan is made from.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(dataset: str, budget: str, extra: list[str]) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "babysit", "run", "--dataset", dataset, "--optimizer",
             "adam", "--budget", budget, "--storage", f"sqlite:///{tmp}/b.db", "--quiet",
             "--summary-json", str(summary), *extra],
            cwd=tmp, env=env, capture_output=True, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        row: dict[str, object] = {
            "dataset": dataset,
            "budget": budget,
            "rc": proc.returncode,
            "wall_s": round(wall, 1),
            "load_before": round(load, 1),
        }
        if summary.exists():
            s = json.loads(summary.read_text())
            b = s.get("budget") or {}
            row.update(
                budget_s=b.get("budget_s"),
                used_s=round(b["used_s"], 1) if b.get("used_s") is not None else None,
                epoch_s=b.get("epoch_s"),
                plan=b.get("plan"),
                final_epochs=b.get("final_epochs"),
                test_accuracy=(s["stages"]["final"] or {}).get("test_accuracy"),
                trials={k: s["stages"][k]["trials"] for k in ("coarse", "fine")},
            )
            if b.get("budget_s"):
                row["wall_over_budget"] = round(wall / b["budget_s"], 3)
        if proc.returncode != 0:
            row["error"] = proc.stderr.strip().splitlines()[-1:]
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits,faces")
    parser.add_argument("--budgets", default="2m,6m")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    extra = [x for kv in args.sets for x in ("--set", kv)]
    for dataset in args.datasets.split(","):
        for budget in args.budgets.split(","):
            row = one(dataset, budget, extra)
            print(json.dumps(row), flush=True)
            print(
                f"{dataset:8} budget {budget:>5}: wall {row['wall_s']} s "
                f"({row.get('wall_over_budget', '-')} x T), used {row.get('used_s', '-')} s, "
                f"test accuracy {row.get('test_accuracy', '-')}, rc {row['rc']}, "
                f"load {row['load_before']}",
                file=sys.stderr,
                flush=True,
            )


if __name__ == "__main__":
    main()
