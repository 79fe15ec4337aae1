"""The AlexNet family: seed 003's 32x32 network and seed 000's knobs.

``build_model`` resolves the spec's ``model`` (``alexnet`` or ``module:callable``) so the
built-in network is just one entry, and a user's own ``nn.Module`` goes through the same
protocol.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from babysit.errors import UsageError

# Channels of the five convs. Seed 003 (3x3 convs on 32x32) used torchvision's plan:
# 64, 192, 384, 256, 256. Seed 000 (227x227) used the paper's: 96, 256, 384, 384, 256 -- its
# 4-conv variant "changed the output channels of the fourth Conv2d layer from 384 to 256".
_CHANNELS = {
    "cifar32": (64, 192, 384, 256, 256),
    "alexnet227": (96, 256, 384, 384, 256),
}
# LeakyReLU's slope for negative inputs: PyTorch's default (seed 000 names no other).
_LEAKY_SLOPE = 0.01
# The smallest side alexnet227 takes: three 3x3/2 pools after an 11x11/4 conv need 63 px.
_MIN_SIDE_227 = 63
_KNOBS = {
    "conv_layers": (3, 4, 5),
    "fc_layers": (1, 2, 3),
    "activation": ("relu", "leaky_relu"),
    "batch_norm": ("none", "first2", "all"),
    "init": ("he", "default"),
    "geometry": ("cifar32", "alexnet227"),
}


def _activation(name: str) -> nn.Module:
    if name == "leaky_relu":
        return nn.LeakyReLU(_LEAKY_SLOPE, inplace=True)
    return nn.ReLU(inplace=True)


def _conv_plan(conv_layers: int, geometry: str) -> list[int]:
    # Seed 000: with 4 convs the last conv outputs 256 (the fifth is gone); with 3 convs the
    # network stops after the third (384 channels).
    plan = list(_CHANNELS[geometry][:conv_layers])
    if conv_layers == 4:
        plan[-1] = 256
    return plan


class AlexNet(nn.Module):
    """AlexNet sized by its input: 1 or 3 channels, 8x8 to 64x64 (cifar32) or 227x227."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        conv_layers: int = 5,
        fc_layers: int = 3,
        fc_width: int = 4096,
        activation: str = "relu",
        batch_norm: str = "none",
        dropout: float = 0.5,
        init: str = "default",
        geometry: str = "cifar32",
    ) -> None:
        super().__init__()
        for knob, value in (("conv_layers", conv_layers), ("fc_layers", fc_layers),
                            ("activation", activation), ("batch_norm", batch_norm),
                            ("init", init), ("geometry", geometry)):
            if value not in _KNOBS[knob]:
                raise ValueError(f"AlexNet {knob} must be one of {_KNOBS[knob]}, got {value!r}")
        plan = _conv_plan(conv_layers, geometry)
        layers: list[nn.Module] = []
        prev = in_channels
        for i, out in enumerate(plan):
            if geometry == "alexnet227":
                kernel, stride, pad = [(11, 4, 2), (5, 1, 2)][i] if i < 2 else (3, 1, 1)
            else:
                kernel, stride, pad = (3, 2, 1) if i == 0 else (3, 1, 1)
            layers.append(nn.Conv2d(prev, out, kernel_size=kernel, stride=stride, padding=pad))
            if batch_norm == "all" or (batch_norm == "first2" and i < 2):
                layers.append(nn.BatchNorm2d(out))
            layers.append(_activation(activation))
            # Pool after conv1, conv2 and the last conv, as in AlexNet. ceil_mode keeps a 1x1
            # map alive, so 8x8 inputs pass through all three pools.
            if i < 2 or i == len(plan) - 1:
                if geometry == "alexnet227":
                    layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
                else:
                    layers.append(nn.MaxPool2d(kernel_size=2, ceil_mode=True))
            prev = out
        self.features = nn.Sequential(*layers)
        # Seed 003 flattens 256x2x2 at 32x32 inputs; seed 000 flattens 256x6x6 at 227x227.
        side = 6 if geometry == "alexnet227" else 2
        self.pool = nn.AdaptiveAvgPool2d((side, side))
        flat = prev * side * side
        head: list[nn.Module] = []
        width_in = flat
        for _ in range(fc_layers - 1):
            if dropout > 0:
                head.append(nn.Dropout(dropout))
            head.append(nn.Linear(width_in, fc_width))
            head.append(_activation(activation))
            width_in = fc_width
        head.append(nn.Linear(width_in, num_classes))
        self.classifier = nn.Sequential(*head)
        if init == "he":
            self._he_init(activation)

    def _he_init(self, activation: str) -> None:
        nonlinearity = "leaky_relu" if activation == "leaky_relu" else "relu"
        # kaiming_normal_'s gain for leaky_relu reads the slope from `a` (default 0).
        slope = _LEAKY_SLOPE if activation == "leaky_relu" else 0.0
        last = self.classifier[-1]
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not last:
                nn.init.kaiming_normal_(m.weight, a=slope, mode="fan_in",
                                        nonlinearity=nonlinearity)
                nn.init.zeros_(m.bias)
        # The last layer stays small (AlexNet's N(0, 0.01)) so the initial loss is ~ln C.
        nn.init.normal_(last.weight, std=0.01)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.pool(x)
        return self.classifier(torch.flatten(x, 1))


def build_model(
    name: str, arch: Any, num_classes: int, in_channels: int, image_size: int
) -> nn.Module:
    """``alexnet`` with the spec's knobs, or a user's ``module:callable``."""
    if name == "alexnet":
        if arch.geometry == "alexnet227" and image_size < _MIN_SIDE_227:
            raise UsageError(
                f"model.geometry alexnet227 needs inputs of at least {_MIN_SIDE_227} px, got "
                f"{image_size}; set data.resize=227 (or 0 for automatic) or use cifar32")
        return AlexNet(
            num_classes,
            in_channels=in_channels,
            conv_layers=arch.conv_layers,
            fc_layers=arch.fc_layers,
            fc_width=arch.fc_width,
            activation=arch.activation,
            batch_norm=arch.batch_norm,
            dropout=arch.dropout,
            init=arch.init,
            geometry=arch.geometry,
        )
    if ":" in name:
        from babysit.plugins import build_user_model

        return build_user_model(name, num_classes, in_channels, image_size)
    raise UsageError(f"unknown model '{name}'; use 'alexnet' or module:callable")


def input_size(name: str, arch: Any, image_size: int, resize: int) -> int:
    """The side the network sees: seed 000's geometry needs 227x227 inputs."""
    if resize:
        return resize
    if name == "alexnet" and arch.geometry == "alexnet227":
        return 227
    return image_size
