"""babysit: the babysitting protocol for an image classifier, on Optuna storage."""

from __future__ import annotations

from babysit.errors import BabysitError
from babysit.errors import ProtocolError
from babysit.errors import UsageError
from babysit.spec import Spec

__version__ = "0.1.0"

__all__ = ["BabysitError", "ProtocolError", "Spec", "UsageError", "__version__"]
