"""The knobs of issue 22 side by side on one dataset: LR schedules, AdamW, dropout.

    python benchmarks/knobs.py [--dataset digits] [--epochs 10] [--seeds 0] [--lr 1e-3]

Every configuration trains babysit's default AlexNet from the same seed at one fixed lr and
weight_decay (what the default run's searches choose on digits is ~1e-3 and ~1e-5) for
``--epochs`` epochs through babysit's own ``fit`` (the loop every trial runs), then reads
the best epoch's validation accuracy, the last epoch's, and the test accuracy after the
last epoch. One process, one configuration after another; wall seconds are printed too
but the figures to read are the accuracies (the machine is shared).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from babysit.protocol.prepare import prepare
from babysit.spec import build_spec
from babysit.stages.context import fresh_model
from babysit.stages.context import generator_for
from babysit.storage import open_storage
from babysit.training.step import evaluate
from babysit.training.step import fit
from babysit.training.step import make_optimizer

# (label, optimizer, schedule, dropout): the default first.
CONFIGS = [
    ("adam, no schedule, dropout 0.5 (defaults)", "adam", "none", 0.5),
    ("adam, cosine", "adam", "cosine", 0.5),
    ("adam, step", "adam", "step", 0.5),
    ("adamw, no schedule", "adamw", "none", 0.5),
    ("adam, dropout 0.0", "adam", "none", 0.0),
    ("adam, dropout 0.25", "adam", "none", 0.25),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-5)
    parser.add_argument("--only", default="", help="comma-separated config numbers (1-based)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    chosen = [int(i) for i in args.only.split(",") if i] or list(range(1, len(CONFIGS) + 1))
    with tempfile.TemporaryDirectory() as tmp:
        storage = open_storage(f"sqlite:///{tmp}/knobs.db")
        spec = build_spec(flags={"dataset": args.dataset, "name": "knobs"})
        ctx = prepare(spec, storage, device="cpu", quiet=True)
        print("| configuration | seed | best val | last val | test (last epoch) | wall s |")
        print("|---|---:|---:|---:|---:|---:|")
        for i in chosen:
            label, optimizer, schedule, dropout = CONFIGS[i - 1]
            for seed in (int(s) for s in args.seeds.split(",")):
                model = fresh_model(ctx, seed, dropout)
                opt = make_optimizer(
                    optimizer, model.parameters(), args.lr, args.weight_decay, 0.9
                )
                t0 = time.perf_counter()
                history = fit(
                    model,
                    opt,
                    ctx.data,
                    epochs=args.epochs,
                    batch_size=ctx.batch_size,
                    loss="ce",
                    generator=generator_for(ctx, seed),
                    schedule=schedule,
                )
                _, test = evaluate(model, ctx.data, "test", "ce")
                vals = [e.val_acc for e in history.epochs]
                print(
                    f"| {label} | {seed} | {max(vals):.4f} | {vals[-1]:.4f} | {test:.4f} | "
                    f"{time.perf_counter() - t0:.0f} |",
                    flush=True,
                )
                del model, opt


if __name__ == "__main__":
    main()
