"""The final on 2 processes (DistributedDataParallel) against 1, seed by seed: test accuracy.

    python benchmarks/ddp_vs_one.py --seeds 0 1 2 --epochs 6 --device cpu   # gloo, 2 ranks
    python benchmarks/ddp_vs_one.py --seeds 0 1 2 --epochs 6 --procs 4 --device cuda

For each seed and process count: a fresh SQLite file and run, then babysit's own final
stage (``babysit.stages.final.stage.final`` with fixed parameters, as
benchmarks/final_ddp.py runs it) on the default AlexNet unless ``--set`` says otherwise,
patience off so both train the same epochs. Printed per seed:

  1 proc / N procs   the test accuracy of the best epoch's weights
  best epoch         the epoch validation chose, for each
  diff               N procs minus 1 proc, in points

and the mean over the seeds. The issue's target: the means within a point.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(procs: int, seed: int, args: argparse.Namespace) -> dict[str, float]:
    import optuna

    from babysit.protocol.prepare import prepare
    from babysit.spec import build_spec
    from babysit.stages.final.launch import launch_final
    from babysit.stages.final.stage import final
    from babysit.storage import open_storage

    name = f"ddp{procs}s{seed}"
    sets = [
        f"name={name}",
        f"seed={seed}",
        f"final.epochs={args.epochs}",
        "final.patience=0",
        *args.set,
    ]
    spec = build_spec(None, sets, {"dataset": args.dataset})
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'b.db'}"
        storage = open_storage(url, str(Path(tmp) / "artifacts"))
        ctx = prepare(
            spec,
            storage,
            device=args.device,
            data_dir=args.data_dir,
            quiet=True,
            final_procs=procs,
        )
        ctx = dataclasses.replace(ctx, log=lambda _m: None)  # the Context is frozen
        result = final(
            ctx, params={"lr": args.lr, "weight_decay": args.weight_decay}, launch=launch_final
        )
        if result.status != "passed":
            raise SystemExit(f"{procs} processes, seed {seed}: {result.status}: {result.verdict}")
        trial = optuna.load_study(study_name=f"{name}/final", storage=url).best_trial
        return {
            "test": float(trial.user_attrs["test_accuracy"]),
            "best": int(trial.user_attrs["best_epoch"]),
            "batch": ctx.batch_size,
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    import torch

    print(
        f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC {platform.node()} "
        f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
        f"torch {torch.__version__}, device {args.device}"
    )
    print(f"# python benchmarks/ddp_vs_one.py {' '.join(sys.argv[1:])}")
    n = args.procs
    print(f"| seed | 1 proc | {n} procs | diff (points) | best epoch 1 / {n} |")
    print("|---:|---:|---:|---:|---:|")
    ones, manys = [], []
    for seed in args.seeds:
        a = one(1, seed, args)
        b = one(n, seed, args)
        ones.append(a["test"])
        manys.append(b["test"])
        print(
            f"| {seed} | {a['test']:.4f} | {b['test']:.4f} | "
            f"{100 * (b['test'] - a['test']):+.1f} | {a['best']} / {b['best']} |",
            flush=True,
        )
    m1, mn = sum(ones) / len(ones), sum(manys) / len(manys)
    print(f"| mean | {m1:.4f} | {mn:.4f} | {100 * (mn - m1):+.1f} | |")


if __name__ == "__main__":
    main()
