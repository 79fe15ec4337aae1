from __future__ import annotations

from pathlib import Path

import pytest

from babysit.errors import UsageError
from babysit.spec import Spec
from babysit.spec import all_keys
from babysit.spec import build_spec

STUDIES = Path(__file__).resolve().parents[2] / "studies"


def test_precedence_flags_beat_set_beat_file_beat_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text('dataset = "faces"\noptimizer = "adam"\n[coarse]\ntrials = 7\nepochs = 2\n')
    spec = build_spec(cfg, ["coarse.trials=9", 'optimizer="sgd"'], {"optimizer": "adam"})
    assert spec.dataset == "faces"  # file beats default
    assert spec.coarse.trials == 9  # --set beats file
    assert spec.coarse.epochs == 2  # file value kept
    assert spec.optimizer == "adam"  # flag beats --set
    assert spec.fine.trials == Spec().fine.trials  # default


def test_set_is_typed() -> None:
    spec = build_spec(
        sets=[
            "coarse.lr=[1e-4, 1]",
            "data.hflip=true",
            "model.conv_layers=4",
            "sanity.tolerance=0.1",
            "batch_size=64",
        ]
    )
    assert spec.coarse.lr == [1e-4, 1.0]
    assert spec.data.hflip is True
    assert spec.model.conv_layers == 4
    assert spec.sanity.tolerance == 0.1
    assert spec.batch_size == 64


@pytest.mark.parametrize(
    "assignment, words",
    [
        ("coarse.trial=3", "unknown config key 'coarse.trial'"),
        ("coarse.trials=many", "expects int"),
        ("coarse.trials=2.5", "expects int"),
        ("data.hflip=3", "expects bool"),
        ("coarse.lr=[1, 0.1]", "0 < low < high"),
        ("model.conv_layers=7", "3, 4 or 5"),
        ("optimizer=rmsprop", "unknown optimizer"),
        ("nonsense", "KEY=VALUE"),
    ],
)
def test_bad_set_is_a_usage_error(assignment: str, words: str) -> None:
    with pytest.raises(UsageError, match=words.replace("[", r"\[").replace("(", r"\(")):
        build_spec(sets=[assignment])


def test_unknown_key_in_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[coarse]\ntrails = 3\n")
    with pytest.raises(UsageError, match="coarse.trails"):
        build_spec(cfg)


def test_roundtrip_through_dict() -> None:
    spec = build_spec(sets=["coarse.trials=5", 'model.activation="leaky_relu"'])
    again = Spec.from_dict(spec.to_dict())
    assert again == spec


def test_contract_keys_exist() -> None:
    keys = set(all_keys())
    for key in (
        "overfit.samples",
        "coarse.trials",
        "coarse.epochs",
        "coarse.lr",
        "coarse.weight_decay",
        "fine.trials",
        "fine.epochs",
        "final.epochs",
        "batch_size",
    ):
        assert key in keys


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.toml")), ids=lambda p: p.name)
def test_every_bundled_study_parses(path: Path) -> None:
    spec = build_spec(path)
    assert spec.coarse.trials >= 1


def test_a_spec_stored_with_the_old_arch_key_reads_as_the_model_table() -> None:
    # Stored runs of earlier versions hold {"model": "<network>", "arch": {...}}; they must
    # load as the same run as one written today, so resuming them is not a new spec.
    spec = build_spec(
        sets=["model.conv_layers=4", "model.fc_width=64"], flags={"model": "mine:build"}
    )
    new = spec.to_dict()
    assert new["model"]["name"] == "mine:build" and "arch" not in new
    old = {k: v for k, v in new.items() if k != "model"}
    old["model"] = "mine:build"
    old["arch"] = {k: v for k, v in new["model"].items() if k != "name"}
    again = Spec.from_dict(old)
    assert again.identity() == spec.identity()
    assert again.model.name == "mine:build" and again.model.conv_layers == 4
    assert not hasattr(again, "arch")  # one name in code: model


def test_the_network_is_model_name_however_it_is_given(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text('[model]\nname = "a:b"\nfc_width = 64\n')
    assert build_spec(cfg).model.name == "a:b"
    assert build_spec(sets=['model="c:d"']).model.name == "c:d"
    assert build_spec(sets=['model.name="e:f"']).model.name == "e:f"
    assert build_spec(flags={"model": "g:h"}).model.name == "g:h"
    assert "model.name" in all_keys() and "model" not in all_keys()
    with pytest.raises(UsageError, match="config key 'model.name' expects str"):
        build_spec(sets=["model=3"])
