"""The README starts where a user starts; docs/protocol.md states the rules the code stores on
the studies, in the code's own words."""

from __future__ import annotations

import pytest

from babysit.stages.budget import budget_rule
from babysit.stages.divergence import CEILING_RULE
from babysit.stages.divergence import MOVE_RULE
from babysit.stages.learned import ANCHOR_RULE
from babysit.stages.learned import PROBE_RULE
from babysit.stages.narrow import NARROW_RULE
from babysit.stages.samplers import HALVING_RULE
from tests.conftest import ROOT


def _words(text: str) -> str:
    # The README wraps its lines; a rule quoted across a line break is still the same words.
    return " ".join(text.split())


@pytest.mark.parametrize(
    "name, rule",
    [
        ("narrowing (fine study: narrowed.rule)", NARROW_RULE),
        ("successive halving (coarse study: pruner_rule)", HALVING_RULE),
        ("anchored coarse lr (coarse study: lr_anchor.rule)", ANCHOR_RULE),
        ("divergence ceiling (fine study: narrowed.ceiling.rule)", CEILING_RULE),
        ("probe of the top lr (coarse study: lr_probe.rule)", PROBE_RULE),
        ("coarse moved below divergence (coarse study: moved.rule)", MOVE_RULE),
        ("wall-clock budget (coarse study: budget_rule)", budget_rule()),
    ],
)
def test_the_protocol_page_quotes_each_stored_rule(name: str, rule: str) -> None:
    page = _words((ROOT / "docs" / "protocol.md").read_text())
    assert f'"{_words(rule)}"' in page, f"docs/protocol.md does not quote the {name} rule: {rule}"


def test_the_readme_opens_with_the_quick_start() -> None:
    """What it is, the two set-up commands (and pip for those without make), a first run and
    what it prints, all within the first 40 lines; the rules live in docs/ and are linked."""
    readme = (ROOT / "README.md").read_text()
    first = "\n".join(readme.splitlines()[:40])
    for needed in ("make run", "make test", "pip install", "babysit run", "final passed: test"):
        assert needed in first, f"the README's first 40 lines lack {needed!r}"
    for page in ("docs/usage.md", "docs/protocol.md", "docs/scaling.md", "docs/own-network.md"):
        assert f"]({page})" in readme and (ROOT / page).is_file(), page
    assert "seed 00" not in readme and "The rules, stated" not in readme


def test_the_stored_narrowing_rule_is_the_template_filled_in() -> None:
    """What narrow() stores is NARROW_RULE with the run's numbers, not a text of its own."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState
    from optuna.trial import create_trial

    from babysit.spec import CoarseSpec
    from babysit.stages.narrow import narrow

    dist = {
        "lr": FloatDistribution(1e-5, 1.0, log=True),
        "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
    }
    trials = [
        create_trial(
            state=TrialState.COMPLETE,
            value=v,
            distributions=dist,
            params={"lr": lr, "weight_decay": 1e-4},
        )
        for v, lr in ((0.9, 1e-3), (0.8, 3e-3), (0.3, 1e-1), (0.1, 1e-4))
    ]
    assert all(isinstance(t, optuna.trial.FrozenTrial) for t in trials)
    out = narrow(trials, CoarseSpec(), top_k=5, pad=0.5, edge=0.25, chance=0.1)
    # Half-way from 0.1 to 0.9 is 0.5: the 0.9 and 0.8 trials stay, 0.3 and 0.1 do not.
    assert out.rule == NARROW_RULE.format(
        top=2, good=2, threshold="0.500", chance="0.100", best="0.900", pad="0.5", share="0.1"
    )
