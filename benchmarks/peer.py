"""babysit beside the plain Optuna study a user would write instead, at equal epochs.

    python benchmarks/peer.py [--datasets faces,digits] [--seeds 0,1,2] [--json out.json]

Per dataset and seed: `babysit run --dataset D --seed S` with its defaults, then
benchmarks/optuna_peer.py (seed 003's AlexNet, Adam, TPE over log-uniform lr and weight
decay, Hyperband pruning, data held as tensors) given the same epochs: search epochs =
babysit's epochs spent - 20, final 20, as its docstring asks. One after the other on the
same machine. Both wall times count from after imports and data loading (babysit's
summary `wall_seconds`, the peer's own clock); the process wall is printed beside them.

    python benchmarks/peer.py --budgets 2m,6m [--datasets digits,faces,cifar-shaped] [--seeds 0,1,2]

At equal wall time instead: per dataset, budget T and seed, `babysit run --budget T --seed S`
then the peer with `--timeout T --seed S` (its search gets 0.7 T through Optuna's
`timeout=`, its final epochs until T is spent). Both are timed as processes, start to exit,
which is what a user waits for; `cifar-shaped` is benchmarks/synthetic_cifar.py's set on
both sides (babysit its own 3000/600/600 split, the peer a 70/15/15 permutation of all
4200 images, as it splits the others).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from protocol_budget import COMPARE
from protocol_budget import run_cli

HERE = Path(__file__).resolve().parent
PEER_FINAL = 20


def run_peer(dataset: str, search_epochs: int, *extra: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                str(HERE / "optuna_peer.py"),
                "--dataset",
                dataset,
                "--search-epochs",
                str(search_epochs),
                "--final-epochs",
                str(PEER_FINAL),
                "--json",
                str(out),
                *extra,
            ],
            check=True,
            capture_output=True,
        )
        result = json.loads(out.read_text())
    result["process_wall"] = time.perf_counter() - t0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="faces,digits")
    parser.add_argument("--seeds", default="0")
    parser.add_argument(
        "--budgets", help="equal wall time: babysit --budget T, the peer --timeout T"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.budgets:
        equal_wall(args)
        return
    print(
        "| dataset | seed | run | wall s | process wall s | epochs | test accuracy |\n"
        "|---|---:|---|---:|---:|---:|---:|",
        flush=True,
    )
    rows = []
    for dataset in args.datasets.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            ours = run_cli(["--dataset", dataset, "--seed", str(seed)])
            s = ours["summary"]
            search = max(1, round(s["epochs_spent"] - PEER_FINAL))
            peer = run_peer(dataset, search)
            b_acc = s["stages"]["final"]["test_accuracy"]
            for label, wall, pwall, epochs, acc in (
                ("babysit", s["wall_seconds"], ours["wall"], s["epochs_spent"], b_acc),
                (
                    "optuna peer",
                    peer["wall_seconds"],
                    peer["process_wall"],
                    peer["epochs_spent"],
                    peer["test_accuracy"],
                ),
            ):
                print(
                    f"| {dataset} | {seed} | {label} | {wall:.1f} | {pwall:.1f} | "
                    f"{epochs:.1f} | {acc:.4f} |",
                    flush=True,
                )
            ratio = s["wall_seconds"] / peer["wall_seconds"]
            gap = (b_acc - peer["test_accuracy"]) * 100
            print(
                f"| {dataset} | {seed} | babysit / peer | {ratio:.2f}x | "
                f"{ours['wall'] / peer['process_wall']:.2f}x | | {gap:+.1f} points |",
                flush=True,
            )
            rows.append({"dataset": dataset, "seed": seed, "babysit": ours, "peer": peer})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def equal_wall(args: argparse.Namespace) -> None:
    """babysit --budget T beside the peer --timeout T, per dataset, budget and seed."""
    from babysit.spec.rules import parse_duration

    print(
        "| dataset | T | seed | babysit wall s | peer wall s | babysit / T | peer / T "
        "| babysit test | peer test | babysit - peer (points) |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        flush=True,
    )
    rows = []
    for dataset in args.datasets.split(","):
        for budget in args.budgets.split(","):
            t = parse_duration(budget)
            for seed in [int(s) for s in args.seeds.split(",")]:
                try:
                    ours = run_cli([*COMPARE[dataset], "--seed", str(seed), "--budget", budget])
                except SystemExit as refused:  # e.g. a budget below the least protocol
                    print(f"| {dataset} | {budget} | {seed} | {str(refused)[-300:]!r} |")
                    continue
                peer = run_peer(dataset, 0, "--timeout", str(t), "--seed", str(seed))
                b_acc = ours["summary"]["stages"]["final"]["test_accuracy"]
                p_acc = peer["test_accuracy"]
                print(
                    f"| {dataset} | {budget} | {seed} | {ours['wall']:.1f} | "
                    f"{peer['process_wall']:.1f} | {ours['wall'] / t:.2f} | "
                    f"{peer['process_wall'] / t:.2f} | {b_acc:.4f} | {p_acc:.4f} | "
                    f"{(b_acc - p_acc) * 100:+.1f} |",
                    flush=True,
                )
                rows.append(
                    {
                        "dataset": dataset,
                        "budget": budget,
                        "seed": seed,
                        "babysit": ours,
                        "peer": peer,
                    }
                )
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
