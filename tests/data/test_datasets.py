"""`babysit datasets` reports what a run stores, and each set of choices is listed once."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna
import pytest

from babysit.cli.parser import build_parser
from babysit.data import DataRequest
from babysit.data import describe_dataset
from babysit.data import load_dataset
from babysit.data import registered
from babysit.errors import UsageError
from babysit.spec import DataSpec
from babysit.spec import build_spec
from babysit.spec import rules as spec_rules
from babysit.spec.rules import DATASETS
from babysit.spec.rules import DEVICES
from babysit.spec.rules import EXPORT_FORMATS
from babysit.spec.rules import OPTIMIZERS
from babysit.training import models
from tests.conftest import babysit
from tests.conftest import cli_env

CHEAP_CHECK = [
    "--set",
    "model.fc_width=64",
    "--set",
    "model.conv_layers=3",
    "--set",
    "model.fc_layers=1",
    "--set",
    "overfit.lrs={adam=[1e-3]}",
    "--set",
    "overfit.steps=60",
    "--quiet",
]


def test_datasets_lists_the_digits_sizes_loading_gives(tmp_path: Path) -> None:
    listing = babysit(
        "datasets", "--json", "--data-dir", str(tmp_path), cwd=tmp_path, env=cli_env()
    )
    assert listing.returncode == 0, listing.stderr
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    loaded = load_dataset("digits", DataRequest(tmp_path, 0, False, DataSpec())).sizes()
    assert rows["digits"]["sizes"] == loaded and rows["digits"]["image"] == "1x8x8"
    from sklearn.datasets import load_digits

    assert sum(loaded.values()) == load_digits().target.size  # every image, once
    # Nothing of FDDB or CIFAR-10 is in this folder: the listing says so instead of None.
    for name in ("fddb", "cifar10", "imagefolder"):
        assert rows[name]["sizes"] is None
        assert rows[name]["missing"].startswith("not downloaded: ")
    text = babysit("datasets", "--data-dir", str(tmp_path), cwd=tmp_path, env=cli_env())
    split = "/".join(str(loaded[k]) for k in ("train", "val", "test"))
    assert f"train/val/test {split}" in text.stdout
    assert "fddb         not downloaded: FDDB not found in" in text.stdout


@pytest.mark.slow
def test_the_listed_digits_sizes_are_the_ones_a_run_stores(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    proc = babysit(
        "check",
        "--name",
        "d",
        "--storage",
        f"sqlite:///{db}",
        *CHEAP_CHECK,
        cwd=tmp_path,
        env=cli_env(),
    )
    assert proc.returncode == 0, proc.stderr
    stored = optuna.load_study(study_name="d/sanity", storage=f"sqlite:///{db}").user_attrs[
        "sizes"
    ]
    assert describe_dataset("digits", tmp_path)["sizes"] == stored


def test_registered_datasets_are_the_listed_ones() -> None:
    assert sorted(registered()) == sorted(DATASETS)


def _choices(parser: argparse.ArgumentParser, verb: str, flag: str) -> object:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices[verb]._actions if flag in a.option_strings)
    return action.choices


def test_the_command_line_offers_the_spec_modules_choices() -> None:
    parser = build_parser()
    for verb in ("run", "check", "worker", "ablate"):
        assert _choices(parser, verb, "--device") is DEVICES
    assert _choices(parser, "export", "--format") is EXPORT_FORMATS
    # AlexNet checks its knobs against the spec's own choices, not a copy.
    assert models._KNOBS == {
        "conv_layers": spec_rules.CONV_LAYERS,
        "fc_layers": spec_rules.FC_LAYERS,
        "activation": spec_rules.ACTIVATIONS,
        "batch_norm": spec_rules.BATCH_NORMS,
        "init": spec_rules.INITS,
        "geometry": spec_rules.GEOMETRIES,
    }
    spec = build_spec()
    rule = next(f for f in spec.__dataclass_fields__.values() if f.name == "optimizer")
    assert rule.metadata["rule"].allowed == "choose one of: " + ", ".join(OPTIMIZERS)
    with pytest.raises(
        UsageError, match="unknown optimizer 'rmsprop'; choose one of: " + ", ".join(OPTIMIZERS)
    ):
        build_spec(sets=["optimizer=rmsprop"])
