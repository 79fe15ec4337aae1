"""Epoch throughput: babysit's training loop against a loop written the seed's way.

    python benchmarks/epoch_throughput.py --device cpu --images 2048
    python benchmarks/epoch_throughput.py --device cuda --images 50000 --eval 10000

Both train the same network (the seed's AlexNet for 32x32, 10 classes) with the same
optimiser (SGD, momentum 0.9) and batch size on the same random CIFAR-sized images, in
the same process, one after the other:

  seed     torchvision DataLoader over a Dataset of PIL images with seed 003's transforms
           (RandomHorizontalFlip, RandomVerticalFlip, ColorJitter(brightness=2),
           Resize((32, 32)), ToTensor, Normalize(ImageNet)), batches copied to the device
  babysit  the split as one uint8 tensor on the device, batches as index slices of a
           device-side permutation, the same augmentation batched on the device,
           channels_last weights (CPU and CUDA); on CUDA bf16 autocast and cudnn.benchmark

Each side runs one warm-up epoch, then `--epochs` timed epochs (training plus evaluation
of `--eval` held-out images). Prints images/second both ways and the ratio.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset

from babysit.data import Splits
from babysit.data.augment import IMAGENET_MEAN
from babysit.data.augment import IMAGENET_STD
from babysit.data.augment import build_preprocess
from babysit.data.device import DeviceData
from babysit.spec import DataSpec
from babysit.training.models import AlexNet
from babysit.training.step import channels_last_pays
from babysit.training.step import configure_device
from babysit.training.step import evaluate
from babysit.training.step import fit
from babysit.training.step import make_optimizer


class _PILImages(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform) -> None:  # noqa: ANN001
        from PIL import Image

        self.images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in x]
        self.labels = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):  # noqa: ANN204
        return self.transform(self.images[i]), self.labels[i]


def _seed_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    train: DataLoader,
    test: DataLoader,
    device: torch.device,
) -> None:
    """The seed's loop: per-batch host-to-device copies, a loss read every step."""
    model.train()
    for xb, yb in train:
        xb, yb = xb.to(device), yb.to(device)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        loss.item()
    model.eval()
    with torch.no_grad():
        for xb, yb in test:
            model(xb.to(device)).argmax(1).eq(yb.to(device)).sum().item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (seed side)")
    args = parser.parse_args()

    from torchvision import transforms

    device = torch.device(args.device)
    configure_device(device)
    g = torch.Generator().manual_seed(0)
    n, m = args.images, args.eval
    x = torch.randint(0, 256, (n + m, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n + m,), generator=g)

    seed_tf = transforms.Compose(
        [
            transforms.RandomHorizontalFlip(),
            transforms.RandomVerticalFlip(),
            transforms.ColorJitter(brightness=2),
            transforms.Resize((32, 32)),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )
    test_tf = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]
    )
    pin = device.type == "cuda"
    train_dl = DataLoader(
        _PILImages(x[:n], y[:n], seed_tf),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=pin,
        persistent_workers=args.workers > 0,
    )
    test_dl = DataLoader(
        _PILImages(x[n:], y[n:], test_tf),
        batch_size=args.batch_size,
        num_workers=args.workers,
        pin_memory=pin,
        persistent_workers=args.workers > 0,
    )

    spec = DataSpec(hflip=True, vflip=True, brightness=2.0, normalize="imagenet")
    splits = Splits([str(i) for i in range(10)], x[:n], y[:n], x[n:], y[n:], x[n:], y[n:])
    data = DeviceData.from_splits(splits, build_preprocess(splits.train_x, spec), device)

    def seed_side() -> float:
        torch.manual_seed(0)
        model = AlexNet(10).to(device)
        opt = make_optimizer("sgd", model.parameters(), 0.01, 1e-4)
        _seed_epoch(model, opt, train_dl, test_dl, device)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.epochs):
            _seed_epoch(model, opt, train_dl, test_dl, device)
        _sync(device)
        return (time.perf_counter() - t0) / args.epochs

    def babysit_side(channels_last: bool = True) -> float:
        torch.manual_seed(0)
        model = AlexNet(10).to(device)
        if channels_last and channels_last_pays(device, "alexnet"):
            model = model.to(memory_format=torch.channels_last)
        opt = make_optimizer("sgd", model.parameters(), 0.01, 1e-4)
        gen = torch.Generator(device=device).manual_seed(0)
        check = 1 if device.type == "cpu" else 8
        fit(
            model,
            opt,
            data,
            epochs=1,
            batch_size=args.batch_size,
            loss="ce",
            generator=gen,
            check_every=check,
        )
        _sync(device)
        t0 = time.perf_counter()
        # fit validates on the val split every epoch; the test split is the same size.
        fit(
            model,
            opt,
            data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            loss="ce",
            generator=gen,
            check_every=check,
        )
        _sync(device)
        per_epoch = (time.perf_counter() - t0) / args.epochs
        evaluate(model, data, "test", "ce")
        return per_epoch

    seed_s = seed_side()
    plain_s = babysit_side(channels_last=False)
    ours_s = babysit_side()
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "cpu")
    )
    print(
        f"{datetime.date.today().isoformat()} {platform.node()} {name}, {os.cpu_count()} "
        f"cores, torch {torch.__version__}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"{n} training + {m} evaluation images per epoch, batch {args.batch_size}, "
        f"{args.epochs} timed epochs after one warm-up, DataLoader workers {args.workers}"
    )
    print("| loop | seconds / epoch | images / second |\n|---|---:|---:|")
    print(f"| seed (DataLoader + PIL transforms) | {seed_s:.3f} | {(n + m) / seed_s:,.0f} |")
    print(
        f"| babysit, NCHW weights (before issue 16) | {plain_s:.3f} | {(n + m) / plain_s:,.0f} |"
    )
    print(
        f"| babysit (device tensors, batched augmentation, channels-last) | {ours_s:.3f} | "
        f"{(n + m) / ours_s:,.0f} |"
    )
    print(f"ratio babysit / seed: {seed_s / ours_s:.2f}x (NCHW weights: {seed_s / plain_s:.2f}x)")


if __name__ == "__main__":
    main()
