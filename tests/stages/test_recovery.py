"""When a stage goes wrong, babysit does what a careful person would (issue 20): every LR at
which a search trial diverged bounds the search above, the top of a range babysit chose is
probed before the search spends trials there, a coarse round in which every trial
diverged is followed by one below, and a fine round in which nothing completed hands the
final the best coarse trial. A run fails only where nothing learned, saying what to change.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from optuna.trial import create_trial

from babysit.protocol.prepare import prepare
from babysit.spec import CoarseSpec
from babysit.spec import build_spec
from babysit.stages.divergence import DIVERGE_MARGIN
from babysit.stages.divergence import MOVE_DECADES
from babysit.stages.divergence import divergence_ceiling
from babysit.stages.divergence import moved_range
from babysit.stages.divergence import probe_ceiling
from babysit.stages.learned import BELOW_DIVERGENCE
from babysit.stages.learned import EDGE_DECADES
from babysit.stages.learned import PROBE_STEPS
from babysit.stages.learned import _extension_plan
from babysit.stages.learned import edges
from babysit.stages.learned import probe_top
from babysit.stages.narrow import narrow
from babysit.storage import open_storage
from tests.conftest import CHEAP
from tests.conftest import TINY
from tests.conftest import babysit
from tests.conftest import cli_env

DIST = {
    "lr": FloatDistribution(1e-5, 1.0, log=True),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
}


def _trial(number: int, lr: float, wd: float, value: float, reason: str | None = None):
    t = create_trial(
        params={"lr": lr, "weight_decay": wd},
        distributions=DIST,
        value=value,
        state=TrialState.COMPLETE,
        user_attrs={"reason": reason} if reason else {},
    )
    t.number = number
    return t


def _diverged(number: int, lr: float, wd: float = 1e-4):
    # As the searches store them: COMPLETE at chance (1/C), reason "diverged".
    return _trial(number, lr, wd, 0.1, "diverged")


# The failing CI run of issue 20, in miniature: coarse [1e-3, 1e-2], the best trial at the
# lower edge, three trials diverged above it. Before, fine was padded back up to 1e-2.
CI_CASE = [
    _trial(0, 1.11e-3, 6.5e-5, 0.866),
    _trial(1, 1.6e-3, 2e-5, 0.80),
    _trial(2, 1.3e-3, 1e-4, 0.70),
    _diverged(3, 4.0e-3, 5e-5),
    _diverged(4, 6.0e-3, 1e-5),
    _diverged(5, 9.0e-3, 1e-4),
]


def test_fine_stays_below_the_lowest_lr_that_diverged() -> None:
    coarse = CoarseSpec(lr=[1e-3, 1e-2])
    out = narrow(CI_CASE, coarse, top_k=5, pad=0.5, edge=0.25, chance=0.1)
    lo, hi = out.ranges["lr"]
    assert hi == pytest.approx(4.0e-3 / 10**DIVERGE_MARGIN)
    assert hi < 4.0e-3 and lo <= 1.11e-3 <= hi  # the best trial stays inside
    assert out.ceiling["diverged_lr"] == pytest.approx(4.0e-3)
    assert out.ceiling["max_lr"] == pytest.approx(hi)
    assert "0.5x the lowest lr" in out.ceiling["rule"]
    assert all(isinstance(v, float) for v in out.ranges["lr"])


def test_without_divergence_the_narrowing_rule_is_unchanged() -> None:
    trials = [t for t in CI_CASE if t.user_attrs.get("reason") != "diverged"]
    out = narrow(trials, CoarseSpec(lr=[1e-3, 1e-2]), top_k=5, pad=0.5, edge=0.25, chance=0.1)
    assert out.ceiling is None
    # The top trials' span [1.11e-3, 1.6e-3] padded by half a decade, clipped at 1e-2.
    assert out.ranges["lr"][1] == pytest.approx(1.6e-3 * 10**0.5)


def test_only_divergence_in_the_good_decay_region_bounds_fine() -> None:
    trials = [
        _trial(0, 1e-3, 1e-4, 0.9),
        _trial(1, 2e-3, 2e-4, 0.85),
        _diverged(2, 4e-3, 5e-3),  # decay 5e-3: outside the fine weight_decay range
        _diverged(3, 8e-3, 1e-4),  # the bound
    ]
    out = narrow(trials, CoarseSpec(), top_k=5, pad=0.5, edge=0.25, chance=0.1)
    wd_lo, wd_hi = out.ranges["weight_decay"]
    assert not wd_lo <= 5e-3 <= wd_hi
    assert out.ceiling["diverged_lr"] == pytest.approx(8e-3)
    assert out.ranges["lr"][1] == pytest.approx(8e-3 / 10**DIVERGE_MARGIN)


def test_divergence_below_the_best_trial_moves_fine_below_it() -> None:
    """An lr that diverged once is no place to search, even just under a trial that
    learned there: fine searches the decade under the cap (2 x pad), and the final
    still compares the best coarse trial with fine's."""
    trials = [_trial(0, 1e-3, 1e-4, 0.9), _trial(1, 2e-3, 1e-4, 0.8), _diverged(2, 8e-4, 1e-4)]
    out = narrow(trials, CoarseSpec(), top_k=5, pad=0.5, edge=0.25, chance=0.1)
    lo, hi = out.ranges["lr"]
    assert hi == pytest.approx(8e-4 / 10**DIVERGE_MARGIN)
    assert math.log10(hi) - math.log10(lo) == pytest.approx(1.0)
    assert "the 1 decade below it" in out.ceiling["rule"]


