"""The user's own network and data: ``module:callable`` references.

A model callable takes ``(num_classes, in_channels, image_size)`` and returns an
``nn.Module``. A dataset callable takes no arguments, or ``(data_dir, seed)``, and returns
a :class:`~babysit.data.Splits` or a mapping ``{"classes": [...], "train": ..., "val": ...,
"test": ...}`` whose parts are either ``(images, labels)`` pairs of uint8 tensors
(N, C, H, W) and integer labels (the fast path: the splits live on the device), or torch
``Dataset``s of ``(image, label)`` items for data too large to preload (streamed by a
DataLoader, see :mod:`babysit.data.streaming`). The mapping may also carry
``"stream": True`` (tensors through the DataLoader path) and ``"num_workers": N``.
Without ``"classes"`` the labels 0..C-1 are the classes (a note on stderr says so).

The spec stores the reference, so a worker on another machine imports the same thing.
Python objects handed to :func:`babysit.run` are stored as ``python:<qualname>``: they
live only in the process that made them, and a worker elsewhere says so and stops.
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
from torch.utils.data import Dataset

from babysit.data.core import DataError
from babysit.data.core import DataRequest
from babysit.data.core import Splits
from babysit.data.streaming import DatasetSplits
from babysit.errors import INTERRUPTED
from babysit.errors import UsageError

PYTHON_PREFIX = "python:"

# Python objects given to babysit.run() in this process, by the description stored in
# the spec: the only place a "python:" reference can be resolved.
_IN_PROCESS: dict[str, Callable[..., Any]] = {}


def register_object(obj: Callable[..., Any], what: str) -> str:
    """The reference to store for a Python callable: ``module:qualname`` when importing it
    gives back this very object (so workers elsewhere can rebuild it), else ``python:...``
    resolvable only in this process."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    if module and module != "__main__" and "<" not in qualname:
        ref = f"{module}:{qualname}"
        try:
            if resolve(ref, what) is obj:
                return ref
        except UsageError:
            pass
    return hold(f"{PYTHON_PREFIX}{module or '?'}.{qualname}", obj)


def hold(ref: str, obj: Callable[..., Any]) -> str:
    """Make the ``python:`` reference ``ref`` resolve to ``obj`` in this process."""
    if not ref.startswith(PYTHON_PREFIX):
        raise ValueError(f"in-process references start with {PYTHON_PREFIX!r}: {ref!r}")
    _IN_PROCESS[ref] = obj
    return ref


