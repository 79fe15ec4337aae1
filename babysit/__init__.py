"""babysit: the babysitting protocol for an image classifier, on Optuna storage."""

from __future__ import annotations

from babysit.errors import BabysitError
from babysit.errors import ProtocolError
from babysit.errors import UsageError
from babysit.spec import Spec

__version__ = "0.1.0"

__all__ = [
    "BabysitError",
    "ProtocolError",
    "Spec",
    "UsageError",
    "__version__",
    "load_model",
    "load_run",
    "run",
]


def __getattr__(name: str) -> object:
    # The Python API pulls in torch and optuna; `import babysit` (and so every CLI verb)
    # stays light until babysit.run or babysit.load_run is first touched.
    if name in ("run", "load_run", "Run"):
        from babysit import api

        return getattr(api, name)
    if name == "load_model":  # a finished run's model.pt, rebuilt into its classifier
        from babysit.stages.final.model import load_model

        return load_model
    raise AttributeError(f"module 'babysit' has no attribute {name!r}")
