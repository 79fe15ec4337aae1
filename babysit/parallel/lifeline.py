"""Processes that cannot outlive the process that started them.

One mechanism, prctl(PR_SET_PDEATHSIG): the kernel signals the child when its parent dies,
even when the parent is SIGKILLed, at once, and the child's code stays unaware of it.
:func:`die_with_parent` is the ``preexec_fn`` of a child babysit starts itself (a `--jobs`
helper); :func:`die_with_parent_now` is for a process another launcher started (a rank of
the final, started by torch's elastic agent), which asks for it as its first act.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, or None off Linux or without it. Loaded in the parent: between fork and
    exec, loading a library could deadlock on a lock another thread of the parent held."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when its parent dies.

    SIGTERM, not SIGKILL, so that a helper marks its running trial FAIL on the way out, as
    on Ctrl-C, instead of leaving it RUNNING until its heartbeat goes stale (a worker
    started by hand has no parent to watch). Linux only; elsewhere None (no preexec_fn,
    helpers may outlive a killed parent).
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            # The parent died between fork and prctl: the signal will never come.
            os.kill(os.getpid(), sig)

    return preexec


def die_with_parent_now(sig: int = signal.SIGKILL) -> None:
    """This process goes when its parent goes: a rank of the final with its launcher, even
    killed outright (SIGKILL runs no handler), so no orphan keeps a GPU or a stale trial
    busy. Exits at once when the parent is already gone."""
    prctl = _prctl()
    if prctl is None:
        return
    parent = os.getppid()
    prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent or parent == 1:  # the launcher died before prctl took effect
        os._exit(1)
