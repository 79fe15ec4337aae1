"""The peer a user would pick instead of babysit: a plain Optuna study, written the way
someone who knows Optuna would write it, with the same model (seed 003's AlexNet), the
same data splits as seed_protocol.py, data kept as tensors (no per-image PIL), Adam,
TPE over log-uniform lr and weight decay, Hyperband pruning on validation accuracy, a
search budget in epochs, then a final training with the best parameters and a test.

The model is seed 003's AlexNet for 32x32 inputs, verbatim in shape. The splits are a
70/15/15 permutation with seed 0. Compare babysit's default run with this script given
the same number of epochs (search epochs = babysit's epochs_spent - 20, final 20):
test accuracy and wall time, one after the other on the same machine.
With --timeout T it gets a wall-clock budget instead: the search is
`study.optimize(timeout=0.7 T)` and the final trains epoch after epoch until T is spent.
usage: python optuna_peer.py --dataset digits|faces --search-epochs 49 --final-epochs 20 --json out.json
`--dataset cifar-shaped` reads benchmarks/synthetic_cifar.py's set (the same images babysit
is given as `synthetic_cifar:load`); `--seed` seeds the sampler and the weights.
"""

import argparse
import json
import time

import numpy as np
import optuna
import torch
import torch.nn.functional as F
from torch import nn


class AlexNet(nn.Module):  # the report's model, verbatim in shape
    def __init__(self, no_output):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(64, 192, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(256 * 2 * 2, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, no_output),
        )

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), 256 * 2 * 2)
        return self.classifier(x)


def tensors(name):
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        imgs, labels = (d.images / 16.0).astype(np.float32), d.target
    elif name == "cifar-shaped":
        from synthetic_cifar import load  # beside this script

        s = load()
        imgs = torch.cat([s.train_x, s.val_x, s.test_x]).float().numpy() / 255.0
        labels = torch.cat([s.train_y, s.val_y, s.test_y]).numpy()
    else:
        from skimage.data import lfw_subset

        imgs, labels = lfw_subset().astype(np.float32), np.array([1] * 100 + [0] * 100)
    order = np.random.default_rng(0).permutation(len(imgs))  # the same splits as seed_protocol.py
    n = len(imgs)
    a, b = int(0.7 * n), int(0.85 * n)
    x = torch.tensor(imgs)
    if x.dim() == 3:  # greyscale: three equal channels
        x = x[:, None].repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    y = torch.tensor(labels, dtype=torch.long)
    tr, va, te = order[:a], order[a:b], order[b:]
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te]), int(labels.max()) + 1


def accuracy(model, split):
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(split[0][i : i + 256]) for i in range(0, len(split[0]), 256)])
    return (out.argmax(1) == split[1]).float().mean().item()


def train(split, classes, lr, wd, epochs, counter, trial=None, val=None, deadline=None):
    torch.manual_seed(0)
    model = AlexNet(classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    x, y = split
    acc = 0.0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i : i + 128]
            xb = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, x[idx].flip(3), x[idx])
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        counter["epochs"] += 1
        if deadline is not None and time.perf_counter() >= deadline:
            if val is not None:
                acc = accuracy(model, val)
            break
        if val is not None:
            acc = accuracy(model, val)
            if trial is not None:
                trial.report(acc, epoch)
                if not np.isfinite(loss.item()) or trial.should_prune():
                    raise optuna.TrialPruned()
    return model, acc


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="digits")
    p.add_argument("--search-epochs", type=int, default=49)
    p.add_argument("--trial-epochs", type=int, default=5)
    p.add_argument("--final-epochs", type=int, default=20)
    p.add_argument("--timeout", type=float, help="wall-clock budget in seconds for search + final")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(a.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    train_s, val_s, test_s, classes = tensors(a.dataset)
    counter = {"epochs": 0}
    t0 = time.perf_counter()
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=a.seed),
        pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=a.trial_epochs),
    )

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
        wd = trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
        return train(train_s, classes, lr, wd, a.trial_epochs, counter, trial, val_s)[1]

    def budget(study, trial):
        if counter["epochs"] >= a.search_epochs:
            study.stop()

    if a.timeout:
        study.optimize(objective, n_trials=1000, timeout=0.7 * a.timeout)
    else:
        study.optimize(objective, n_trials=1000, callbacks=[budget])
    best = study.best_params
    if a.timeout:
        model, val_acc = train(
            train_s,
            classes,
            best["lr"],
            best["weight_decay"],
            10_000,
            counter,
            val=val_s,
            deadline=t0 + a.timeout,
        )
    else:
        model, val_acc = train(
            train_s, classes, best["lr"], best["weight_decay"], a.final_epochs, counter, val=val_s
        )
    out = {
        "protocol": "optuna-peer",
        "dataset": a.dataset,
        "wall_seconds": time.perf_counter() - t0,
        "epochs_spent": counter["epochs"],
        "trials": len(study.trials),
        "best": best,
        "val_accuracy": val_acc,
        "test_accuracy": accuracy(model, test_s),
    }
    print(json.dumps(out))
    if a.json:
        json.dump(out, open(a.json, "w"))


if __name__ == "__main__":
    main()
