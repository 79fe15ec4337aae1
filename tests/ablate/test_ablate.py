"""`babysit ablate`: the config, the table, and resuming after a kill."""

from __future__ import annotations

import csv
import math
import signal
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from babysit.ablate.config import load_ablation
from babysit.ablate.run import run_ablation
from babysit.errors import UsageError
from babysit.record.runs import run_names
from babysit.storage import open_storage
from tests.conftest import ROOT
from tests.conftest import babysit
from tests.conftest import cli_env
from tests.conftest import popen

# Real processes and whole runs: `make test-slow` (CI runs it after `make test`).
pytestmark = pytest.mark.slow

# Seed 000's shape on digits, small enough for seconds: three convs, a 128-wide head.
TINY_ABLATION = """
dataset = "digits"
optimizer = "adam"
batch_size = 64

[model]
conv_layers = 3
fc_width = 128

[final]
epochs = 2

[ablation]
name = "tiny"
mode = "final"
params = {lr = 1e-3, weight_decay = 1e-5}
repeats = 2

[[variants]]
name = "baseline"
reported = 0.5

[[variants]]
name = "bce"
description = "one-hot BCE"
set = {loss = "bce", model.fc_layers = 2}
"""


@pytest.fixture(autouse=True)
def _one_thread():  # noqa: ANN202
    # Two cores shared by several test runs: one thread per process beats two that fight.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write(tmp_path: Path, text: str, name: str = "ablation.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _final_trials(url: str, run: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=f"{run}/final", storage=url)
    return study.get_trials(deepcopy=False)


def _running(url: str, run: str) -> bool:
    try:
        trials = _final_trials(url, run)
    except KeyError:
        return False
    return any(t.state == TrialState.RUNNING for t in trials)


def test_tiny_ablation_gives_a_complete_table_and_resumes_after_a_kill(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = _write(tmp_path, TINY_ABLATION)
    args = [
        "ablate",
        "--config",
        str(config),
        "--storage",
        sqlite_url,
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "table"),
        "--quiet",
    ]
    env = cli_env(OMP_NUM_THREADS="1")
    proc = popen(*args, cwd=tmp_path, env=env)
    # Kill it in the middle of the third run (bce, repeat 0): two runs are done by then.
    deadline = time.monotonic() + 120
    while not _running(sqlite_url, "tiny/bce") and proc.poll() is None:
        assert time.monotonic() < deadline, "the third run never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    before = {
        run: len(_final_trials(sqlite_url, run)) for run in ("tiny/baseline", "tiny/baseline/r1")
    }
    assert before == {"tiny/baseline": 1, "tiny/baseline/r1": 1}

    done = babysit(*args, cwd=tmp_path, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("finished earlier, skipped") == 2
    # No run trained twice: the finished ones keep their one trial, the killed one has its
    # FAIL (reclaimed at once: its process is gone) and one COMPLETE.
    for run in ("tiny/baseline", "tiny/baseline/r1", "tiny/bce/r1"):
        trials = _final_trials(sqlite_url, run)
        assert [t.state for t in trials] == [TrialState.COMPLETE], run
    killed = _final_trials(sqlite_url, "tiny/bce")
    assert [t.state for t in killed][-1] == TrialState.COMPLETE
    assert [t.state for t in killed[:-1]] in ([], [TrialState.FAIL])  # [] if it just finished
    if killed[0].state == TrialState.FAIL and killed[0].user_attrs.get("epochs_run"):
        # Killed after an epoch: the rerun picked up its checkpoint instead of starting over.
        assert killed[-1].user_attrs["resumed_from_epoch"] == killed[0].user_attrs["epochs_run"]
    storage = open_storage(sqlite_url, tmp_path / "art")
    assert set(run_names(storage)) == {
        "tiny/baseline",
        "tiny/baseline/r1",
        "tiny/bce",
        "tiny/bce/r1",
    }

    # The table: stdout, Markdown and CSV, one row per variant, means over both repeats.
    with open(tmp_path / "table" / "ablation.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows] == ["baseline", "bce"]
    for row in rows:
        assert (row["runs"], row["runs_done"], row["status"]) == ("2", "2", "done")
        assert float(row["lr"]) == pytest.approx(1e-3)
        assert float(row["weight_decay"]) == pytest.approx(1e-5)
        assert 0.0 <= float(row["test_accuracy_mean"]) <= 1.0
        assert float(row["test_accuracy_std"]) >= 0.0
        assert math.isfinite(float(row["test_loss_mean"]))
        assert float(row["epochs"]) == 2.0
        assert float(row["seconds_mean"]) > 0
    accs = [
        t.user_attrs["test_accuracy"]
        for run in ("tiny/baseline", "tiny/baseline/r1")
        for t in _final_trials(sqlite_url, run)
    ]
    assert float(rows[0]["test_accuracy_mean"]) == pytest.approx(sum(accs) / 2)
    assert rows[1]["change"] == "one-hot BCE"
    # BCE's test loss is the one-hot BCE: well below ln 2 once trained a little.
    assert float(rows[1]["test_loss_mean"]) < math.log(2)
    md = (tmp_path / "table" / "ablation.md").read_text()
    assert md in done.stdout
    assert "| baseline | baseline | lr 0.001, weight_decay 1e-05 |" in md
    assert "50.00 %" in md  # the reported accuracy, beside the measured one
    assert "(2 of 2 runs)" in md


def test_bad_config_is_one_line_and_stores_nothing(tmp_path: Path, sqlite_url: str) -> None:
    config = _write(tmp_path, TINY_ABLATION.replace("model.fc_layers = 2", "model.fc_layer = 2"))
    proc = babysit(
        "ablate",
        "--config",
        str(config),
        "--storage",
        sqlite_url,
        "--quiet",
        cwd=tmp_path,
        env=cli_env(OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "babysit: variant 'bce': unknown config key 'model.fc_layer'"
    ), proc.stderr
    assert proc.stdout == ""
    storage = open_storage(sqlite_url, tmp_path / "art")
    assert run_names(storage) == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.split("[[variants]]")[0], "has no variants"),
        (
            lambda t: t.replace("reported = 0.5", "reported = 0.5\nsett = {}"),
            "unknown key 'sett' in variant 'baseline'",
        ),
        (
            lambda t: t.replace("repeats = 2", "repeats = 2\nseeds = 3"),
            "unknown key 'seeds' in [ablation]",
        ),
        (
            lambda t: t.replace("params = {lr = 1e-3, weight_decay = 1e-5}", ""),
            "give ablation.params",
        ),
        (lambda t: t.replace("weight_decay = 1e-5}", "wd = 1e-5}"), "exactly lr and weight_decay"),
        (lambda t: t.replace('mode = "final"', 'mode = "full"'), "ablation.params is for mode"),
        (lambda t: t.replace('name = "bce"', 'name = "baseline"'), "two variants are named"),
        (lambda t: t.replace('name = "bce"', 'name = "b c e"'), "needs a name"),
        (lambda t: t.replace('loss = "bce"', 'loss = "hinge"'), "unknown loss 'hinge'"),
        (lambda t: t.replace('loss = "bce"', 'name = "x"'), "cannot change the run name"),
    ],
)
def test_bad_configs_are_usage_errors(tmp_path: Path, edit, message: str) -> None:  # noqa: ANN001
    config = _write(tmp_path, edit(TINY_ABLATION))
    with pytest.raises(UsageError) as err:
        load_ablation(config)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_run_names_seeds_and_override_order(tmp_path: Path) -> None:
    config = _write(tmp_path, TINY_ABLATION.replace("repeats = 2", "repeats = 3"))
    ablation = load_ablation(
        config, ["seed=7", "model.fc_width=64", "loss=ce", "model.fc_layers=3"]
    )
    names = [(v.name, k, s.name, s.seed) for v, k, s in ablation.runs]
    assert names == [
        ("baseline", 0, "tiny/baseline", 7),
        ("baseline", 1, "tiny/baseline/r1", 8),
        ("baseline", 2, "tiny/baseline/r2", 9),
        ("bce", 0, "tiny/bce", 7),
        ("bce", 1, "tiny/bce/r1", 8),
        ("bce", 2, "tiny/bce/r2", 9),
    ]
    base = ablation.runs[0][2]
    bce = ablation.runs[3][2]
    # --set beats the file; the variant's own change beats --set.
    assert base.model.fc_width == bce.model.fc_width == 64
    assert (base.loss, base.model.fc_layers) == ("ce", 3)
    assert (bce.loss, bce.model.fc_layers) == ("bce", 2)
    assert ablation.variants[1].sets == {"loss": "bce", "model.fc_layers": 2}
    assert ablation.variants[0].change == "baseline"


