"""optuna-dashboard's notes (Markdown on a study or a trial) without its web app.

``import optuna_dashboard`` runs the package's ``__init__``, which imports its web app,
which imports ``optuna.importance``, which imports scikit-learn and SciPy: ~170 MB resident
in every training process that publishes a stage's note (docs/benchmarks.md, issue 16).
The note functions live in ``optuna_dashboard/_note.py``, which imports only Optuna, so
that one file is loaded from the installed package on its own. Where the package is
already imported (the dashboard's own process) its module is used as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_PACKAGE_MODULE = "optuna_dashboard._note"
_module: ModuleType | None = None


def _load() -> ModuleType:
    if _PACKAGE_MODULE in sys.modules:
        return sys.modules[_PACKAGE_MODULE]
    package = importlib.util.find_spec("optuna_dashboard")  # finds, does not import
    if package is not None and package.origin:
        path = Path(package.origin).parent / "_note.py"
        spec = importlib.util.spec_from_file_location("babysit._dashboard_note", path)
        if path.is_file() and spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    return importlib.import_module(_PACKAGE_MODULE)  # a layout we do not know: the package


def note_module() -> ModuleType:
    """optuna-dashboard's ``_note`` module: ``save_note``, ``get_note``, and the versioned
    system-attr helpers that `babysit copy` rewrites notes with."""
    global _module
    if _module is None:
        _module = _load()
    return _module


def save_note(study_or_trial: object, body: str) -> None:
    note_module().save_note(study_or_trial, body)


def get_note(study_or_trial: object) -> str:
    return str(note_module().get_note(study_or_trial))
