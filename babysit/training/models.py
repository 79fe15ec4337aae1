"""The AlexNet family: the babysitting report's 32x32 network and the ablation lab's knobs.

``build_model`` resolves the spec's ``model`` (``alexnet`` or ``module:callable``) so the
built-in network is just one entry, and a user's own ``nn.Module`` goes through the same
protocol.
"""

from __future__ import annotations

import math
from typing import Any
from typing import Literal

import torch
from torch import nn

from babysit.errors import UsageError
from babysit.spec.rules import ACTIVATIONS
from babysit.spec.rules import BATCH_NORMS
from babysit.spec.rules import CONV_LAYERS
from babysit.spec.rules import FC_LAYERS
from babysit.spec.rules import GEOMETRIES
from babysit.spec.rules import INITS
from babysit.spec.rules import MODELS
from babysit.spec.rules import either

# Channels of the five convs. The babysitting report (3x3 convs on 32x32) used torchvision's plan:
# 64, 192, 384, 256, 256. The ablation lab (227x227) used the paper's: 96, 256, 384, 384, 256 -- its
# 4-conv variant "changed the output channels of the fourth Conv2d layer from 384 to 256".
_CHANNELS = {
    "cifar32": (64, 192, 384, 256, 256),
    "alexnet227": (96, 256, 384, 384, 256),
}
# LeakyReLU's slope for negative inputs: PyTorch's default (the ablation lab names no other).
_LEAKY_SLOPE = 0.01
# The smallest side alexnet227 takes: three 3x3/2 pools after an 11x11/4 conv need 63 px.
_MIN_SIDE_227 = 63
# The largest logit spread (std across classes) babysit's own untrained network may have on
# the user's data. The last layer's fixed N(0, 0.01) gave std 0.02-0.06 on the 8x8 digits
# but 0.2-0.8 on the LFW faces (seeds 0-4) and up to 1.3 on photos, where the initial loss
# drifted 0.1-0.6 nats above ln C and sanity failed on healthy data. A spread s costs about
# s^2/2 nats over ln C, so 0.05 keeps the initial loss within 0.002 nats of ln C on any data;
# it is not smaller because every gradient below the head passes through its weights, and
# 0.05 is where the digits network already started (its benchmarks stay as measured).
HEAD_LOGIT_STD = 0.05
# Examples measured for that scale: one batch; 64 x C logits pin a std within a few %.
_CALIBRATION_EXAMPLES = 64
# The knobs' allowed values: the spec's choices (babysit/spec/rules.py), checked again here
# for AlexNet built directly.
_KNOBS: dict[str, tuple[Any, ...]] = {
    "conv_layers": CONV_LAYERS,
    "fc_layers": FC_LAYERS,
    "activation": ACTIVATIONS,
    "batch_norm": BATCH_NORMS,
    "init": INITS,
    "geometry": GEOMETRIES,
}


def _activation(name: str) -> nn.Module:
    if name == "leaky_relu":
        return nn.LeakyReLU(_LEAKY_SLOPE, inplace=True)
    return nn.ReLU(inplace=True)


def _conv_plan(conv_layers: int, geometry: str) -> list[int]:
    # The ablation lab: with 4 convs the last conv outputs 256 (the fifth is gone); with 3 convs the
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
        for knob, value in (
            ("conv_layers", conv_layers),
            ("fc_layers", fc_layers),
            ("activation", activation),
            ("batch_norm", batch_norm),
            ("init", init),
            ("geometry", geometry),
        ):
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
        # The babysitting report flattens 256x2x2 at 32x32 inputs; the ablation lab flattens 256x6x6 at 227x227.
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
        nonlinearity: Literal["leaky_relu", "relu"] = (
            "leaky_relu" if activation == "leaky_relu" else "relu"
        )
        # kaiming_normal_'s gain for leaky_relu reads the slope from `a` (default 0).
        slope = _LEAKY_SLOPE if activation == "leaky_relu" else 0.0
        last = self.classifier[-1]
        assert isinstance(last, nn.Linear)  # __init__ ends the head with the class layer
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not last:
                nn.init.kaiming_normal_(
                    m.weight, a=slope, mode="fan_in", nonlinearity=nonlinearity
                )
                if m.bias is not None:  # every layer here is built with one
                    nn.init.zeros_(m.bias)
        # The last layer stays small (AlexNet's N(0, 0.01)) so the initial loss is ~ln C.
        nn.init.normal_(last.weight, std=0.01)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.pool(x)
        return self.classifier(torch.flatten(x, 1))


def logit_spread(logits: torch.Tensor, loss: str = "ce") -> float:
    """How far the logits are from "no opinion": their std across the classes, averaged
    (as a variance) over the batch; a shift shared by all classes changes no softmax, so it
    does not count. One-hot BCE reads each logit on its own, so there it is their root mean
    square around 0."""
    z = logits.detach().double()
    if loss == "bce":
        return float(z.pow(2).mean().sqrt())
    if z.shape[1] < 2:
        return 0.0
    return float(z.var(dim=1).mean().sqrt())


