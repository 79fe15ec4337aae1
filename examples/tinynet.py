"""A user's own network, as babysit takes it: ``--model tinynet:build``.

babysit calls ``build(num_classes, in_channels, image_size)`` once per trial and expects an
``nn.Module`` that maps a (N, in_channels, image_size, image_size) float batch to
(N, num_classes) logits. Anything importable works the same way: ``mypkg.nets:build``.
"""

from __future__ import annotations

from torch import nn


class TinyNet(nn.Module):
    """Three conv blocks and a linear head; small enough to search on a laptop CPU."""

    def __init__(self, num_classes: int, in_channels: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
            # A 2x2 map whatever the image size: any data.patch_size works, and the head
            # still sees where in the image a feature was.
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(2 * width * 4, num_classes)
        # A small last layer: the untrained network predicts ~uniformly, so babysit's sanity
        # check sees a loss near ln(num_classes).
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.head(self.features(x).flatten(1))


def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return TinyNet(num_classes, in_channels)
