"""The process's memory habits: glibc's allocator tuned for training, trials' memory handed
back, and the long-lived heap kept out of the garbage collector's way.

Measured on the project's 2-core VM (docs/benchmarks.md, "Fixed costs per trial"):

- **No mmap for large blocks.** glibc serves every block above its mmap threshold (at most
  32 MiB) with a fresh ``mmap`` and unmaps it on free. A training step of the AlexNet
  allocates its gradients (the 4096x4096 layer's alone is 64 MiB) and the backward pass's
  temporaries anew, so each step mapped and faulted in ~100 MB of zeroed pages: at batch 16
  on 25x25 faces a third of the step was the kernel's page faults. With mmap off, freed
  blocks stay in the heap and the next step reuses them: 0.66x the step time, ~50 MB more
  resident. The heap is trimmed after each trial (:func:`release`), and a high trim
  threshold stops glibc from giving the heap's top back and faulting it in again
  mid-epoch.
- **A frozen heap.** ``gc.collect()`` after each trial frees the trial's network (held in
  reference cycles, see :func:`release`); scanning the million objects that importing
  torch, Optuna and SQLAlchemy created cost 0.2-0.3 s per trial. :func:`frozen_heap` moves
  what exists when the run starts into the collector's permanent generation.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 1 << 30  # 1 GiB: released by release()'s malloc_trim, not mid-epoch

_libc: ctypes.CDLL | None | bool = False  # False: not looked up yet; None: not glibc


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is False:
        _libc = None
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL("libc.so.6")
                lib.mallopt  # noqa: B018 - glibc (musl has no mallopt)
                _libc = lib
            except (OSError, AttributeError):
                pass
    return _libc if isinstance(_libc, ctypes.CDLL) else None


def tune_for_training() -> None:
    """Serve large blocks from the heap instead of fresh mmaps (see the module's text)."""
    lib = _glibc()
    if lib is not None:
        lib.mallopt(_M_MMAP_MAX, 0)
        lib.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep every object alive on entry (modules, the loaded data) out of the collections
    inside; on exit they are ordinary objects again (a test process runs many runs)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def release() -> None:
    """Hand the freed model and optimiser memory of a finished trial back to the system.

    Each trial allocates and frees a few hundred MB (an AlexNet with its optimiser state);
    glibc keeps freed blocks for reuse, so without a trim the resident size ratchets up
    trial after trial.

    The collection first: a trial's network is held in a reference cycle (the diagnostics'
    forward hooks point at the Monitor, which points back at the layers), and a pruned
    trial's traceback holds its frames, so without it each finished trial's weights and
    optimiser state (~280 MB for the digits AlexNet with Adam) stayed resident until
    Python's next full collection, and the default run peaked at 2.57 GB in the coarse
    stage (docs/benchmarks.md, issue 16).
    """
    gc.collect()
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)
