"""When a stage goes wrong (issue 20): a matrix of small runs, and the coarse divergence share.

    python benchmarks/recovery_matrix.py matrix [--seeds 0-7] [--datasets digits,faces]
    python benchmarks/recovery_matrix.py share  [--seeds 0,1,2] [--datasets digits,faces]

`matrix` runs the budget of the multi-worker test that once failed in CI (6 coarse trials of
2 epochs, 3 fine trials of 1, a 6-epoch final, the small 3-conv AlexNet) two ways: with
that test's coarse lr range [1e-3, 1e-2], and with the default (anchored, probed) ranges;
per run it reports the exit code, the final's test accuracy, how many coarse trials
diverged, whether a stage recovered, and whether any fine trial was drawn above the lowest
lr at which a coarse trial of the fine weight_decay range diverged (in brackets: at
which any coarse trial diverged).

`share` runs the default coarse stage (12 trials, 3 epochs, the default AlexNet; fine and
final cut to one trial and one epoch, which do not change coarse) and reports the share of
coarse trials that diverged per dataset, with the probes that moved the range.

Each run is the real CLI in a subprocess with its own SQLite file, two at a time, one
thread each.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

CHEAP = [
    "model.fc_width=64",
    "model.conv_layers=3",
    "model.fc_layers=1",
    "overfit.lrs={adam=[1e-3]}",
    "overfit.steps=60",
]
FAILED_CI_BUDGET = [
    *CHEAP,
    "coarse.extend=false",
    'coarse.pruner="none"',
    'fine.pruner="none"',
    "fine.epochs=1",
    "coarse.trials=6",
    "coarse.epochs=2",
    "fine.trials=3",
    "final.epochs=6",
]
BUDGETS = {
    "ci-range": [*FAILED_CI_BUDGET, "coarse.lr=[1e-3, 1e-2]"],
    "default-ranges": FAILED_CI_BUDGET,
}
SHARE = ["fine.trials=1", "fine.epochs=1", "final.epochs=1"]


def _seeds(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def _run(dataset: str, seed: int, sets: list[str], tmp: Path) -> dict:
    name = f"{dataset}-{seed}"
    url = f"sqlite:///{tmp / (name + '.db')}"
    cmd = [sys.executable, "-m", "babysit", "run", "--dataset", dataset, "--name", name]
    cmd += ["--seed", str(seed), "--storage", url, "--device", "cpu", "--quiet"]
    cmd += ["--summary-json", str(tmp / (name + ".json"))]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp, timeout=1800)
    wall = time.perf_counter() - t0
    out = {"dataset": dataset, "seed": seed, "exit": proc.returncode, "wall": wall}
    if proc.returncode not in (0, 1):
        out["error"] = proc.stderr[-600:]
        return out
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    coarse = optuna.load_study(study_name=f"{name}/coarse", storage=url)
    trials = [t for t in coarse.trials if t.state.name in ("COMPLETE", "PRUNED")]
    diverged = [t for t in trials if t.user_attrs.get("reason") == "diverged"]
    out["coarse_trials"] = len(trials)
    out["coarse_diverged"] = len(diverged)
    out["probe"] = coarse.user_attrs.get("lr_probe")
    out["ranges"] = coarse.user_attrs.get("ranges")
    lowest = min((t.params["lr"] for t in diverged), default=None)
    region = None
    try:
        fine = optuna.load_study(study_name=f"{name}/fine", storage=url)
        fine_lrs = [t.params["lr"] for t in fine.trials if "lr" in t.params]
        out["fine_recovered"] = bool(fine.user_attrs.get("recovery"))
        out["fine_diverged"] = sum(t.user_attrs.get("reason") == "diverged" for t in fine.trials)
        narrowed = fine.user_attrs.get("narrowed") or {}
        if narrowed:
            wd_lo, wd_hi = narrowed["ranges"]["weight_decay"]
            region = min(
                (t.params["lr"] for t in diverged if wd_lo <= t.params["weight_decay"] <= wd_hi),
                default=None,
            )
            out["fine_range"] = narrowed["ranges"]
    except KeyError:
        fine_lrs = []
    # The criterion: no fine trial above the lowest lr that diverged in coarse among the
    # trials of the fine weight_decay range (the good region); and, for information, above
    # the lowest that diverged anywhere.
    out["fine_above_region_diverged"] = sum(region is not None and lr > region for lr in fine_lrs)
    out["fine_above_lowest_diverged"] = sum(lowest is not None and lr > lowest for lr in fine_lrs)
    summary_file = tmp / (name + ".json")
    if summary_file.exists():
        s = json.loads(summary_file.read_text())
        out["test_accuracy"] = s["stages"]["final"].get("test_accuracy")
        out["coarse_recovered"] = bool(s["stages"]["coarse"].get("recovery"))
    else:
        out["verdict"] = proc.stderr.strip().splitlines()[-1:] or [""]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("matrix", "share"))
    ap.add_argument("--seeds", default=None)
    ap.add_argument("--datasets", default="digits,faces")
    ap.add_argument("--parallel", type=int, default=2)
    args = ap.parse_args()
    seeds = _seeds(args.seeds or ("0-7" if args.mode == "matrix" else "0,1,2"))
    datasets = args.datasets.split(",")
    budgets = BUDGETS if args.mode == "matrix" else {"defaults": SHARE}
    print(
        f"# {args.mode}: {platform.node()}, {os.cpu_count()} cores, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        flush=True,
    )
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as d:
        jobs = {}
        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            for budget, sets in budgets.items():
                for dataset in datasets:
                    for seed in seeds:
                        tmp = Path(d) / budget
                        tmp.mkdir(exist_ok=True)
                        jobs[pool.submit(_run, dataset, seed, sets, tmp)] = budget
            for fut in concurrent.futures.as_completed(jobs):
                r = fut.result()
                results.setdefault(jobs[fut], []).append(r)
                print(json.dumps({"budget": jobs[fut], **r}, default=str), flush=True)
    print()
    for budget, rows in results.items():
        for dataset in datasets:
            mine = [r for r in rows if r["dataset"] == dataset]
            ok = sum(r["exit"] == 0 for r in mine)
            accs = [r["test_accuracy"] for r in mine if r.get("test_accuracy") is not None]
            div = sum(r.get("coarse_diverged", 0) for r in mine)
            tot = sum(r.get("coarse_trials", 0) for r in mine)
            above = sum(r.get("fine_above_region_diverged", 0) for r in mine)
            anywhere = sum(r.get("fine_above_lowest_diverged", 0) for r in mine)
            rec = sum(bool(r.get("fine_recovered") or r.get("coarse_recovered")) for r in mine)
            print(
                f"| {budget} | {dataset} | {len(mine)} | {ok} | "
                f"{min(accs):.3f} / {sum(accs) / max(1, len(accs)):.3f} | "
                f"{div}/{tot} = {div / max(1, tot):.0%} | {above} ({anywhere}) | {rec} |"
                if accs
                else f"| {budget} | {dataset} | {len(mine)} | {ok} | - | {div}/{tot} | {above} ({anywhere}) | {rec} |"
            )


if __name__ == "__main__":
    main()
