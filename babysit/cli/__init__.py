"""The command line: ``babysit <verb>``. No torch at import: every verb's module is
imported when the verb runs, so `babysit status` answers without loading torch."""

from __future__ import annotations

from babysit.cli.main import main

__all__ = ["main"]
