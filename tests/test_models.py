from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from babysit.models import AlexNet


@pytest.mark.parametrize("side", [8, 25, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_alexnet_accepts_sizes_and_channels(side: int, channels: int) -> None:
    model = AlexNet(10, in_channels=channels, fc_width=64)
    out = model(torch.randn(2, channels, side, side))
    assert out.shape == (2, 10)


def test_seed_geometry_flattens_256x2x2_at_32() -> None:
    model = AlexNet(10, fc_width=64)
    feats = model.features(torch.randn(1, 3, 32, 32))
    assert feats.shape == (1, 256, 2, 2)
    assert model.classifier[1].in_features == 256 * 2 * 2


def test_he_init_starts_near_chance() -> None:
    torch.manual_seed(0)
    model = AlexNet(10, in_channels=1, init="he").eval()
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    loss = F.cross_entropy(model(x), y).item()
    assert abs(loss - math.log(10)) < 0.1
