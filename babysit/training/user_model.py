"""The user's own network, ``module:callable`` taking ``(num_classes, in_channels,
image_size)``: built, and its output shape checked on two blank images, so a
network that cannot train is an input error before any trial.
"""

from __future__ import annotations

import torch
from torch import nn

from babysit.errors import UsageError
from babysit.refs import _accepts
from babysit.refs import resolve


def build_user_model(ref: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    fn = resolve(ref, "model")
    if not _accepts(fn, 3):
        raise UsageError(f"model '{ref}' must accept (num_classes, in_channels, image_size)")
    try:
        model = fn(num_classes, in_channels, image_size)
    except UsageError:
        raise
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the user's builder failed
        raise UsageError(
            f"model '{ref}' failed to build for ({num_classes}, {in_channels}, "
            f"{image_size}): {type(err).__name__}: {err}"
        ) from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"model '{ref}' returned {type(model).__name__}, not a torch nn.Module")
    check_model_output(model, ref, num_classes, in_channels, image_size)
    if not any(p.requires_grad for p in model.parameters()):
        # Without one, sanity misreads it (the L2 penalty adds nothing) and the optimiser
        # raises "empty parameter list" once --force lets the run go on.
        raise UsageError(
            f"model '{ref}' has no trainable parameters (none with "
            "requires_grad=True), so there is nothing to train; give it at least "
            "one layer with weights"
        )
    return model


def check_model_output(
    model: nn.Module, ref: str, num_classes: int, in_channels: int, image_size: int
) -> None:
    """One forward pass on two blank images: the output must be (2, num_classes)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, in_channels, image_size, image_size))
    except Exception as err:  # noqa: BLE001 - any failure here is the user's model
        raise UsageError(
            f"model '{ref}' fails on a (2, {in_channels}, {image_size}, {image_size}) batch: "
            f"{type(err).__name__}: {err}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        count = (
            f"; the network returns {shape[1]} outputs but the data has {num_classes} "
            "classes: size its last layer with the num_classes babysit passes"
            if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == 2
            else ""
        )
        raise UsageError(
            f"model '{ref}' outputs {shape} for 2 images; expected (2, "
            f"{num_classes}): one logit per class{count}"
        )
