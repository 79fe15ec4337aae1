"""What a whole protocol costs: wall time, peak memory, epochs spent, test accuracy.

    python benchmarks/protocol_budget.py default          # `babysit run` with no flags
    python benchmarks/protocol_budget.py faces            # --dataset faces --optimizer adam
    python benchmarks/protocol_budget.py seed --dataset digits [--optimizer sgd]
    python benchmarks/protocol_budget.py compare [--datasets digits,faces,cifar-shaped] [--seeds 0,1,2]

`seed` runs the seed reports' budgets (20 coarse trials x 5 epochs at lr 10^[-5, 5],
reg 10^[-6, -3]; 10 fine x 5; final 20: 170 epochs when every trial runs in full) three
ways in one process tree, on the same machine, one after the other:
  full      every trial runs all its epochs, NaN or not, no pruning (the seeds' way)
  diverge   divergence stopping only
  babysit   divergence stopping and the median pruner (the defaults)
and prints epochs spent per stage and the final test accuracy for each.

Each run is the real CLI in a subprocess in a fresh temporary folder with its own SQLite
file; peak memory is the child's maximum resident set size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEED_BUDGET = [
    "--set",
    "coarse.trials=20",
    "--set",
    "coarse.epochs=5",
    "--set",
    "coarse.lr=[1e-5, 1e5]",
    "--set",
    "coarse.weight_decay=[1e-6, 1e-3]",
    "--set",
    "fine.trials=10",
    "--set",
    "fine.epochs=5",
    "--set",
    "final.epochs=20",
]
FULL = [
    "--set",
    "coarse.diverge_factor=0",
    "--set",
    "fine.diverge_factor=0",
    "--set",
    'coarse.pruner="none"',
    "--set",
    'fine.pruner="none"',
    "--set",
    "coarse.extend=false",
    "--set",
    "coarse.lr_from_overfit=false",
]
# `compare`: the datasets of issue 16's done-when; the CIFAR-shaped one is synthetic
# (benchmarks/synthetic_cifar.py: 32x32 RGB, 10 classes, 3000 training images).
COMPARE = {
    "digits": ["--dataset", "digits"],
    "faces": ["--dataset", "faces"],
    "cifar-shaped": ["--dataset", "synthetic_cifar:load"],
}
DIVERGE_ONLY = ["--set", 'coarse.pruner="none"', "--set", 'fine.pruner="none"']


def _env() -> dict[str, str]:
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    return env


def run_cli(args: list[str]) -> dict:
    """One `babysit run` in a fresh folder: summary, wall seconds, peak RSS of the child."""
    with tempfile.TemporaryDirectory() as tmp:
        summary_path = Path(tmp) / "summary.json"
        cmd = [
            sys.executable,
            "-m",
            "babysit",
            "run",
            "--quiet",
            "--summary-json",
            str(summary_path),
            *args,
        ]
        t0 = time.perf_counter()
        # A fresh child per run, so RUSAGE_CHILDREN's maximum is this run's when it is the
        # largest so far; each run is measured in its own grandchild to keep them apart.
        probe = (
            "import resource, subprocess, sys;"
            "rc = subprocess.call(sys.argv[1:]);"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
            "sys.exit(rc)"
        )
        proc = subprocess.run(
            [sys.executable, "-c", probe, *cmd],
            cwd=tmp,
            capture_output=True,
            text=True,
            env=_env(),
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(
                f"babysit {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
            )
        peak_kb = int(proc.stdout.strip().splitlines()[-1])
        summary = json.loads(summary_path.read_text())
    return {"summary": summary, "wall": wall, "peak_mb": peak_kb / 1024}


def _machine() -> str:
    import torch

    return (
        f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or 'cpu'}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}"
    )


def _row(label: str, r: dict) -> str:
    s = r["summary"]
    final = s["stages"]["final"]
    by = s["epochs_by_stage"]
    return (
        f"| {label} | {r['wall']:.0f} | {r['peak_mb']:.0f} | {s['epochs_spent']:.1f} | "
        f"{by['overfit']:.1f} | {by['coarse']:.1f} | {by['fine']:.1f} | {by['final']:.1f} | "
        f"{s['stages']['coarse']['diverged']} | {s['stages']['coarse']['pruned']} | "
        f"{final['test_accuracy']:.4f} |"
    )


HEADER = (
    "| run | wall s | peak RSS MB | epochs spent | overfit | coarse | fine | final | "
    "coarse diverged | coarse pruned | test accuracy |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("default", "faces", "seed", "compare"))
    parser.add_argument(
        "--datasets",
        default=",".join(COMPARE),
        help="compare: which of digits, faces, cifar-shaped to run",
    )
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--seeds", default="0", help="compare: the run seeds, e.g. 0,1,2")
    args = parser.parse_args()
    print(_machine())
    print(HEADER)
    results = {}
    if args.what == "compare":
        compare(args.datasets.split(","), args.json, [int(x) for x in args.seeds.split(",")])
        return
    if args.what == "default":
        results["babysit run"] = run_cli([])
    elif args.what == "faces":
        results["babysit run --dataset faces --optimizer adam"] = run_cli(
            ["--dataset", "faces", "--optimizer", "adam"]
        )
    else:
        base = ["--dataset", args.dataset, "--optimizer", args.optimizer, *SEED_BUDGET]
        for label, extra in (
            ("full (seed's way)", FULL),
            ("divergence stopping", DIVERGE_ONLY),
            ("babysit (stopping + pruning)", []),
        ):
            results[label] = run_cli(base + extra)
            print(_row(label, results[label]), flush=True)
    if args.what != "seed":
        for label, r in results.items():
            print(_row(label, r))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def compare(names: list[str], out: Path | None, seeds: list[int]) -> None:
    """Issue 16's done-when: per dataset and seed, the seed-shaped budget run the seeds' way
    (every trial in full, no stopping, no pruning) and `babysit run` with its defaults, one
    after the other in this run; epochs, wall time, test accuracy and babysit's ratios, and
    their means over the seeds when there are several."""
    print("| dataset | seed | run | wall s | peak RSS MiB | epochs spent | test accuracy |")
    print("|---|---:|---|---:|---:|---:|---:|")
    results: dict[str, dict] = {}
    for name in COMPARE:
        if name not in names:
            print(f"| {name} | | (unmeasured in this run) | | | | |", flush=True)
            continue
        ratios = []
        for seed_value in seeds:
            base = COMPARE[name] + ["--seed", str(seed_value)]
            seed = run_cli(base + ["--optimizer", "adam", *SEED_BUDGET, *FULL])
            ours = run_cli(base)
            results[f"{name}/{seed_value}"] = {"seed": seed, "babysit": ours}
            for label, r in (("seed-shaped budget", seed), ("babysit run", ours)):
                s = r["summary"]
                print(
                    f"| {name} | {seed_value} | {label} | {r['wall']:.0f} | {r['peak_mb']:.0f} | "
                    f"{s['epochs_spent']:.1f} | {s['stages']['final']['test_accuracy']:.4f} |",
                    flush=True,
                )
            e = ours["summary"]["epochs_spent"] / seed["summary"]["epochs_spent"]
            w = ours["wall"] / seed["wall"]
            d = (
                ours["summary"]["stages"]["final"]["test_accuracy"]
                - seed["summary"]["stages"]["final"]["test_accuracy"]
            ) * 100
            ratios.append((w, e, d))
            print(
                f"| {name} | {seed_value} | babysit / seed | {w:.2f}x | | {e:.2f}x | "
                f"{d:+.1f} points |",
                flush=True,
            )
        if len(ratios) > 1:
            w, e, d = (sum(col) / len(col) for col in zip(*ratios, strict=True))
            print(
                f"| {name} | mean | babysit / seed | {w:.2f}x | | {e:.2f}x | {d:+.1f} points |",
                flush=True,
            )
    if out:
        out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
