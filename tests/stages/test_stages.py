from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from optuna.trial import create_trial

from babysit.errors import ProtocolError
from babysit.protocol.prepare import prepare
from babysit.record.artifacts import oversized_attrs
from babysit.record.artifacts import read_json
from babysit.spec import CoarseSpec
from babysit.spec import build_spec
from babysit.stages.narrow import narrow
from babysit.stages.search import search
from babysit.storage import open_storage

DIST = {
    "lr": FloatDistribution(1e-5, 1.0, log=True),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
}


def _trial(lr: float, wd: float, value: float | None, state: TrialState = TrialState.COMPLETE):
    return create_trial(
        params={"lr": lr, "weight_decay": wd}, distributions=DIST, value=value, state=state
    )


def test_narrow_rule_on_known_inputs() -> None:
    trials = [
        _trial(1e-2, 1e-4, 0.90),
        _trial(1e-3, 1e-5, 0.80),
        _trial(1e-1, 1e-3, 0.85),
        _trial(1e-5, 1e-6, 0.10),  # not in the top 3
        _trial(1.0, 1e-2, None, TrialState.PRUNED),  # pruned trials never count
    ]
    for number, t in enumerate(trials):
        t.number = number
    out = narrow(trials, CoarseSpec(), top_k=3, pad=0.5, edge=0.25)
    lo, hi = out.ranges["lr"]
    assert math.log10(lo) == pytest.approx(-3.5)
    assert math.log10(hi) == pytest.approx(-0.5)
    wlo, whi = out.ranges["weight_decay"]
    assert math.log10(wlo) == pytest.approx(-5.5)
    assert math.log10(whi) == pytest.approx(-2.5)
    assert out.top == [0, 2, 1]
    assert out.warnings == []


def test_narrow_clips_to_coarse_range_and_warns_at_the_edge() -> None:
    trials = [_trial(0.9, 1.5e-6, 0.95), _trial(0.5, 1e-5, 0.90)]
    out = narrow(trials, CoarseSpec(), top_k=5, pad=0.5, edge=0.25)
    assert out.ranges["lr"][1] == pytest.approx(1.0)  # clipped at the coarse bound
    assert out.ranges["weight_decay"][0] == pytest.approx(1e-6)
    text = " ".join(out.warnings)
    assert "best lr" in text and "upper edge" in text
    assert "best weight_decay" in text and "lower edge" in text


def test_narrow_without_complete_trials_is_a_protocol_failure() -> None:
    with pytest.raises(ProtocolError, match="no coarse trial completed"):
        narrow([_trial(1.0, 1e-3, None, TrialState.PRUNED)], CoarseSpec(), 5, 0.5, 0.25)


@pytest.fixture
def digits_ctx(tmp_path: Path):
    spec = build_spec(
        sets=["model.fc_width=128", "coarse.trials=3", "coarse.epochs=2"], flags={"name": "div"}
    )
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    return prepare(spec, storage, device="cpu", quiet=True)


def test_divergence_stops_on_the_step_it_happens(digits_ctx) -> None:
    ctx = digits_ctx
    result = search(
        ctx,
        "coarse",
        ctx.spec.coarse,
        {"lr": [50.0, 500.0], "weight_decay": [1e-6, 1e-5]},
        initial_loss=math.log(10),
    )
    study = optuna.load_study(study_name="div/coarse", storage=ctx.storage.rdb)
    trials = study.get_trials()
    assert len(trials) == 3
    steps_per_epoch = math.ceil(ctx.data.train_size / ctx.batch_size)
    chance = 1 / ctx.data.num_classes
    for t in trials:
        # COMPLETE at chance, reported at the epoch it stopped in: every dashboard plot
        # draws it (search._diverged_value says why not PRUNED).
        assert (t.state, t.value) == (TrialState.COMPLETE, pytest.approx(chance))
        assert t.intermediate_values == {1: pytest.approx(chance)}
        assert t.user_attrs["reason"] == "diverged"
        # Caught within the first epoch, not after two epochs of NaN.
        assert t.user_attrs["diverged_at_step"] <= steps_per_epoch
        assert t.user_attrs["examples"] < ctx.data.train_size
        assert "LR too high" in t.user_attrs["verdict"]
    assert result.status == "failed"  # none completed by training: nothing to narrow from
    assert (result.values["diverged"], result.values["complete"]) == (3, 0)
    assert result.values["best"] is None


@pytest.mark.slow
def test_flat_loss_is_labelled_lr_too_low(digits_ctx) -> None:
    ctx = digits_ctx
    search(
        ctx,
        "coarse",
        ctx.spec.coarse,
        {"lr": [1e-9, 2e-9], "weight_decay": [1e-6, 2e-6]},
        initial_loss=math.log(10),
    )
    study = optuna.load_study(study_name="div/coarse", storage=ctx.storage.rdb)
    reasons = {t.user_attrs.get("reason") for t in study.get_trials()}
    assert reasons == {"lr too low"}


def test_narrow_ignores_trials_at_chance_level() -> None:
    trials = [
        _trial(3e-3, 1e-4, 0.66),
        _trial(1e-5, 1e-6, 0.10),
        _trial(0.9, 1e-2, 0.11),
        _trial(2e-3, 1e-3, 0.50),
    ]
    out = narrow(trials, CoarseSpec(), top_k=5, pad=0.5, edge=0.25, chance=0.1)
    # Only 0.66 and 0.50 got at least half the best gain over chance (threshold 0.38).
    assert out.threshold == pytest.approx(0.38)
    lo, hi = out.ranges["lr"]
    assert math.log10(lo) == pytest.approx(math.log10(2e-3) - 0.5)
    assert math.log10(hi) == pytest.approx(math.log10(3e-3) + 0.5)
    assert "half-way from chance" in out.rule


@pytest.mark.slow
def test_lr_range_test_sets_the_coarse_range(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import functools

    from babysit.stages import lr_range
    from babysit.stages.learned import _coarse_ranges

    # A short test (80 steps) is enough to see the curve turn; the default is 300.
    monkeypatch.setattr(
        lr_range,
        "propose_coarse_lr",
        functools.partial(lr_range.propose_coarse_lr, steps=80),
    )

    spec = build_spec(
        sets=["model.fc_width=64", "coarse.lr_range_test=true"], flags={"name": "lrt"}
    )
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    ctx = prepare(spec, storage, device="cpu", quiet=True)
    ranges = _coarse_ranges(ctx, math.log(10))
    low, high = ranges["lr"]
    assert 0 < low < high and [low, high] != spec.coarse.lr
    study = optuna.load_study(study_name="lrt/coarse", storage=storage.rdb)
    stored = study.user_attrs["lr_range_test"]
    assert stored["suggested"] == [low, high]
    curve = read_json(storage, stored["artifact"])  # the curve is an artifact, not an attr
    assert len(curve["lrs"]) == len(curve["losses"]) > 10 and oversized_attrs(stored) == {}
    # Read back, not rerun, the second time (workers and reruns agree).
    study.set_user_attr("ranges", ranges)
    assert _coarse_ranges(ctx, math.log(10)) == ranges
