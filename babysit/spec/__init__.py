"""The spec: every knob with its default and the reason for it (fields.py), the rules
that check each value and the lists of choices (rules.py), TOML and ``--set`` parsing
(parse.py). The face below is what the rest of the package imports."""

from __future__ import annotations

from babysit.spec.fields import CoarseSpec
from babysit.spec.fields import DataSpec
from babysit.spec.fields import FinalSpec
from babysit.spec.fields import ModelSpec
from babysit.spec.fields import NarrowSpec
from babysit.spec.fields import OverfitSpec
from babysit.spec.fields import SanitySpec
from babysit.spec.fields import SearchSpec
from babysit.spec.fields import Spec
from babysit.spec.fields import all_keys
from babysit.spec.fields import build_spec
from babysit.spec.fields import overfit_lrs
from babysit.spec.fields import validate
from babysit.spec.parse import load_toml
from babysit.spec.rules import NAME_MAX
from babysit.spec.rules import check_run_name
from babysit.spec.rules import default_run_name

__all__ = [
    "NAME_MAX",
    "CoarseSpec",
    "DataSpec",
    "FinalSpec",
    "ModelSpec",
    "NarrowSpec",
    "OverfitSpec",
    "SanitySpec",
    "SearchSpec",
    "Spec",
    "all_keys",
    "build_spec",
    "check_run_name",
    "default_run_name",
    "load_toml",
    "overfit_lrs",
    "validate",
]
