"""The user's own network and data: ``module:callable`` references.

A model callable takes ``(num_classes, in_channels, image_size)`` and returns an
``nn.Module``. A dataset callable takes no arguments, or ``(data_dir, seed)``, and returns
a :class:`~babysit.data.Splits` or a mapping ``{"classes": [...], "train": (x, y),
"val": (x, y), "test": (x, y)}`` of uint8 image tensors (N, C, H, W) and integer labels.
The spec stores the reference, so a worker on another machine imports the same thing.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from babysit.data import DataError
from babysit.data import DataRequest
from babysit.data import Splits
from babysit.errors import UsageError


def resolve(ref: str, what: str) -> Callable[..., Any]:
    """Import ``module:callable`` from the working directory or the installed packages."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{what} '{ref}' is not of the form module:callable")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise UsageError(
            f"cannot import {what} module '{module_name}' ({err}); run from the folder that "
            "holds it, or install it into this environment"
        ) from None
    except Exception as err:  # noqa: BLE001 - the user's module failed at import time
        raise UsageError(f"importing {what} module '{module_name}' failed: "
                         f"{type(err).__name__}: {err}") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UsageError(f"{what} module '{module_name}' has no attribute '{attr}'")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"{what} '{ref}' is not callable")
    return target


def _accepts(fn: Callable[..., Any], n: int) -> bool:
    try:
        inspect.signature(fn).bind(*range(n))
    except TypeError:
        return False
    except ValueError:
        return True  # builtins without a signature: let the call decide
    return True


def build_user_model(ref: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    fn = resolve(ref, "model")
    if not _accepts(fn, 3):
        raise UsageError(f"model '{ref}' must accept (num_classes, in_channels, image_size)")
    model = fn(num_classes, in_channels, image_size)
    if not isinstance(model, nn.Module):
        raise UsageError(f"model '{ref}' returned {type(model).__name__}, not a torch nn.Module")
    check_model_output(model, ref, num_classes, in_channels, image_size)
    return model


def check_model_output(model: nn.Module, ref: str, num_classes: int, in_channels: int,
                       image_size: int) -> None:
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
        raise UsageError(f"model '{ref}' outputs {shape} for 2 images; expected (2, "
                         f"{num_classes}): one logit per class")


def _as_uint8(x: Any, where: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype != torch.uint8:
        raise DataError(f"{where}: images must be uint8 (N, C, H, W), got {t.dtype}")
    return t


def load_user_dataset(ref: str, request: DataRequest) -> Splits:
    fn = resolve(ref, "dataset")
    if _accepts(fn, 2):
        result = fn(request.data_dir, request.seed)
    elif _accepts(fn, 0):
        result = fn()
    else:
        raise UsageError(f"dataset '{ref}' must take no arguments or (data_dir, seed)")
    if isinstance(result, Splits):
        return result
    if isinstance(result, Mapping) and {"classes", "train", "val", "test"} <= set(result):
        parts = {}
        for part in ("train", "val", "test"):
            pair = result[part]
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise DataError(f"dataset '{ref}': '{part}' must be a pair (images, labels)")
            parts[f"{part}_x"] = _as_uint8(pair[0], f"dataset '{ref}' {part}")
            parts[f"{part}_y"] = torch.as_tensor(pair[1]).long()
        return Splits(classes=[str(c) for c in result["classes"]], **parts)
    raise UsageError(f"dataset '{ref}' returned {type(result).__name__}; return babysit's "
                     "Splits or {'classes', 'train', 'val', 'test'} with (images, labels) pairs")