def test_a_probe_that_diverged_bounds_fine_and_the_edge_round_like_a_trial() -> None:
    """On digits the probe brought the top down to 1e-3 (3.2e-3 diverged at step 2); the
    best trial then sat on that upper edge, and the edge round once looked two decades
    higher, where its trials diverged. The probe's divergence is a bound like a trial's."""
    trials = [_trial(0, 9e-4, 1e-4, 0.74), _trial(1, 3e-4, 1e-3, 0.70)]
    ranges = {"lr": [3.16e-5, 1e-3], "weight_decay": [1e-6, 1e-2]}
    spec = build_spec(sets=["coarse.trials=8"])
    best = {"params": trials[0].params}
    assert _extension_plan(trials, best, ranges, spec)["edges"] == {"lr": "upper"}
    assert _extension_plan(trials, best, ranges, spec, probed=3.16e-3)["edges"] == {}
    coarse = CoarseSpec(lr=ranges["lr"])
    out = narrow(trials, coarse, top_k=5, pad=0.5, edge=0.25, chance=0.1, probed=1.2e-3)
    assert out.ranges["lr"][1] == pytest.approx(1.2e-3 / 10**DIVERGE_MARGIN)
    assert out.ceiling["diverged_lr"] == pytest.approx(1.2e-3)
    out = narrow(trials, coarse, top_k=5, pad=0.5, edge=0.25, chance=0.1, probed=3.16e-3)
    assert out.ranges["lr"][1] == pytest.approx(1e-3)  # the coarse bound is lower
    probe = {
        "tried": [{"lr": 1e-2, "diverged_at_step": 2}, {"lr": 3e-3, "diverged_at_step": None}]
    }
    assert probe_ceiling(probe) == pytest.approx(1e-2) and probe_ceiling(None) is None


def test_an_upper_lr_edge_is_not_widened_past_divergence() -> None:
    ranges = {"lr": [1e-4, 1e-2], "weight_decay": [1e-6, 1e-2]}
    best = {"params": {"lr": 9e-3, "weight_decay": 1e-4}}
    assert edges(best, ranges, 0.25) == {"lr": "upper"}
    assert edges(best, ranges, 0.25, ceiling=9.5e-3) == {}
    spec = build_spec(sets=["coarse.trials=8"])
    trials = [_trial(0, 9e-3, 1e-4, 0.9), _diverged(1, 9.5e-3)]
    plan = _extension_plan(trials, {"params": trials[0].params}, ranges, spec)
    assert plan is not None and plan["edges"] == {}