def resolve(ref: str, what: str) -> Callable[..., Any]:
    """Import ``module:callable`` from the working directory or the installed packages."""
    if ref.startswith(PYTHON_PREFIX):
        if ref in _IN_PROCESS:
            return _IN_PROCESS[ref]
        raise UsageError(
            f"this run's {what} '{ref}' was a Python object given to babysit.run() in another "
            f"process and cannot be rebuilt here; give babysit.run() an importable "
            f"'module:callable' {what} so that workers can import it"
        )
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{what} '{ref}' is not of the form module:callable")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name != err.name and not module_name.startswith(f"{err.name}."):
            raise UsageError(
                f"{what} module '{module_name}' imports '{err.name}', which is not installed "
                f"here; install it into this environment ({sys.prefix})"
            ) from None
        raise UsageError(
            f"cannot import {what} module '{module_name}' ({err}) in {cwd}; run from the "
            f"folder that holds {module_name.split('.')[0]}, add that folder to PYTHONPATH, "
            "or install it into this environment"
        ) from None
    except (Exception, SystemExit, KeyboardInterrupt) as err:  # noqa: BLE001 - user's import
        if isinstance(err, KeyboardInterrupt) and INTERRUPTED.is_set():
            raise  # a real Ctrl-C during the import: stop as an interrupt, not a bad input
        if isinstance(err, SystemExit):
            # sys.exit() at import time would end babysit with the module's exit status (0
            # for sys.exit(0)), as if the run had succeeded.
            reason = f"it called sys.exit({err.code!r}) while being imported"
        else:
            reason = type(err).__name__ + (f": {_one_line(err)}" if str(err).strip() else "")
        raise UsageError(
            f"importing {what} module '{module_name}' failed: {reason}; "
            "fix the module so that importing it only defines things"
        ) from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UsageError(f"{what} module '{module_name}' has no attribute '{attr}'")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"{what} '{ref}' is not callable")
    return target


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (a multi-line message would read as several)."""
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


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


def _as_uint8(x: Any, where: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype != torch.uint8:
        raise DataError(f"{where}: images must be uint8 (N, C, H, W), got {t.dtype}")
    return t


def _call_loader(fn: Callable[..., Any], ref: str, request: DataRequest) -> Any:
    if _accepts(fn, 2):
        args: tuple[Any, ...] = (request.data_dir, request.seed)
    elif _accepts(fn, 0):
        args = ()
    else:
        raise UsageError(f"dataset '{ref}' must take no arguments or (data_dir, seed)")
    try:
        return fn(*args)
    except UsageError:
        raise
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the user's loader failed
        raise UsageError(
            f"dataset '{ref}' failed while loading: {type(err).__name__}: {err}"
        ) from None


def load_user_dataset(ref: str, request: DataRequest) -> Splits | DatasetSplits:
    result = _call_loader(resolve(ref, "dataset"), ref, request)
    if isinstance(result, (Splits, DatasetSplits)):
        return result
    if isinstance(result, Mapping) and {"train", "val", "test"} <= set(result):
        return _from_mapping(ref, result)
    raise UsageError(
        f"dataset '{ref}' returned {type(result).__name__}; return babysit's "
        "Splits or {'classes', 'train', 'val', 'test'} with (images, labels) "
        "pairs or torch Datasets"
    )


def as_splits(ref: str, result: Any) -> Splits | DatasetSplits:
    """A Splits or mapping handed over directly (babysit.run(data=...)), as load would."""
    if isinstance(result, (Splits, DatasetSplits)):
        return result
    if isinstance(result, Mapping) and {"train", "val", "test"} <= set(result):
        return _from_mapping(ref, result)
    raise UsageError(
        f"data {type(result).__name__} is not a dataset; give a name, "
        "'module:callable', a callable, babysit's Splits or {'classes', "
        "'train', 'val', 'test'}"
    )


def _from_mapping(ref: str, result: Mapping[str, Any]) -> Splits | DatasetSplits:
    if "classes" in result:
        classes = [str(c) for c in result["classes"]]
    else:
        classes = _infer_classes(ref, result)
    workers = result.get("num_workers")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise DataError(f"dataset '{ref}': num_workers must be an int >= 0, got {workers!r}")
    parts = {part: result[part] for part in ("train", "val", "test")}
    if any(isinstance(p, Dataset) for p in parts.values()):
        from babysit.data.streaming import TensorItems

        datasets: dict[str, Dataset] = {}
        for part, value in parts.items():
            if isinstance(value, Dataset):
                datasets[part] = value
            else:
                x, y = _pair(ref, part, value)
                datasets[part] = TensorItems(x, y)
        return DatasetSplits(
            classes=classes,
            train=datasets["train"],
            val=datasets["val"],
            test=datasets["test"],
            num_workers=workers,
        )
    pairs = {part: _pair(ref, part, value) for part, value in parts.items()}
    splits = Splits(
        classes=classes,
        train_x=pairs["train"][0],
        train_y=pairs["train"][1],
        val_x=pairs["val"][0],
        val_y=pairs["val"][1],
        test_x=pairs["test"][0],
        test_y=pairs["test"][1],
    )
    if result.get("stream"):
        splits.check(ref)
        streamed = DatasetSplits.from_tensors(splits)
        streamed.num_workers = workers
        streamed.info["stream_forced"] = "the dataset's 'stream' key"
        return streamed
    return splits


def _infer_classes(ref: str, result: Mapping[str, Any]) -> list[str]:
    """No "classes" key: the labels are the classes, 0..C-1 with C one past the largest
    label of any split, named by their numbers; said on stderr, since a class that never
    occurs above the largest label seen would go unnoticed."""
    top = -1
    for part in ("train", "val", "test"):
        value = result[part]
        if isinstance(value, Dataset):
            named = getattr(value, "classes", None)
            targets = getattr(value, "targets", None)
            if named is not None:
                top = max(top, len(named) - 1)
                continue
            if targets is None:
                raise DataError(
                    f"dataset '{ref}': no 'classes' given and the {part} Dataset has no "
                    "'classes' or 'targets' to read them from; add 'classes': [names] to "
                    "the mapping"
                )
            labels = torch.as_tensor(targets)
        else:
            labels = _pair(ref, part, value)[1]
        if labels.numel():
            if int(labels.min()) < 0:
                raise DataError(
                    f"dataset '{ref}' {part}: labels must be 0..C-1, found {int(labels.min())}"
                )
            top = max(top, int(labels.max()))
    if top < 1:
        raise DataError(
            f"dataset '{ref}': no 'classes' given and the labels hold fewer "
            "than 2 classes; add 'classes': [names] to the mapping"
        )
    print(
        f"note: dataset '{ref}' gives no 'classes'; the labels define {top + 1} classes, "
        f"named 0..{top} (add 'classes': [names] to the mapping to name them)",
        file=sys.stderr,
    )
    return [str(i) for i in range(top + 1)]


def _pair(ref: str, part: str, value: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise DataError(
            f"dataset '{ref}': '{part}' must be a pair (images, labels) or a "
            f"torch Dataset, got {type(value).__name__}"
        )
    x = _as_uint8(value[0], f"dataset '{ref}' {part}")
    y = torch.as_tensor(value[1])
    if y.is_floating_point():
        raise DataError(f"dataset '{ref}' {part}: labels must be integers, got {y.dtype}")
    return x, y.long()
