from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from babysit.record.artifacts import study_spec
from babysit.storage import open_storage
from tests.conftest import ROOT
from tests.conftest import TINY
from tests.conftest import babysit
from tests.conftest import cli_env
from tests.conftest import popen

BROKEN_MODEL = '''
import torch
from torch import nn
from babysit.training.models import AlexNet


class Loud(nn.Module):
    """AlexNet with logits scaled 50x: a last layer initialised far too large."""

    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.net = AlexNet(num_classes, in_channels=in_channels, fc_width=128)

    def forward(self, x):
        return 50.0 * self.net(x)


def build(num_classes, in_channels, image_size):
    return Loud(num_classes, in_channels)


def wrong_width(num_classes, in_channels, image_size):
    return AlexNet(num_classes + 1, in_channels=in_channels, fc_width=64)


def not_a_module(num_classes, in_channels, image_size):
    return "a string"
'''

CONSTANT_DATA = '''
import torch


def load():
    """Every image is the same grey square with a random label: nothing can be memorised."""
    g = torch.Generator().manual_seed(0)
    def part(n):
        return (torch.full((n, 1, 8, 8), 128, dtype=torch.uint8),
                torch.randint(0, 4, (n,), generator=g))
    return {"classes": ["a", "b", "c", "d"], "train": part(80), "val": part(20),
            "test": part(20)}
'''


def _summary(path: Path) -> dict:
    return json.loads(path.read_text())


def _counts(db: Path, study: str) -> dict[str, int]:
    s = optuna.load_study(study_name=study, storage=f"sqlite:///{db}")
    out: dict[str, int] = {}
    for t in s.get_trials():
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


