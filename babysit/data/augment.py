"""Batched preprocessing on the training device: no PIL, no Python per image.

the babysitting report's torchvision pipeline (RandomHorizontalFlip, RandomVerticalFlip,
ColorJitter(brightness), Resize, ToTensor, Normalize) applied to a whole uint8 batch at
once, each sample drawing its own random choices from one seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The babysitting report normalised with ImageNet's statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    mean: torch.Tensor  # (1, C, 1, 1), in [0, 1] units
    std: torch.Tensor
    hflip: bool = False
    vflip: bool = False
    brightness: float = 0.0
    crop_pad: int = 0
    resize: int = 0

    @property
    def augments(self) -> bool:
        return self.hflip or self.vflip or self.brightness > 0 or self.crop_pad > 0

    def to(self, device: torch.device) -> Preprocess:
        self.mean = self.mean.to(device)
        self.std = self.std.to(device)
        return self

    def __call__(
        self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """uint8 (N, C, H, W) -> normalised float (N, C, S, S)."""
        out = x.float().div_(255.0)
        if train and self.augments:
            out = augment(out, self, generator)
        if self.resize and out.shape[-1] != self.resize:
            out = F.interpolate(
                out, size=(self.resize, self.resize), mode="bilinear", align_corners=False
            )
        return (out - self.mean) / self.std


def _rand(n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    # Draw on the generator's device, then move: a CUDA generator draws on the GPU.
    gdev = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gdev).to(device)


def augment(
    x: torch.Tensor, pre: Preprocess, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random flips, brightness and padded crop on a float batch in [0, 1]."""
    n = x.shape[0]
    dev = x.device
    if pre.hflip:
        flip = (_rand(n, dev, generator) < 0.5).view(n, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    if pre.vflip:
        flip = (_rand(n, dev, generator) < 0.5).view(n, 1, 1, 1)
        x = torch.where(flip, x.flip(-2), x)
    if pre.brightness > 0:
        # ColorJitter's brightness: factor uniform in [max(0, 1 - b), 1 + b], then clamp.
        lo = max(0.0, 1.0 - pre.brightness)
        hi = 1.0 + pre.brightness
        factor = lo + (hi - lo) * _rand(n, dev, generator)
        x = (x * factor.view(n, 1, 1, 1)).clamp_(0.0, 1.0)
    if pre.crop_pad > 0:
        x = random_crop(x, pre.crop_pad, generator)
    return x


def random_crop(
    x: torch.Tensor, pad: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad by ``pad`` then crop back to size at a random offset per sample.

    Done with one gather over precomputed index grids instead of a loop over samples.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    span = 2 * pad + 1
    dy = (_rand(n, dev, generator) * span).long().clamp_(max=2 * pad)
    dx = (_rand(n, dev, generator) * span).long().clamp_(max=2 * pad)
    rows = dy.view(n, 1) + torch.arange(h, device=dev).view(1, h)  # (n, h)
    cols = dx.view(n, 1) + torch.arange(w, device=dev).view(1, w)  # (n, w)
    wp = w + 2 * pad
    flat = padded.reshape(n, c, -1)
    index = (rows.view(n, h, 1) * wp + cols.view(n, 1, w)).view(n, 1, h * w).expand(n, c, h * w)
    return flat.gather(2, index).view(n, c, h, w)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of a uint8 split, in [0, 1] units."""
    c = x.shape[1]
    flat = x.transpose(0, 1).reshape(c, -1).float().div_(255.0)
    mean = flat.mean(dim=1)
    std = flat.std(dim=1).clamp_(min=1e-3)
    return mean.view(1, c, 1, 1), std.view(1, c, 1, 1)


def build_preprocess(train_x: torch.Tensor, data_spec) -> Preprocess:  # noqa: ANN001
    c = train_x.shape[1]
    if data_spec.normalize == "dataset":
        mean, std = channel_stats(train_x)
    elif data_spec.normalize == "imagenet":
        # Grey (or any non-RGB) images get the mean of ImageNet's three channels.
        mean = torch.tensor(IMAGENET_MEAN if c == 3 else [sum(IMAGENET_MEAN) / 3] * c)
        std = torch.tensor(IMAGENET_STD if c == 3 else [sum(IMAGENET_STD) / 3] * c)
        mean, std = mean.view(1, c, 1, 1), std.view(1, c, 1, 1)
    else:
        mean = torch.zeros(1, c, 1, 1)
        std = torch.ones(1, c, 1, 1)
    return Preprocess(
        mean=mean,
        std=std,
        hflip=data_spec.hflip,
        vflip=data_spec.vflip,
        brightness=data_spec.brightness,
        crop_pad=data_spec.crop_pad,
        resize=data_spec.resize,
    )