def test_seed_000_study_file() -> None:
    ablation = load_ablation(ROOT / "studies" / "alexnet-ablation.toml")
    assert ablation.mode == "final" and ablation.repeats == 1
    by_name = {v.name: (v, s) for v, _, s in ablation.runs}
    assert list(by_name) == [
        "baseline",
        "4-conv",
        "3-conv",
        "2-fc",
        "1-fc",
        "leaky-relu",
        "bce",
        "3-conv-bce",
    ]
    for variant, spec in by_name.values():
        assert variant.params == {"lr": 1e-4, "weight_decay": 5e-4}
        assert (spec.dataset, spec.optimizer, spec.batch_size) == ("cifar10", "adam", 128)
        assert spec.model.geometry == "alexnet227" and spec.final.epochs == 10
    assert by_name["4-conv"][1].model.conv_layers == 4
    assert by_name["1-fc"][1].model.fc_layers == 1
    assert by_name["leaky-relu"][1].model.activation == "leaky_relu"
    best = by_name["3-conv-bce"][1]
    assert (best.model.conv_layers, best.loss) == (3, "bce")
    assert by_name["3-conv-bce"][0].reported == pytest.approx(0.8137)
    assert by_name["baseline"][0].reported == pytest.approx(0.70)


def test_full_mode_runs_the_protocol_per_variant(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(
        tmp_path,
        """
dataset = "digits"
batch_size = 64
[model]
conv_layers = 3
fc_layers = 2
fc_width = 64
[overfit]
steps = 150
[coarse]
trials = 2
epochs = 1
lr = [1e-3, 3e-3]
extend = false
[fine]
trials = 1
epochs = 1
[final]
epochs = 1
[ablation]
name = "whole"
mode = "full"
[[variants]]
name = "small"
""",
    )
    storage = open_storage(sqlite_url, tmp_path / "art")
    code = run_ablation(config, storage, sets=[], device="cpu", out=tmp_path / "t", quiet=True)
    out = capsys.readouterr().out
    assert code == 0, out
    with open(tmp_path / "t" / "ablation.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["status"] == "done"
    # The whole protocol: the searches' epochs come on top of the final one.
    assert float(row["epochs_spent"]) > float(row["epochs"]) == 1.0
    assert "epochs spent" in out
    study = optuna.load_study(study_name="whole/small/coarse", storage=storage.rdb)
    assert len(study.trials) == 2
