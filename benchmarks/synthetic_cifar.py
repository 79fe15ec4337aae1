"""A CIFAR-shaped synthetic set for benchmarks: 32x32 RGB, 10 classes, a few thousand
images, learnable but not trivially (``--dataset synthetic_cifar:load`` with
``benchmarks/`` on PYTHONPATH).

Each class is a fixed random low-frequency colour pattern; every image is its class's
pattern, shifted by up to 4 pixels, scaled in brightness, over per-pixel noise, so a
convolutional network has to learn shift-tolerant features, as on CIFAR. Same seed, same
images; no files, no download.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from babysit.data import Splits

CLASSES = 10
PER_CLASS = {"train": 300, "val": 60, "test": 60}


def _split(patterns: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    y = torch.arange(CLASSES).repeat_interleave(n)
    x = patterns[y]
    shifts = torch.randint(-4, 5, (len(y), 2), generator=g)
    x = torch.stack(
        [
            torch.roll(img, (int(a), int(b)), dims=(1, 2))
            for img, (a, b) in zip(x, shifts, strict=True)
        ]
    )
    x = x * (0.6 + 0.8 * torch.rand(len(y), 1, 1, 1, generator=g))
    x = x + 0.35 * torch.randn(x.shape, generator=g)
    img = ((x.clamp(-1.5, 1.5) + 1.5) / 3 * 255).round().to(torch.uint8)
    order = torch.randperm(len(y), generator=g)
    return img[order], y[order]


def load(data_dir: object = None, seed: int = 0) -> Splits:
    g = torch.Generator().manual_seed(1234)  # the set is fixed; the run's seed is not used
    coarse = torch.randn(CLASSES, 3, 4, 4, generator=g)
    patterns = F.interpolate(coarse, size=(32, 32), mode="bicubic", align_corners=False)
    parts = {k: _split(patterns, n, g) for k, n in PER_CLASS.items()}
    return Splits(
        [f"c{i}" for i in range(CLASSES)],
        *parts["train"],
        *parts["val"],
        *parts["test"],
        info={"synthetic": True},
    )
