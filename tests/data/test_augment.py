"""Batched augmentation and normalisation: each random choice checked sample by sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from babysit.data.augment import IMAGENET_MEAN
from babysit.data.augment import IMAGENET_STD
from babysit.data.augment import Preprocess
from babysit.data.augment import augment
from babysit.data.augment import build_preprocess
from babysit.data.augment import channel_stats
from babysit.data.augment import random_crop
from babysit.spec import DataSpec

N = 64


def _images(n: int = N, c: int = 3, size: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=gen, dtype=torch.uint8)


def _plain(c: int = 3, **kwargs: object) -> Preprocess:
    """No normalisation, so outputs stay in [0, 1] units and compare with the input."""
    return Preprocess(mean=torch.zeros(1, c, 1, 1), std=torch.ones(1, c, 1, 1), **kwargs)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_hflip_flips_each_sample_or_leaves_it() -> None:
    x = _images()
    out = _plain(hflip=True)(x, train=True, generator=_gen(1))
    ref = x.float() / 255
    flipped = [torch.equal(out[i], torch.flip(ref[i], dims=[-1])) for i in range(N)]
    kept = [torch.equal(out[i], ref[i]) for i in range(N)]
    # Random images are never symmetric: every sample is exactly one of the two.
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 16 <= sum(flipped) <= 48  # p = 0.5 each, per sample


def test_vflip_flips_each_sample_or_leaves_it() -> None:
    x = _images()
    out = _plain(vflip=True)(x, train=True, generator=_gen(2))
    ref = x.float() / 255
    flipped = [torch.equal(out[i], torch.flip(ref[i], dims=[-2])) for i in range(N)]
    kept = [torch.equal(out[i], ref[i]) for i in range(N)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 16 <= sum(flipped) <= 48


def test_both_flips_are_independent_per_sample() -> None:
    x = _images(n=256)
    out = _plain(hflip=True, vflip=True)(x, train=True, generator=_gen(3))
    ref = x.float() / 255
    seen = []
    for i in range(256):
        variants = [ref[i], ref[i].flip(-1), ref[i].flip(-2), ref[i].flip(-1).flip(-2)]
        matches = [v for v, img in enumerate(variants) if torch.equal(out[i], img)]
        assert len(matches) == 1
        seen.append(matches[0])
    counts = torch.bincount(torch.tensor(seen), minlength=4)
    assert (counts > 30).all()  # all four combinations occur, ~64 each


def test_brightness_factor_stays_in_range_per_sample() -> None:
    # A flat grey of 51/255 = 0.2 can be scaled up to 5x before clamping, so the output
    # reads back the factor directly.
    x = torch.full((512, 3, 4, 4), 51, dtype=torch.uint8)
    for b, lo, hi in ((2.0, 0.0, 3.0), (0.5, 0.5, 1.5)):
        out = _plain(brightness=b)(x, train=True, generator=_gen(4))
        factor = out / 0.2
        per_sample = factor.flatten(1)
        # One factor per sample, the same for every pixel and channel.
        assert torch.allclose(per_sample.min(1).values, per_sample.max(1).values, atol=1e-5)
        f = per_sample[:, 0]
        assert f.min() >= lo - 1e-5 and f.max() <= hi + 1e-5
        # Uniform over the range: both ends are reached closely with 512 samples.
        assert f.min() < lo + 0.05 * (hi - lo) and f.max() > hi - 0.05 * (hi - lo)


def test_brightness_output_is_clamped_to_unit_range() -> None:
    x = _images(n=256)
    out = _plain(brightness=2.0)(x, train=True, generator=_gen(5))
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (out == 1.0).any()  # factors up to 3 saturate bright pixels


def test_random_crop_equals_a_slice_of_the_padded_image() -> None:
    x = _images(n=128, size=10).float() / 255
    pad = 3
    out = random_crop(x, pad, _gen(6))
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = []
    for i in range(x.shape[0]):
        hits = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 10, dx : dx + 10])
        ]
        assert len(hits) == 1, f"sample {i}: {hits}"
        offsets.append(hits[0])
    assert out.shape == x.shape
    dys = {dy for dy, _ in offsets}
    dxs = {dx for _, dx in offsets}
    # Every offset 0..2*pad is reachable, including the corners.
    assert dys == dxs == set(range(2 * pad + 1))


def test_crop_through_preprocess_keeps_the_size() -> None:
    x = _images(size=16)
    out = _plain(crop_pad=4)(x, train=True, generator=_gen(7))
    assert out.shape == (N, 3, 16, 16)
    # Zero padding shows up as black borders in some samples.
    assert (out == 0).flatten(1).float().mean(1).max() > 0.1


def test_same_seed_same_output_other_seed_other_output() -> None:
    x = _images()
    pre = _plain(hflip=True, vflip=True, brightness=2.0, crop_pad=4)
    a = pre(x, train=True, generator=_gen(8))
    b = pre(x, train=True, generator=_gen(8))
    c = pre(x, train=True, generator=_gen(9))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(0)
    d = augment(x.float() / 255, pre)  # the global generator works too
    torch.manual_seed(0)
    e = augment(x.float() / 255, pre)
    assert torch.equal(d, e)


def test_eval_mode_never_augments() -> None:
    x = _images()
    pre = _plain(hflip=True, vflip=True, brightness=2.0, crop_pad=4)
    assert torch.equal(pre(x, train=False, generator=_gen(10)), x.float() / 255)


def test_dataset_normalisation_gives_zero_mean_unit_std() -> None:
    gen = _gen(11)
    # Channels with different means and spreads, like real photos.
    base = torch.tensor([60.0, 120.0, 200.0]).view(1, 3, 1, 1)
    spread = torch.tensor([10.0, 40.0, 20.0]).view(1, 3, 1, 1)
    x = (base + spread * torch.randn(200, 3, 8, 8, generator=gen)).clamp(0, 255).to(torch.uint8)
    pre = build_preprocess(x, DataSpec(normalize="dataset"))
    out = pre(x, train=False)
    per_channel = out.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-4)
    assert torch.allclose(per_channel.std(1), torch.ones(3), atol=1e-3)
    mean, std = channel_stats(x)
    assert torch.allclose(mean.flatten(), base.flatten() / 255, atol=0.01)
    assert torch.allclose(std.flatten(), spread.flatten() / 255, atol=0.01)


def test_imagenet_and_no_normalisation() -> None:
    x = _images()
    imagenet = build_preprocess(x, DataSpec(normalize="imagenet"))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(imagenet(x, train=False), (x.float() / 255 - mean) / std)
    none = build_preprocess(x, DataSpec(normalize="none"))
    assert torch.equal(none(x, train=False), x.float() / 255)
    grey = build_preprocess(_images(c=1), DataSpec(normalize="imagenet"))
    assert grey.mean.shape == (1, 1, 1, 1)
    assert grey(_images(c=1), train=False).shape == (N, 1, 12, 12)


def test_resize_to_227() -> None:
    x = _images(n=4, size=32)
    pre = build_preprocess(x, DataSpec(resize=227, hflip=True, crop_pad=4))
    for train in (True, False):
        assert pre(x, train=train, generator=_gen(12)).shape == (4, 3, 227, 227)
    # A flat image stays flat after the bilinear resize.
    flat = torch.full((2, 3, 32, 32), 77, dtype=torch.uint8)
    out = _plain(resize=227)(flat, train=False)
    assert torch.allclose(out, torch.full_like(out, 77 / 255), atol=1e-6)