@pytest.mark.slow
def test_full_run_end_to_end_then_rerun_skips(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    proc = babysit("run", *TINY, "--summary-json", str(summary_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "babysit.db").exists()
    s = _summary(summary_path)
    for key in ("name", "dataset", "num_classes", "wall_seconds", "epochs_spent", "stages"):
        assert key in s
    assert s["name"] == "digits" and s["num_classes"] == 10
    st = s["stages"]
    assert st["sanity"]["status"] == "passed"
    assert st["sanity"]["expected_loss"] == pytest.approx(2.302585, abs=1e-5)
    assert st["overfit"]["status"] == "passed" and st["overfit"]["train_accuracy"] == 1.0
    assert st["coarse"]["trials"] == 4
    assert st["coarse"]["complete"] + st["coarse"]["diverged"] + st["coarse"]["pruned"] == 4
    assert st["fine"]["trials"] == 2
    # Narrowing clips to the coarse range [1e-3, 0.1], unless a coarse trial diverged in
    # the good region: then fine stays below half that lr (docs/protocol.md, "Divergence bounds
    # the search"), under the coarse range if it must.
    lo, hi = st["fine"]["range"]["lr"]
    ceiling = st["fine"]["narrowing"]["ceiling"]
    if ceiling is None:
        assert lo >= 1e-3 - 1e-12 and hi <= 0.1 + 1e-12
    else:
        assert hi <= ceiling["diverged_lr"] / 10**0.3 * (1 + 1e-9)
        assert hi == pytest.approx(ceiling["max_lr"])
    assert st["final"]["status"] == "passed" and st["final"]["epochs"] == 2
    assert 0.0 <= st["final"]["test_accuracy"] <= 1.0
    assert set(st["final"]["params"]) == {"lr", "weight_decay"}
    assert s["epochs_spent"] > 0
    # The verdicts and the way to the dashboard are printed for people.
    assert "sanity passed" in proc.stderr and "dashboard" in proc.stderr
    # The closing lines headline the test accuracy, validation beside it, then the model.
    final = st["final"]
    assert (
        f"test accuracy {final['test_accuracy']:.4f} at epoch {final['best_epoch']} of 2 "
        f"(val {final['val_accuracy']:.4f}), test loss {final['test_loss']:.4f};"
    ) in proc.stderr
    assert "final passed: test accuracy" in proc.stderr
    store = tmp_path / "babysit.db.artifacts"
    model_path = store / "digits" / "model.pt"
    assert final["model_path"] == str(model_path.resolve())
    assert f"model: {final['model_path']} " in proc.stderr
    # Only the model is left of the final: its checkpoint is removed once the final passed.
    final_study = optuna.load_study(
        study_name="digits/final", storage=f"sqlite:///{tmp_path / 'babysit.db'}"
    )
    checkpoint = final_study.user_attrs["checkpoint"]
    assert "artifact_id" not in checkpoint and checkpoint["epoch"] == 2
    assert not (store / checkpoint["deleted"]).exists()
    assert not list(store.glob("digits-final-*"))
    # The usage page's example loads it as written, in a fresh process, as a user would.
    readme = (ROOT / "docs" / "usage.md").read_text()
    section = readme[readme.index("### The result and the model") :]
    example = re.search(r"```python\n(.*?)```", section, re.S)
    assert example and 'babysit.load_model("babysit.db.artifacts/digits/model.pt")' in (
        example.group(1)
    )
    loaded = subprocess.run(
        [sys.executable, "-c", example.group(1)],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert re.fullmatch(r"tensor\(\[\d\]\)", loaded.stdout.strip()), loaded.stdout

    # Every stage study carries the spec, so storage alone rebuilds the run.
    study = optuna.load_study(
        study_name="digits/coarse", storage=f"sqlite:///{tmp_path / 'babysit.db'}"
    )
    storage = open_storage(f"sqlite:///{tmp_path / 'babysit.db'}", None, create=False)
    assert study_spec(storage, study)["coarse"]["trials"] == 4
    intermediate = [t.intermediate_values for t in study.trials if t.state == TrialState.COMPLETE]
    assert all(v for v in intermediate)

    before = {
        stage: _counts(tmp_path / "babysit.db", f"digits/{stage}")
        for stage in ("sanity", "overfit", "coarse", "fine", "final")
    }
    t0 = time.perf_counter()
    again = babysit("run", *TINY, "--summary-json", str(summary_path), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    after = {
        stage: _counts(tmp_path / "babysit.db", f"digits/{stage}")
        for stage in ("sanity", "overfit", "coarse", "fine", "final")
    }
    assert after == before  # nothing ran twice
    assert time.perf_counter() - t0 < 60
    rerun = _summary(summary_path)["stages"]["final"]
    assert rerun["test_accuracy"] == st["final"]["test_accuracy"]
    # The rerun needed no checkpoint: the finished final is read from storage.
    assert rerun["model_path"] == final["model_path"] and model_path.is_file()

    status = babysit("status", "--name", "digits", cwd=tmp_path)
    assert status.returncode == 0
    assert "coarse" in status.stdout and "4 of 4 trials finished: " in status.stdout
    as_json = json.loads(babysit("status", "--name", "digits", "--json", cwd=tmp_path).stdout)
    assert as_json["stages"]["coarse"]["trials"] == 4


@pytest.mark.slow
def test_broken_model_fails_sanity_with_a_diagnosis(tmp_path: Path) -> None:
    (tmp_path / "netmods.py").write_text(BROKEN_MODEL)
    proc = babysit(
        "run",
        "--model",
        "netmods:build",
        *TINY,
        "--summary-json",
        str(tmp_path / "s.json"),
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr
    assert "sanity failed" in proc.stderr
    assert "expected 2.30" in proc.stderr and "last layer" in proc.stderr
    assert "Traceback" not in proc.stderr
    s = _summary(tmp_path / "s.json")
    assert s["stages"]["sanity"]["status"] == "failed"
    assert s["stages"]["sanity"]["initial_loss"] > 4.0
    assert s["stages"]["overfit"]["status"] == "skipped"

    forced = babysit("run", "--model", "netmods:build", *TINY, "--force", cwd=tmp_path)
    # --force carries on past sanity (the overfit check may then fail on its own).
    assert "continuing because of --force" in forced.stderr


@pytest.mark.slow
def test_unlearnable_labels_fail_overfit(tmp_path: Path) -> None:
    (tmp_path / "constdata.py").write_text(CONSTANT_DATA)
    proc = babysit(
        "run",
        "--dataset",
        "constdata:load",
        *TINY,
        "--set",
        "overfit.steps=30",
        "--set",
        "overfit.samples=12",
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr
    assert "overfit failed" in proc.stderr and "could not memorise 12 examples" in proc.stderr
    db = tmp_path / "babysit.db"
    assert _counts(db, "constdata-load/overfit") == {"COMPLETE": 4}  # every LR was tried


def _one_line_error(proc) -> str:  # noqa: ANN001
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--optimizer", "rmsprop"], "unknown optimizer 'rmsprop'"),
        (["--model", "resnet"], "unknown model 'resnet'"),
        (["--model", "nosuchmodule:build"], "cannot import model module"),
        (["--storage", "not a url"], "cannot parse storage URL"),
        (["--storage", "sqlite:////no/such/folder/x.db"], "does not exist"),
        (["--storage", "postgresql+psycopg://u:hunter2@127.0.0.1:1/db"], "cannot open storage"),
        (["--set", "coarse.trials=lots"], "expects int"),
        (["--set", "coarse.nonsense=1"], "unknown config key"),
        (["--frobnicate"], "unrecognized arguments"),
    ],
)
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], words: str) -> None:
    line = _one_line_error(babysit("run", *args, "--quiet", cwd=tmp_path))
    assert words in line
    assert "hunter2" not in line


def test_bad_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[coarse]\ntrials = "twenty"\n')
    assert "expects int" in _one_line_error(babysit("run", "--config", str(cfg), cwd=tmp_path))
    cfg.write_text("[coarse\n")
    assert "not valid TOML" in _one_line_error(babysit("run", "--config", str(cfg), cwd=tmp_path))


@pytest.mark.slow
def test_bad_user_models_are_caught_before_training(tmp_path: Path) -> None:
    (tmp_path / "netmods.py").write_text(BROKEN_MODEL)
    line = _one_line_error(babysit("run", "--model", "netmods:wrong_width", cwd=tmp_path))
    assert "expected (2, 10)" in line
    line = _one_line_error(babysit("run", "--model", "netmods:not_a_module", cwd=tmp_path))
    assert "not a torch nn.Module" in line


@pytest.mark.slow
def test_reused_name_with_other_spec_is_refused_and_nothing_is_touched(tmp_path: Path) -> None:
    db = tmp_path / "babysit.db"
    first = babysit("run", *TINY, "--name", "r1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = {s: _counts(db, f"r1/{s}") for s in ("coarse", "fine", "final")}
    with sqlite3.connect(db) as con:
        rows_before = con.execute("select count(*) from trials").fetchone()[0]
    line = _one_line_error(
        babysit("run", *TINY, "--name", "r1", "--set", "coarse.trials=6", cwd=tmp_path)
    )
    assert "different spec" in line and "coarse.trials" in line
    assert {s: _counts(db, f"r1/{s}") for s in ("coarse", "fine", "final")} == before
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from trials").fetchone()[0] == rows_before


def _wait_for(predicate, timeout: float = 120.0) -> None:  # noqa: ANN001
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def _finished_coarse(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        s = optuna.load_study(study_name="k/coarse", storage=f"sqlite:///{db}")
    except (KeyError, Exception):  # noqa: BLE001 - the study may not exist yet
        return 0
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in s.get_trials())


def _running_coarse(db: Path) -> bool:
    s = optuna.load_study(study_name="k/coarse", storage=f"sqlite:///{db}")
    return any(t.state == TrialState.RUNNING and "worker" in t.user_attrs for t in s.get_trials())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_resume_after_a_stop_in_the_middle_of_coarse(tmp_path: Path, sig: int) -> None:
    db = tmp_path / "babysit.db"
    args = [
        "run",
        "--name",
        "k",
        *TINY,
        "--set",
        "coarse.trials=6",
        "--set",
        "coarse.epochs=2",
        "--set",
        'coarse.pruner="none"',
    ]
    proc = popen(*args, cwd=tmp_path)

    # Stopped while a trial trains: two finished and a third under way.
    def mid_trial() -> bool:
        assert proc.poll() is None, proc.communicate()[1]  # the run ended before the stop
        return _finished_coarse(db) >= 2 and _running_coarse(db)

    _wait_for(mid_trial, timeout=300)  # sanity, overfit and two trials on a busy machine
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert "Rerun the same command" in err
    storage = f"sqlite:///{db}"
    stopped = optuna.load_study(study_name="k/coarse", storage=storage).get_trials()
    kept = {
        t.number: (t.state, t.params, t.value)
        for t in stopped
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    }
    assert len(kept) >= 2
    cut = [t for t in stopped if t.state != TrialState.COMPLETE and t.number not in kept]
    if sig == signal.SIGINT:
        # Ctrl-C: the trial it stopped is stored FAIL with its reason, at once.
        assert [(t.state, t.user_attrs.get("reason")) for t in cut] == [
            (TrialState.FAIL, "interrupted")
        ]

    again = babysit(*args, "--summary-json", str(tmp_path / "s.json"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    said = [ln for ln in again.stderr.splitlines() if "was interrupted" in ln]
    if sig == signal.SIGINT:
        # The resume says so, once.
        assert said == [
            f"coarse: trial {cut[0].number} was interrupted; a new trial takes its place"
        ]
    else:
        assert said == []  # a killed process's trial is reclaimed as "worker died"
    trials = optuna.load_study(study_name="k/coarse", storage=storage).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 6  # topped up to the target, not beyond
    for number, (state, params, value) in kept.items():
        t = trials[number]
        assert (t.state, t.params, t.value) == (state, params, value)  # never re-run
    # The interrupted trial is marked, not left RUNNING.
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert len(interrupted) <= 1
    assert len({(t.params["lr"], t.params["weight_decay"]) for t in finished}) == 6
    assert _summary(tmp_path / "s.json")["stages"]["final"]["status"] == "passed"


@pytest.mark.slow
def test_jobs_share_the_searches_between_processes(tmp_path: Path) -> None:
    summary_path = tmp_path / "s.json"
    proc = babysit(
        "run",
        "--name",
        "j",
        *TINY,
        "--set",
        "coarse.trials=6",
        "--jobs",
        "2",
        "--summary-json",
        str(summary_path),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "starting 1 worker process beside" in proc.stderr
    db = f"sqlite:///{tmp_path / 'babysit.db'}"
    trials = optuna.load_study(study_name="j/coarse", storage=db).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 6
    assert len({t.number for t in trials}) == len(trials)
    fine = optuna.load_study(study_name="j/fine", storage=db).get_trials()
    workers = {t.user_attrs["worker"] for t in finished + fine if "worker" in t.user_attrs}
    assert len(workers) == 2  # both processes trained trials
    final = optuna.load_study(study_name="j/final", storage=db).get_trials()
    assert [t.state for t in final if t.user_attrs.get("reason") != "surplus"] == [
        TrialState.COMPLETE
    ]
    assert _summary(summary_path)["stages"]["coarse"]["trials"] == 6


def test_an_interrupt_in_a_trial_is_its_stored_reason_and_said_once_on_resume() -> None:
    from types import SimpleNamespace

    from babysit.parallel.coordination import claim
    from babysit.parallel.coordination import fill
    from babysit.parallel.interrupts import interrupted_last
    from babysit.stages.study import say_interrupted

    study = optuna.create_study(direction="maximize")
    calls = {"n": 0}

    def objective(trial: optuna.Trial) -> float:
        claim(study, trial, 3, "coarse")
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # what the CLI's SIGINT handler raises
        return 0.5

    with pytest.raises(KeyboardInterrupt):
        fill(study, 3, objective)
    trials = study.get_trials()
    assert [(t.state, t.user_attrs.get("reason")) for t in trials] == [
        (TrialState.COMPLETE, None),
        (TrialState.FAIL, "interrupted"),
    ]
    assert [t.number for t in interrupted_last(trials)] == [1]

    lines: list[str] = []
    ctx = SimpleNamespace(storage=SimpleNamespace(url="memory:test-interrupt"), log=lines.append)
    say_interrupted(ctx, study, "coarse")
    say_interrupted(ctx, study, "coarse")  # the stage opened again in the same run
    assert lines == ["coarse: trial 1 was interrupted; a new trial takes its place"]

    fill(study, 3, objective)  # the resume tops the stage up with new trials
    trials = study.get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert interrupted_last(trials) == []  # later trials replaced it: nothing to say again