@torch.no_grad()
def calibrate_head(
    model: AlexNet, x: torch.Tensor, loss: str = "ce", target: float = HEAD_LOGIT_STD
) -> float:
    """Scale babysit's own network's last layer down until its logits on ``x`` (a
    preprocessed batch of the user's training images) spread no more than ``target``.

    Why a measured scale and not a fixed init: the spread of the untrained logits is the
    spread of the last hidden layer's activations times that of the weights, and the
    activations follow the data's scale (8x8 digits vs photos). Scaling W and b together
    scales every logit by the same factor, so one forward pass fixes it exactly. Why not
    zero weights: the gradient reaching every layer below the head is W^T dL/dz, zero
    until the head has moved. The spread is read with BatchNorm both on batch statistics
    (training) and on its initial running statistics (evaluation, what sanity sees); the
    larger counts. Running statistics are restored, so the model is as built.
    Returns the factor applied (1.0 when the head was already small enough)."""
    head = model.classifier[-1]
    assert isinstance(head, nn.Linear)  # AlexNet's head ends with the class layer
    x = x[:_CALIBRATION_EXAMPLES]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    was_training = model.training
    model.eval()
    spreads = [logit_spread(model(x), loss)]
    if norms:
        for m in norms:
            m.train()
        spreads.append(logit_spread(model(x), loss))
        for m, state in zip(norms, saved, strict=True):
            m.load_state_dict(state)
    model.train(was_training)
    spread = max(spreads)
    if not math.isfinite(spread) or spread <= target:
        return 1.0
    factor = target / spread
    head.weight.mul_(factor)
    if head.bias is not None:
        head.bias.mul_(factor)
    return factor


def fit_head_to_data(model: nn.Module, name: str, data: Any, loss: str = "ce") -> None:
    """:func:`calibrate_head` on the first training images of ``data`` (a DeviceData or
    StreamingData), for babysit's own ``alexnet`` only: a user's network is the user's to
    initialise, and sanity reports what it finds instead of changing it."""
    if name != "alexnet" or not isinstance(model, AlexNet):
        return
    x, _ = data.head(min(_CALIBRATION_EXAMPLES, data.train_size))
    calibrate_head(model, data.pre(x, train=False), loss)


def _check_geometry(model: Any, image_size: int) -> None:
    if model.geometry == "alexnet227" and image_size < _MIN_SIDE_227:
        raise UsageError(
            f"model.geometry alexnet227 needs inputs of at least {_MIN_SIDE_227} px, got "
            f"{image_size}; set data.resize=227 (or 0 for automatic) or use cifar32"
        )


def build_model(model: Any, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The spec's ``model`` table built: ``alexnet`` with its knobs, or the user's
    ``module:callable`` named by ``model.name``."""
    name = model.name
    if name == "alexnet":
        _check_geometry(model, image_size)
        return AlexNet(
            num_classes,
            in_channels=in_channels,
            conv_layers=model.conv_layers,
            fc_layers=model.fc_layers,
            fc_width=model.fc_width,
            activation=model.activation,
            batch_norm=model.batch_norm,
            dropout=model.dropout,
            init=model.init,
            geometry=model.geometry,
        )
    if ":" in name:
        from babysit.training.user_model import build_user_model

        return build_user_model(name, num_classes, in_channels, image_size)
    raise UsageError(
        f"unknown model '{name}'; use {either(tuple(repr(m) for m in MODELS))} or module:callable"
    )


def check_model(
    model: Any, num_classes: int, in_channels: int, image_size: int, dropout_searched: bool
) -> None:
    """The spec's network checked before any trial: a user's is built once (it must import
    and give one logit per class) and, when dropout is searched, must have Dropout layers
    for the search to set. babysit's own AlexNet is not built (23M weights allocated and
    freed for nothing: ~90 MB more peak memory), only its geometry checked."""
    if model.name == "alexnet":
        _check_geometry(model, image_size)
        if dropout_searched and model.fc_layers == 1:
            raise UsageError(
                "coarse.dropout is set but the AlexNet with model.fc_layers=1 has no dropout "
                "(it drops before hidden FC layers only); use model.fc_layers=2 or 3, or "
                "remove coarse.dropout"
            )
        return
    net = build_model(model, num_classes, in_channels, image_size)
    if dropout_searched and not dropout_layers(net):
        raise UsageError(
            f"coarse.dropout is set but model '{model.name}' has no Dropout layers for it to "
            "set; add nn.Dropout where the network should drop units, or remove coarse.dropout"
        )


def dropout_layers(net: nn.Module) -> list[nn.modules.dropout._DropoutNd]:
    """The network's dropout layers (nn.Dropout, Dropout1d/2d/3d, AlphaDropout, ...)."""
    return [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def set_dropout(net: nn.Module, p: float) -> None:
    """A user's network with every dropout layer's p set to ``p`` (the searched value)."""
    for layer in dropout_layers(net):
        layer.p = p


def input_size(model: Any, image_size: int, resize: int) -> int:
    """The side the network sees: the ablation lab's geometry needs 227x227 inputs."""
    if resize:
        return resize
    if model.name == "alexnet" and model.geometry == "alexnet227":
        return 227
    return image_size
