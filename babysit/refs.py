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
from typing import Any

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
