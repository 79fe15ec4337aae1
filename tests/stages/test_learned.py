"""The protocol uses what earlier stages learned (issue 16): the overfit LR anchors the
coarse range, a best value on an edge runs an extra round, the final takes the best of
coarse and fine; successive halving in the coarse stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from babysit.spec import build_spec
from babysit.stages.learned import edges
from babysit.stages.learned import user_set_lr
from tests.conftest import CHEAP
from tests.conftest import ROOT
from tests.conftest import TINY
from tests.conftest import babysit
from tests.conftest import cli_env

# Real processes and whole runs: `make test-slow` (CI runs it after `make test`).
pytestmark = pytest.mark.slow

SEEDS = (0, 1, 2)

# Three seeds of the small budget (3 coarse and 2 fine trials, every other setting
# the default) on the tiny CNN and three shapes, in one process so the imports are paid once.
_RUNS = """
import json, sys
import babysit
out = {}
for seed in SEEDS:
    s = babysit.run(model="tinynet:build", data="imagefolder", data_dir=sys.argv[1],
                    storage=sys.argv[2], name=f"shapes-{seed}", seed=seed, quiet=True,
                    batch_size=32, data_options={"patch_size": 16},
                    coarse={"trials": 3}, fine={"trials": 2})
    out[seed] = s
print(json.dumps(out))
""".replace("SEEDS", repr(SEEDS))


@pytest.fixture(scope="module")
def shapes_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("shapes")
    env = cli_env(OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = f"{ROOT / 'examples'}:{env['PYTHONPATH']}"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "make_shapes.py"),
            str(tmp / "shapes"),
            "--per-class",
            "100",
            "--size",
            "16",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    url = f"sqlite:///{tmp / 'runs.db'}"
    proc = subprocess.run(
        [sys.executable, "-c", _RUNS, str(tmp / "shapes"), url],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1]), url


def test_small_budget_on_easy_data_reaches_090_for_every_seed(shapes_runs: tuple) -> None:
    summaries, _ = shapes_runs
    accuracies = {seed: s["stages"]["final"]["test_accuracy"] for seed, s in summaries.items()}
    assert all(a >= 0.9 for a in accuracies.values()), accuracies


def test_coarse_lr_is_anchored_on_the_overfit_lr(shapes_runs: tuple) -> None:
    summaries, url = shapes_runs
    for seed, s in summaries.items():
        coarse = optuna.load_study(study_name=f"shapes-{seed}/coarse", storage=url)
        anchor = coarse.user_attrs["lr_anchor"]
        assert anchor["overfit_lr"] == s["stages"]["overfit"]["lr"]
        lr = anchor["overfit_lr"]
        assert anchor["range"] == pytest.approx([lr / 10**0.5, lr * 100])
        first = [t for t in coarse.trials if t.number < 3 and "lr" in t.params]
        assert first and all(lr / 10**0.5 <= t.params["lr"] <= lr * 100 for t in first)
        assert coarse.user_attrs["pruner"] == "halving"
        assert "successive halving" in coarse.user_attrs["pruner_rule"]


def test_final_takes_the_best_of_coarse_and_fine(shapes_runs: tuple) -> None:
    summaries, _ = shapes_runs
    for s in summaries.values():
        bests = [s["stages"][k]["best"] for k in ("fine", "coarse") if s["stages"][k]["best"]]
        top = max(bests, key=lambda b: b["value"])
        assert s["stages"]["final"]["params"] == pytest.approx(top["params"])


def test_a_best_on_the_edge_runs_a_bounded_extra_round(tmp_path: Path) -> None:
    # lr 1e-6..1e-5 is far too low for Adam on digits: the best coarse trial has the
    # highest lr, at the upper edge, so two extra trials look two decades higher.
    url = f"sqlite:///{tmp_path / 'edge.db'}"
    proc = babysit(
        "run",
        "--name",
        "edge",
        "--storage",
        url,
        *TINY,
        *CHEAP,
        "--set",
        "coarse.lr=[1e-6, 1e-5]",
        "--set",
        "coarse.extend=true",
        "--set",
        "coarse.weight_decay=[1e-4, 1e-3]",
        "--summary-json",
        str(tmp_path / "s.json"),
        cwd=tmp_path,
        env=cli_env(),
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    coarse = optuna.load_study(study_name="edge/coarse", storage=url)
    plan = coarse.user_attrs["extension"]
    assert plan["edges"]["lr"] == "upper"
    assert plan["strip"]["lr"] == pytest.approx([1e-5, 1e-3])
    assert coarse.user_attrs["ranges"]["lr"] == pytest.approx([1e-6, 1e-3])
    assert "lr_anchor" not in coarse.user_attrs  # the user's coarse.lr wins
    finished = [t for t in coarse.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 + 2
    extra = [t for t in finished if t.params["lr"] > 1e-5]
    assert len(extra) == 2
    summary = json.loads((tmp_path / "s.json").read_text())
    fine_lr = summary["stages"]["fine"]["range"]["lr"]
    assert fine_lr[1] <= 1e-3 + 1e-12  # narrowing clips to the widened range
    assert "extra trials" in proc.stderr


def test_edges_rule() -> None:
    ranges = {"lr": [1e-4, 1e-1], "weight_decay": [1e-6, 1e-2]}
    best = {"params": {"lr": 9e-2, "weight_decay": 1.1e-6}}
    # weight_decay's lower edge means "no decay", not "search lower"
    assert edges(best, ranges, 0.25) == {"lr": "upper"}
    best = {"params": {"lr": 1.2e-4, "weight_decay": 9e-3}}
    assert edges(best, ranges, 0.25) == {"lr": "lower", "weight_decay": "upper"}
    assert edges({"params": {"lr": 3e-3, "weight_decay": 1e-4}}, ranges, 0.25) == {}


def test_an_explicit_coarse_lr_is_known_even_when_it_equals_the_default() -> None:
    assert not user_set_lr(build_spec())
    assert user_set_lr(build_spec(sets=["coarse.lr=[1e-5, 1.0]"]))
    assert user_set_lr(build_spec(flags={"coarse": {"lr": [1e-5, 1.0]}}))
    assert user_set_lr(build_spec(sets=["coarse.lr=[1e-4, 1.0]"]))
