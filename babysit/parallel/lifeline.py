"""Helper processes that cannot outlive the process that started them."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when its parent dies.

    Why prctl(PR_SET_PDEATHSIG) rather than the child polling its parent's pid: the kernel
    delivers it even when the parent is SIGKILLed, at once, and the `babysit worker` code
    stays unaware of it (a worker started by hand has no parent to watch). SIGTERM, not
    SIGKILL, so that the helper marks its running trial FAIL on the way out, as on Ctrl-C,
    instead of leaving it RUNNING until its heartbeat goes stale.

    libc is loaded here, in the parent: the function runs between fork and exec, where
    loading a library could deadlock on a lock another thread of the parent held at fork.
    Linux only; elsewhere None (no preexec_fn, helpers may outlive a killed parent).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            # The parent died between fork and prctl: the signal will never come.
            os.kill(os.getpid(), sig)

    return preexec
