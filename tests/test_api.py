"""The Python API (babysit.run, babysit.load_run) and the documented example, as written."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from torch import nn

import babysit
from babysit.errors import ProtocolError
from babysit.errors import UsageError
from babysit.record.artifacts import study_spec
from babysit.storage import open_storage
from tests.conftest import ROOT
from tests.conftest import babysit as babysit_cli
from tests.conftest import cli_env
from tests.test_plugins import write_module

ENV = {"OMP_NUM_THREADS": "1"}
BUDGET = {
    "batch_size": 32,
    "overfit": {"steps": 100, "lrs": {"adam": [3e-3, 1e-2]}},
    # Exactly 3 coarse trials, as the tests count them: no extra round at an edge.
    "coarse": {"trials": 3, "epochs": 1, "lr": [1e-3, 3e-2], "extend": False},
    "fine": {"trials": 2, "epochs": 1},
    "final": {"epochs": 2},
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # In-process runs: one thread, as the subprocess runs get OMP_NUM_THREADS=1.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randint(0, 60, (n, 1, 10, 10), generator=g, dtype=torch.uint8)
    x[y == 1, :, :5, :] += 150
    x[y == 0, :, 5:, :] += 150
    return x, y


@pytest.mark.slow
def test_python_objects_run_in_process_and_load_run_reads_them_back(tmp_path: Path) -> None:
    # Defined inside the test: not importable by module:qualname, so stored as python:...
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        head = nn.Linear(8 * 4, num_classes)
        nn.init.normal_(head.weight, std=0.01)
        return nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            head,
        )

    data = {
        "classes": ["low", "high"],
        "train": _blobs(128, 0),
        "val": _blobs(32, 1),
        "test": _blobs(32, 2),
    }
    db = tmp_path / "api.db"
    summary = babysit.run(model=build, data=data, storage=db, name="nb", quiet=True, **BUDGET)
    assert summary["name"] == "nb" and summary["num_classes"] == 2
    assert summary["model"].startswith("python:")
    assert summary["model"].endswith(
        "test_python_objects_run_in_process_and_load_run_reads_them_back.<locals>.build"
    )
    assert summary["dataset"] == "python:data[2 classes, 128/32/32]"
    assert summary["wall_seconds"] > 0
    assert summary["stages"]["coarse"]["trials"] == 3
    assert summary["stages"]["final"]["status"] == "passed"
    assert summary["data"]["loader"] == "tensor"

    run = babysit.load_run("nb", db)
    assert set(run.studies) == {"sanity", "overfit", "coarse", "fine", "final"}
    assert all(isinstance(s, optuna.Study) for s in run.studies.values())
    assert run.spec.final.epochs == 2 and run.spec.coarse.trials == 3
    stored = run.summary
    assert stored["stages"] == summary["stages"]
    assert run.best_params == summary["stages"]["final"]["params"]
    df = run.trials_dataframe()
    assert isinstance(df, pd.DataFrame)
    assert df["stage"].value_counts()["coarse"] == 3
    assert len(df) == sum(len(s.trials) for s in run.studies.values())
    net = run.model()
    out = net(torch.zeros(4, 1, 10, 10))
    assert out.shape == (4, 2) and not net.training

    # A worker elsewhere cannot rebuild objects that lived in this process: one line, exit 2.
    proc = babysit_cli(
        "worker", "--name", "nb", "--storage", f"sqlite:///{db}", cwd=tmp_path, env=cli_env(**ENV)
    )
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "was a Python object given to babysit.run() in another process" in lines[0]
    assert "module:callable" in lines[0]

    # Rerunning the same call resumes: nothing is trained twice.
    before = len(df)
    again = babysit.run(model=build, data=data, storage=db, name="nb", quiet=True, **BUDGET)
    assert again["stages"]["final"]["test_accuracy"] == summary["stages"]["final"]["test_accuracy"]
    assert len(babysit.load_run("nb", str(db)).trials_dataframe()) == before


@pytest.mark.slow
def test_references_and_datasets_stream_through_the_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(tmp_path, "usermods_api")
    monkeypatch.chdir(tmp_path)
    summary = babysit.run(
        model="usermods_api:build",
        data="usermods_api:pil_blobs",
        storage=f"sqlite:///{tmp_path / 'b.db'}",
        quiet=True,
        **BUDGET,
    )
    # Datasets of PIL images: the DataLoader path, with the worker count the loader asked.
    assert summary["name"] == "usermods_api-pil_blobs"
    assert summary["data"]["loader"] == "streaming"
    assert summary["data"]["loader_workers"] == 1
    assert summary["data"]["in_channels"] == 1
    assert summary["stages"]["final"]["status"] == "passed"
    spec = babysit.load_run(summary["name"], tmp_path / "b.db").spec
    assert spec.model.name == "usermods_api:build" and spec.dataset == "usermods_api:pil_blobs"
    # The loader's worker processes ended with the run, not with this Python session.
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_tensor_data_forced_through_the_dataloader_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """BABYSIT_STREAM=1 stands in for data too large to preload: the whole protocol runs
    on batches from DataLoader worker processes."""
    write_module(tmp_path, "usermods_stream")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BABYSIT_STREAM", "1")
    monkeypatch.setenv("BABYSIT_LOADER_WORKERS", "1")
    summary = babysit.run(
        model="usermods_stream:build",
        data="usermods_stream:blobs",
        storage=tmp_path / "s.db",
        name="streamed",
        quiet=True,
        **BUDGET,
    )
    err = capsys.readouterr().err
    assert "data: streamed from torch Datasets by a DataLoader with 1 worker process" in err
    assert summary["data"]["loader"] == "streaming"
    assert summary["data"]["loader_workers"] == 1
    assert summary["data"]["stream_forced"] == "BABYSIT_STREAM"
    assert summary["stages"]["overfit"]["status"] == "passed"
    assert summary["stages"]["final"]["status"] == "passed"
    # Every stage trained on the streamed splits: whole epochs, as on the tensor path.
    assert summary["epochs_by_stage"]["coarse"] == pytest.approx(3.0)
    assert summary["epochs_by_stage"]["final"] == pytest.approx(2.0)


def test_a_failed_check_raises_with_the_summary(tmp_path: Path) -> None:
    def loud(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))
        nn.init.normal_(net[1].weight, std=10.0)
        return net

    data = {
        "classes": ["low", "high"],
        "train": _blobs(64, 0),
        "val": _blobs(16, 1),
        "test": _blobs(16, 2),
    }
    with pytest.raises(ProtocolError, match="sanity failed") as err:
        babysit.run(
            model=loud, data=data, storage=tmp_path / "f.db", name="loud", quiet=True, **BUDGET
        )
    assert err.value.summary["stages"]["sanity"]["status"] == "failed"
    assert err.value.summary["stages"]["overfit"]["status"] == "skipped"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"coarse": {"trails": 3}}, "unknown config key 'coarse.trails'"),
        ({"dataset": "digits"}, "takes 'dataset' as data="),
        ({"arch": {"fc_width": 64}}, "takes 'arch' as model_options="),
        ({"data": 42}, "data must be a dataset name"),
        ({"model": 3.5}, "model must be 'alexnet'"),
        ({"data": {"classes": ["a"]}}, "is not a dataset"),
        ({"model": lambda n, c, s: nn.Linear(1, n), "jobs": 2}, "cannot rebuild the Python"),
        ({"model": "nosuch_module_for_api:build"}, "cannot import model module"),
    ],
)
def test_bad_input_raises_usage_error_before_anything_is_stored(
    tmp_path: Path, kwargs: dict, words: str
) -> None:
    db = tmp_path / "bad.db"
    with pytest.raises(UsageError) as err:
        babysit.run(storage=db, quiet=True, **kwargs)
    assert words in str(err.value)
    if db.exists():
        assert all(s.n_trials == 0 for s in optuna.get_all_study_summaries(f"sqlite:///{db}"))


def test_load_run_of_an_unknown_name(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    optuna.create_study(study_name="other/sanity", storage=f"sqlite:///{db}")
    with pytest.raises(UsageError, match="no run named 'ghost'"):
        babysit.load_run("ghost", db)


def _blocks(markdown: str, heading: str, lang: str) -> str:
    """The first ```lang block after ``heading`` in the markdown."""
    section = markdown[markdown.index(heading) :]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match, f"no {lang} block after {heading}"
    return match.group(1)


@pytest.mark.slow
def test_the_documented_example_runs_as_written(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "own-network.md").read_text()
    shell = _blocks(doc, "### The example", "sh")
    python = _blocks(doc, "### From Python", "python")
    shutil.copytree(
        ROOT / "examples",
        tmp_path / "examples",
        ignore=shutil.ignore_patterns("__pycache__", "shapes", "*.db*", "*.json"),
    )
    env = cli_env(**ENV)
    # `python` and `babysit` as a user of this checkout has them: the project's venv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(
        ["bash", "-e", "-c", shell],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "examples" / "shapes.json").read_text())
    assert summary["model"] == "tinynet:build" and summary["dataset"] == "imagefolder"
    assert summary["data"]["files"] == 300 and summary["data"]["skipped_files"] == 0
    assert summary["stages"]["final"]["status"] == "passed"
    # The shapes are easy for the tiny CNN: chance is 1/3.
    assert summary["stages"]["final"]["test_accuracy"] > 0.6
    assert "final" in proc.stdout and "passed" in proc.stdout  # babysit status

    proc = subprocess.run(
        [sys.executable, "-c", python],
        cwd=tmp_path / "examples",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert 0.0 <= float(first) <= 1.0
    assert "lr" in proc.stdout and "weight_decay" in proc.stdout
    url = f"sqlite:///{tmp_path / 'examples' / 'babysit.db'}"
    run = optuna.load_study(study_name="shapes-py/final", storage=url)
    spec = study_spec(open_storage(url, None, create=False), run)
    assert spec["model"]["name"] == "tinynet:build"  # importable: workers can join
