"""Issue 22's knobs: dropout and the LR schedule as searched dimensions, narrowed by the
same rule as lr and weight_decay; adamw and nesterov; old stored specs without the keys."""

from __future__ import annotations

import math

import pytest
import torch
from optuna.distributions import CategoricalDistribution
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from optuna.trial import create_trial
from torch import nn

from babysit.errors import UsageError
from babysit.spec import CoarseSpec
from babysit.spec import Spec
from babysit.spec import build_spec
from babysit.stages.narrow import NARROW_RULE
from babysit.stages.narrow import narrow
from babysit.training.models import AlexNet
from babysit.training.models import dropout_layers
from babysit.training.models import set_dropout
from babysit.training.step import lr_factor
from babysit.training.step import make_optimizer
from babysit.training.step import set_epoch_lr

DIST = {
    "lr": FloatDistribution(1e-5, 1.0, log=True),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
    "dropout": FloatDistribution(0.0, 0.8),
    "schedule": CategoricalDistribution(["none", "step", "cosine"]),
}


def _trial(number: int, value: float, dropout: float, schedule: str):
    t = create_trial(
        params={"lr": 1e-3, "weight_decay": 1e-4, "dropout": dropout, "schedule": schedule},
        distributions=DIST,
        value=value,
        state=TrialState.COMPLETE,
    )
    t.number = number
    return t


def test_set_and_toml_spell_the_searched_knobs(tmp_path) -> None:
    spec = build_spec(
        sets=["coarse.dropout=[0.1,0.5]", 'coarse.schedule=["none","cosine"]'],
        flags={"optimizer": "adamw"},
    )
    assert spec.coarse.dropout == [0.1, 0.5]
    assert spec.coarse.schedule == ["none", "cosine"]
    cfg = tmp_path / "s.toml"
    cfg.write_text('optimizer = "nesterov"\nschedule = "step"\n[coarse]\ndropout = [0, 0.3]\n')
    spec = build_spec(cfg)
    assert (spec.optimizer, spec.schedule, spec.coarse.dropout) == ("nesterov", "step", [0.0, 0.3])
    with pytest.raises(UsageError, match="coarse.dropout"):
        build_spec(sets=["coarse.dropout=[0.6,0.2]"])


def test_a_spec_stored_before_the_knobs_is_the_same_run() -> None:
    """Stored specs of earlier versions have no schedule, coarse.dropout or coarse.schedule:
    they load with the defaults, which train as those runs did, so a rerun is the same run."""
    old = Spec().to_dict()
    del old["schedule"]
    del old["coarse"]["dropout"]
    del old["coarse"]["schedule"]
    assert Spec.from_dict(old).identity() == Spec().identity()
    changed = build_spec(sets=["coarse.dropout=[0.1,0.5]"])
    assert Spec.from_dict(old).identity() != changed.identity()


def test_narrowing_treats_dropout_linearly_and_keeps_the_schedules_used() -> None:
    trials = [
        _trial(0, 0.90, 0.30, "cosine"),
        _trial(1, 0.88, 0.50, "cosine"),
        _trial(2, 0.86, 0.40, "none"),
        _trial(3, 0.20, 0.05, "step"),  # below half-way from chance: says nothing
    ]
    coarse = CoarseSpec(dropout=[0.0, 0.8], schedule=["none", "step", "cosine"])
    out = narrow(trials, coarse, top_k=5, pad=0.5, edge=0.25, chance=0.1)
    # Span 0.3-0.5 padded by 0.5 x 0.2 of the 0.8 range (0.08) on each side.
    assert out.ranges["dropout"] == pytest.approx([0.22, 0.58])
    assert out.ranges["schedule"] == ["none", "cosine"]  # step only in the trial at chance
    assert "linear for dropout" in out.rule and "0.1 of the coarse range" in out.rule
    assert out.rule == NARROW_RULE.format(
        top=3, good=3, threshold="0.500", chance="0.100", best="0.900", pad="0.5", share="0.1"
    )
    # Clipped to the coarse range like lr's.
    edge = narrow([_trial(0, 0.9, 0.01, "none")], coarse, top_k=5, pad=0.5, edge=0.25, chance=0.1)
    assert edge.ranges["dropout"][0] == 0.0
    assert edge.ranges["schedule"] == ["none"]