def test_a_coarse_round_that_all_diverged_is_followed_by_one_below() -> None:
    ranges = {"lr": [1e-3, 1.0], "weight_decay": [1e-6, 1e-2]}
    trials = [_diverged(0, 0.3), _diverged(1, 2e-2), _diverged(2, 0.9)]
    spec = build_spec(sets=["coarse.trials=8"])
    plan = _extension_plan(trials, None, ranges, spec)
    assert plan is not None
    assert plan["edges"] == {"lr": BELOW_DIVERGENCE}
    top = 2e-2 / 10**DIVERGE_MARGIN
    assert plan["strip"]["lr"] == pytest.approx([top / 10**EDGE_DECADES, top])
    assert plan["widened"]["lr"] == pytest.approx([top / 10**EDGE_DECADES, 1.0])
    assert plan["extra_trials"] == 2
    assert plan["recovery"].startswith("recovered: no trial of the first round completed")
    # Nothing diverged (every trial failed): nothing says where to look instead.
    assert _extension_plan([], None, ranges, spec) is None
    assert divergence_ceiling(trials, 0.0) == pytest.approx(2e-2)


def test_the_rest_of_coarse_moves_below_when_its_first_trials_all_diverge() -> None:
    ranges = {"lr": [1e-3, 1e-2], "weight_decay": [1e-6, 1e-2]}
    # One diverged trial is not yet a pattern; a trial that trained means the range works.
    assert moved_range([_diverged(0, 5e-3)], ranges) is None
    assert moved_range([_diverged(0, 5e-3), _trial(1, 2e-3, 1e-4, 0.8)], ranges) is None
    pruned = _trial(1, 2e-3, 1e-4, 0.3)
    pruned.state = TrialState.PRUNED  # pruned after an epoch: it trained without diverging
    assert moved_range([_diverged(0, 5e-3), pruned], ranges) is None
    moved = moved_range([_diverged(0, 5e-3), _diverged(1, 2e-3)], ranges)
    assert moved is not None
    top = 2e-3 / 10**DIVERGE_MARGIN
    assert moved["lr"] == pytest.approx([top / 10**MOVE_DECADES, top])
    assert moved["weight_decay"] == ranges["weight_decay"]
    # Surplus trials (closed untrained past the target) say nothing.
    surplus = _diverged(2, 1e-3)
    surplus.user_attrs["reason"] = "surplus"
    assert moved_range([_diverged(0, 5e-3), surplus], ranges) is None


