"""The final training on 1, 2, 4 ... processes (`--final-procs`): time and test accuracy.

    python benchmarks/final_ddp.py --procs 1 2 4 --device cuda              # one GPU per rank
    python benchmarks/final_ddp.py --procs 1 2 4 --device cuda --dataset cifar10 --epochs 5
    python benchmarks/final_ddp.py --procs 1 2 --device cpu --epochs 4 --small   # gloo

For each process count: a fresh SQLite file and run, then babysit's own final stage
(``babysit.stages.final.stage.final`` with fixed parameters, as `babysit ablate` mode "final" runs
it), the same seed and spec each time, patience off so every count trains the same
epochs. Printed per count:

  wall s        the whole stage: launching the ranks, training, testing, writing the model
  train s       rank 0's training time (the trial's "seconds": no launch, no start-up)
  epochs/s      epochs / train s
  speedup       train s of 1 process / train s of N
  test acc      the test accuracy of the best epoch's weights

The global batch is the spec's at every count (split over the ranks), so the optimisation
is the same and the accuracies should agree within noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The tests' cheapest network (tests/conftest.py CHEAP) for a quick CPU figure.
SMALL = ["model.fc_width=64", "model.conv_layers=3", "model.fc_layers=1"]


def one(procs: int, args: argparse.Namespace) -> dict[str, float]:
    import optuna

    from babysit.protocol.prepare import prepare
    from babysit.spec import build_spec
    from babysit.stages.final.launch import launch_final
    from babysit.stages.final.stage import final
    from babysit.storage import open_storage

    sets = [
        f"name=ddp{procs}",
        f"final.epochs={args.epochs}",
        "final.patience=0",
        f"batch_size={args.batch}",
        *(SMALL if args.small else []),
        *args.set,
    ]
    spec = build_spec(None, sets, {"dataset": args.dataset})
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'b.db'}"
        storage = open_storage(url)
        ctx = prepare(
            spec,
            storage,
            device=args.device,
            data_dir=args.data_dir,
            quiet=True,
            final_procs=procs,
        )
        ctx = dataclasses.replace(ctx, log=lambda _m: None)  # the Context is frozen
        t0 = time.perf_counter()
        result = final(
            ctx, params={"lr": args.lr, "weight_decay": args.weight_decay}, launch=launch_final
        )
        wall = time.perf_counter() - t0
        if result.status != "passed":
            raise SystemExit(f"{procs} processes: final {result.status}: {result.verdict}")
        trial = optuna.load_study(study_name=f"ddp{procs}/final", storage=url).best_trial
        return {
            "wall": wall,
            "train": float(trial.user_attrs["seconds"]),
            "test": float(trial.user_attrs["test_accuracy"]),
            "epochs": int(trial.user_attrs["epochs_run"]),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--small", action="store_true", help="the tests' 3-conv, 64-wide network")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    import torch

    print(
        f"# {datetime.date.today()} {platform.node()} {platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, device {args.device}"
        + (
            f" ({torch.cuda.get_device_name()} x{torch.cuda.device_count()})"
            if args.device == "cuda"
            else ""
        )
    )
    print(f"# python benchmarks/final_ddp.py {' '.join(sys.argv[1:])}")
    print("| procs | wall s | train s | epochs/s | speedup | test acc |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = None
    for procs in args.procs:
        r = one(procs, args)
        base = base or r["train"]
        print(
            f"| {procs} | {r['wall']:.1f} | {r['train']:.1f} | {r['epochs'] / r['train']:.2f} "
            f"| {base / r['train']:.2f}x | {r['test']:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