def test_schedules_decay_the_lr_per_epoch() -> None:
    assert [lr_factor("none", e, 4) for e in range(4)] == [1.0] * 4
    assert [lr_factor("step", e, 8) for e in range(8)] == pytest.approx(
        [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    assert [lr_factor("cosine", e, 4) for e in range(4)] == pytest.approx(
        [1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4)]
    )
    assert lr_factor("step", 0, 1) == 1.0  # a one-epoch trial trains at its lr
    opt = make_optimizer("adamw", [nn.Parameter(torch.zeros(3))], 0.1, 0.0)
    set_epoch_lr(opt, "cosine", 2, 4)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    # A checkpoint keeps the initial lr in the group: the schedule resumes where it was.
    again = make_optimizer("adamw", [nn.Parameter(torch.zeros(3))], 0.1, 0.0)
    again.load_state_dict(opt.state_dict())
    set_epoch_lr(again, "cosine", 3, 4)
    assert again.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor("cosine", 3, 4))


def test_the_optimizers_are_what_their_names_say() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    assert type(make_optimizer("adamw", params, 1e-3, 1e-2)) is torch.optim.AdamW
    nesterov = make_optimizer("nesterov", params, 1e-2, 0.0, 0.9)
    assert type(nesterov) is torch.optim.SGD
    assert nesterov.param_groups[0]["nesterov"] and nesterov.param_groups[0]["momentum"] == 0.9
    assert not make_optimizer("sgd", params, 1e-2, 0.0).param_groups[0]["nesterov"]


def test_dropout_reaches_alexnet_and_a_users_layers() -> None:
    net = AlexNet(10, in_channels=1, fc_width=16, dropout=0.3)
    assert [m.p for m in dropout_layers(net)] == [0.3, 0.3]
    user = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 2), nn.Dropout2d(0.1))
    set_dropout(user, 0.25)
    assert [m.p for m in dropout_layers(user)] == [0.25, 0.25]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a whole protocol and a report; past 600 s on a busy 2-core machine
def test_a_run_searches_dropout_and_the_schedule_with_adamw(tmp_path) -> None:
    """The whole protocol, tiny, with dropout, the schedule and AdamW: every coarse trial
    draws both, fine searches their narrowed ranges, the final trains with the best trial's
    values, and the report's tables and the summary carry them."""
    import json

    import optuna

    from tests.conftest import CHEAP
    from tests.conftest import TINY
    from tests.conftest import babysit

    summary = tmp_path / "s.json"
    args = [
        "run",
        "--name",
        "k",
        *TINY,
        *CHEAP[:6],  # the 3-conv AlexNet with one narrow FC layer: its lrs are Adam's
        "--set",
        "model.fc_layers=2",  # a hidden FC layer, so the classifier has a dropout layer
        "--set",
        "overfit.lrs={adamw=[1e-3]}",
        "--optimizer",
        "adamw",
        "--set",
        "coarse.dropout=[0.1, 0.6]",
        "--set",
        'coarse.schedule=["none", "cosine"]',
        "--summary-json",
        str(summary),
    ]
    proc = babysit(*args, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    storage = f"sqlite:///{tmp_path / 'babysit.db'}"
    coarse = optuna.load_study(study_name="k/coarse", storage=storage).get_trials()
    assert len(coarse) == 4
    for t in coarse:
        assert 0.1 <= t.params["dropout"] <= 0.6
        assert t.params["schedule"] in ("none", "cosine")
    fine_study = optuna.load_study(study_name="k/fine", storage=storage)
    ranges = fine_study.user_attrs["narrowed"]["ranges"]
    assert 0.1 <= ranges["dropout"][0] < ranges["dropout"][1] <= 0.6
    assert set(ranges["schedule"]) <= {"none", "cosine"} and ranges["schedule"]
    for t in fine_study.get_trials():
        assert ranges["dropout"][0] <= t.params["dropout"] <= ranges["dropout"][1]
        assert t.params["schedule"] in ranges["schedule"]
    final = json.loads(summary.read_text())["stages"]["final"]
    assert set(final["params"]) == {"lr", "weight_decay", "dropout", "schedule"}
    best = max(
        (t for t in coarse + fine_study.get_trials() if t.value is not None),
        key=lambda t: t.value,
    )
    assert final["params"]["dropout"] == pytest.approx(best.params["dropout"])
    assert f"schedule={final['params']['schedule']}" in proc.stderr  # the "chosen:" line
    report = babysit("report", "--name", "k", "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| # | lr | weight_decay | dropout | schedule | val accuracy |" in md
    # A rerun with another dropout range is another run: refused, exit 2, one line.
    other = [a if a != "coarse.dropout=[0.1, 0.6]" else "coarse.dropout=[0.2, 0.6]" for a in args]
    again = babysit(*other, cwd=tmp_path)
    assert again.returncode == 2 and "coarse.dropout" in again.stderr
