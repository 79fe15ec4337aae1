"""babysit's batched augmentation vs seed 003's torchvision transforms, on the CPU.

Seed 003 augmented CIFAR-10 per image over PIL images:

    Compose([RandomHorizontalFlip(), RandomVerticalFlip(), ColorJitter(brightness=2),
             Resize((32, 32)), ToTensor(), Normalize(imagenet)])

and a DataLoader stacked the results. babysit does the same flips and brightness (plus a
padded random crop the seed did not have, so babysit does more work) on a whole uint8
batch at once. Both run here on the same random 32x32 RGB batch, in one process:

    .venv/bin/python benchmarks/augment_vs_torchvision.py [--sizes 128 1024] [--seconds 2]
        [--threads 1]

Prints a Markdown table (images per second both ways, and the ratio) and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from babysit.data.augment import IMAGENET_MEAN
from babysit.data.augment import IMAGENET_STD
from babysit.data.augment import Preprocess


def _seed_transform() -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.RandomHorizontalFlip(),
            transforms.RandomVerticalFlip(),
            transforms.ColorJitter(brightness=2),
            transforms.Resize((32, 32)),
            transforms.ToTensor(),
            transforms.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
        ]
    )


def _babysit_preprocess() -> Preprocess:
    return Preprocess(
        mean=torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
        std=torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
        hflip=True,
        vflip=True,
        brightness=2.0,
        crop_pad=4,
    )


def _rate(step: Callable[[], torch.Tensor], n: int, seconds: float) -> float:
    """Images per second: the median over repeats filling about ``seconds``."""
    step()  # warm-up: first-call allocations and lazy imports
    times: list[float] = []
    budget = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < budget and len(times) < 200):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return n / statistics.median(times)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--seconds", type=float, default=2.0, help="timing budget per cell")
    # One thread by default: the per-image PIL path runs on one core, and on a shared machine
    # a second busy core makes torch's thread pool stall rather than merely slow down.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's own)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    seed_tf = _seed_transform()
    pre = _babysit_preprocess()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in args.sizes:
        batch = torch.from_numpy(rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8))
        hwc = batch.permute(0, 2, 3, 1).numpy()
        pil = [Image.fromarray(img) for img in hwc]

        def babysit_step(batch: torch.Tensor = batch) -> torch.Tensor:
            return pre(batch, train=True, generator=gen)

        def seed_step(pil: list[Image.Image] = pil) -> torch.Tensor:
            return torch.stack([seed_tf(img) for img in pil])

        def seed_step_fromarray(hwc: np.ndarray = hwc) -> torch.Tensor:
            # What torchvision's CIFAR10.__getitem__ adds: an array -> PIL per image.
            return torch.stack([seed_tf(Image.fromarray(img)) for img in hwc])

        ours = _rate(babysit_step, n, args.seconds)
        theirs = _rate(seed_step, n, args.seconds)
        theirs_full = _rate(seed_step_fromarray, n, args.seconds)
        rows.append((n, ours, theirs, theirs_full))

    print(
        "| batch | babysit (img/s) | torchvision over PIL (img/s) | ratio "
        "| torchvision incl. Image.fromarray (img/s) | ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for n, ours, theirs, full in rows:
        print(
            f"| {n} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.1f}x "
            f"| {full:,.0f} | {ours / full:.1f}x |"
        )
    print()
    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"- CPU: {_cpu_name()}, os.cpu_count() = {os.cpu_count()}, "
        f"torch threads = {torch.get_num_threads()}"
    )
    print(
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"Python {platform.python_version()}"
    )
    print(
        "- babysit: hflip, vflip, brightness 2, crop_pad 4, ImageNet normalisation, one "
        "uint8 batch; torchvision: seed 003's Compose per PIL image, then torch.stack"
    )


if __name__ == "__main__":
    main()
