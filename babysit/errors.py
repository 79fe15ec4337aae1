"""The two ways a run ends badly, each with its exit code (docs/usage.md, "Commands"; docs/design.md)."""

from __future__ import annotations

import threading

# Set by the SIGINT/SIGTERM handler. Python drops an exception raised inside a garbage
# collector callback, so a Ctrl-C that lands there would be lost; the training loop and
# the stage loops also check this flag.
INTERRUPTED = threading.Event()


def raise_if_interrupted() -> None:
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


class BabysitError(Exception):
    exit_code = 1


class UsageError(BabysitError):
    """The input was wrong: unknown dataset, missing data, bad storage URL, bad flag."""

    exit_code = 2


class ProtocolError(BabysitError):
    """A protocol check failed (sanity or overfit); the message is the diagnosis."""

    exit_code = 1