@pytest.fixture(scope="module")
def cheap_ctx(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("probe")
    sets = [s for s in CHEAP if s != "--set"]
    spec = build_spec(sets=sets, flags={"name": "probe"})
    return prepare(spec, open_storage(f"sqlite:///{tmp / 's.db'}"), device="cpu", quiet=True)


def test_the_probe_brings_a_diverging_top_down_and_stores_why(cheap_ctx) -> None:
    ctx = cheap_ctx
    initial = math.log(ctx.data.num_classes)
    # Adam at lr 10 explodes on its first steps; 1e-4 trains.
    moved = probe_top(ctx, {"lr": [1e-4, 10.0], "weight_decay": [1e-6, 1e-2]}, initial)
    lo, hi = moved["lr"]
    assert lo == pytest.approx(1e-4) and hi < 10.0
    assert moved["weight_decay"] == [1e-6, 1e-2]
    stored = optuna.load_study(study_name="probe/coarse", storage=ctx.storage.url).user_attrs
    probe = stored["lr_probe"]
    tried = probe["tried"]
    assert tried[0]["lr"] == pytest.approx(10.0) and tried[0]["diverged_at_step"] is not None
    assert all(1 <= (t["diverged_at_step"] or 1) <= PROBE_STEPS for t in tried)
    # Each probe half a decade under the one before, until one trains (or four came down).
    for a, b in zip(tried, tried[1:], strict=False):
        assert b["lr"] == pytest.approx(a["lr"] / 10**0.5)
    if tried[-1]["diverged_at_step"] is None:
        assert hi == pytest.approx(tried[-1]["lr"])
    assert probe["range"] == pytest.approx([lo, hi]) and probe["replaced"] == [1e-4, 10.0]


def test_the_probe_leaves_a_range_that_trains_alone(cheap_ctx) -> None:
    ctx = cheap_ctx
    ranges = {"lr": [1e-5, 1e-3], "weight_decay": [1e-6, 1e-2]}
    assert probe_top(ctx, ranges, math.log(ctx.data.num_classes)) == ranges


# ---------------------------------------------------------------------------- whole runs

# A network that trains well for its first DIVERGE_AFTER minibatch steps and then returns
# NaN: coarse trials (one epoch, 9 steps on digits) complete, fine trials (two epochs)
# all diverge in their second epoch, the final (one epoch) trains. The overfit check's
# full-batch steps on 20 examples do not count, so it passes.
BLOWUP = '''
import os
import torch
from torch import nn


class BlowsUp(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, num_classes))
        with torch.no_grad():
            self.body[-1].weight.mul_(0.01)
        self.steps = 0

    def forward(self, x):
        out = self.body(x)
        if self.training and x.shape[0] > 32:
            self.steps += 1
            if self.steps > int(os.environ["DIVERGE_AFTER"]):
                return out * float("nan")
        return out


def build(num_classes, in_channels, image_size):
    return BlowsUp(num_classes, in_channels)


class Constant(nn.Module):
    """Ignores its input: it can learn the class prior and nothing else."""

    def __init__(self, num_classes, in_channels, image_size):
        super().__init__()
        self.fc = nn.Linear(in_channels * image_size * image_size, num_classes)
        with torch.no_grad():
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.flatten(1) * 0.0)


def constant(num_classes, in_channels, image_size):
    return Constant(num_classes, in_channels, image_size)
'''

SMALL = [
    "--set",
    "overfit.lrs={adam=[1e-3, 1e-2]}",
    "--set",
    "coarse.trials=3",
    "--set",
    "coarse.epochs=1",
    "--set",
    "coarse.lr=[1e-3, 3e-3]",
    "--set",
    "coarse.extend=false",
    "--set",
    "fine.trials=2",
    "--set",
    "fine.epochs=2",
    "--set",
    'fine.pruner="none"',
    "--set",
    "final.epochs=1",
    "--quiet",
]


@pytest.fixture
def user_models(tmp_path: Path) -> Path:
    (tmp_path / "blowup.py").write_text(BLOWUP)
    return tmp_path


@pytest.mark.slow
def test_a_fine_stage_in_which_every_trial_diverges_hands_the_final_the_coarse_best(
    user_models: Path,
) -> None:
    url = f"sqlite:///{user_models / 'r.db'}"
    env = cli_env(DIVERGE_AFTER="12", PYTHONPATH=f"{user_models}:{cli_env()['PYTHONPATH']}")
    summary_path = user_models / "s.json"
    proc = babysit(
        "run",
        "--name",
        "r",
        "--model",
        "blowup:build",
        "--storage",
        url,
        *SMALL,
        "--summary-json",
        str(summary_path),
        cwd=user_models,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    fine = optuna.load_study(study_name="r/fine", storage=url)
    assert [t.user_attrs.get("reason") for t in fine.trials] == ["diverged", "diverged"]
    summary = json.loads(summary_path.read_text())
    coarse_best = summary["stages"]["coarse"]["best"]
    assert coarse_best is not None
    recovery = summary["stages"]["fine"]["recovery"]
    assert recovery.startswith(
        f"recovered: the final takes the best coarse trial {coarse_best['number']}"
    )
    assert summary["stages"]["fine"]["status"] == "passed"
    assert summary["stages"]["final"]["status"] == "passed"
    assert summary["stages"]["final"]["params"] == pytest.approx(coarse_best["params"])
    assert fine.user_attrs["recovery"] == recovery
    assert "fine recovered:" in proc.stderr
    # Shown where people look: status, and the dashboard note on the fine study.
    status = babysit("status", "--name", "r", "--storage", url, cwd=user_models, env=env)
    assert status.returncode == 0 and recovery in status.stdout
    from babysit.record.notes import get_note

    assert "recovered: the final takes the best coarse trial" in get_note(fine)
    report = babysit(
        "report", "--name", "r", "--storage", url, "--out", "rep", cwd=user_models, env=env
    )
    assert report.returncode == 0, report.stderr
    assert recovery in " ".join((user_models / "rep" / "report.md").read_text().split())


@pytest.mark.slow
def test_a_run_in_which_nothing_learned_fails_and_says_what_to_change(user_models: Path) -> None:
    url = f"sqlite:///{user_models / 'n.db'}"
    env = cli_env(PYTHONPATH=f"{user_models}:{cli_env()['PYTHONPATH']}")
    proc = babysit(
        "run",
        "--name",
        "n",
        "--model",
        "blowup:constant",
        "--storage",
        url,
        *SMALL,
        "--force",  # past overfit, which a network blind to its input cannot pass
        cwd=user_models,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr
    assert "none of the 3 complete coarse trials beat chance" in proc.stderr
    assert "Give coarse more epochs" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_coarse_divergence_above_a_good_region_bounds_every_fine_trial(tmp_path: Path) -> None:
    """Coarse over four decades of Adam lr on digits: the top decade diverges (pinned by
    the seed: the random sampler draws the same lrs every time). Every fine trial stays
    below the lowest lr that diverged, and the run ends well."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    proc = babysit(
        "run",
        "--name",
        "c",
        "--storage",
        url,
        *TINY,
        *CHEAP,
        "--set",
        "coarse.lr=[1e-4, 1.0]",
        "--set",
        "coarse.trials=6",
        "--set",
        "fine.trials=3",
        "--summary-json",
        str(tmp_path / "s.json"),
        cwd=tmp_path,
        env=cli_env(),
    )
    assert proc.returncode == 0, proc.stderr
    coarse = optuna.load_study(study_name="c/coarse", storage=url)
    fine = optuna.load_study(study_name="c/fine", storage=url)
    narrowed = fine.user_attrs["narrowed"]
    wd_lo, wd_hi = narrowed["ranges"]["weight_decay"]
    diverged = [
        t.params["lr"]
        for t in coarse.trials
        if t.user_attrs.get("reason") == "diverged" and wd_lo <= t.params["weight_decay"] <= wd_hi
    ]
    assert diverged, "the seed no longer draws a diverging lr in the good region: pick another"
    ceiling = narrowed["ceiling"]
    assert ceiling["diverged_lr"] == pytest.approx(min(diverged))
    limit = min(diverged)
    assert fine.trials and all(t.params["lr"] <= ceiling["max_lr"] < limit for t in fine.trials)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["stages"]["final"]["test_accuracy"] > 0.5


@pytest.mark.slow
def test_coarse_trials_that_all_diverge_move_the_rest_of_the_budget_below(tmp_path: Path) -> None:
    """Adam at lr 1 to 10 explodes on its first steps: after two diverged trials the rest
    of the coarse budget (no extra round: coarse.extend=false) draws below them, and the
    run ends well instead of failing coarse."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    proc = babysit(
        "run",
        "--name",
        "m",
        "--storage",
        url,
        *TINY,
        *CHEAP,
        "--set",
        "coarse.lr=[1.0, 10.0]",
        "--set",
        "coarse.trials=5",
        "--summary-json",
        str(tmp_path / "s.json"),
        cwd=tmp_path,
        env=cli_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert "below where they did" in proc.stderr
    coarse = optuna.load_study(study_name="m/coarse", storage=url)
    trials = sorted(coarse.trials, key=lambda t: t.number)
    assert len(trials) == 5  # within the stage's budget
    assert [t.user_attrs.get("reason") for t in trials[:2]] == ["diverged", "diverged"]
    moved = coarse.user_attrs["moved"]
    assert moved["from"] == [1.0, 10.0] and moved["range"][1] < 1.0
    assert "once 2 coarse trials have diverged" in moved["rule"]
    assert coarse.user_attrs["ranges"]["lr"] == pytest.approx([moved["range"][0], 10.0])
    assert all(t.params["lr"] < 1.0 for t in trials[2:])
    assert any(t.user_attrs.get("reason") != "diverged" for t in trials[2:])
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["stages"]["coarse"]["status"] == "passed"
    assert summary["stages"]["final"]["status"] == "passed"
