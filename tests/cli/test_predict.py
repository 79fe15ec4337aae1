"""`babysit predict` and `babysit.load_model`: a finished run's model on image files.

The run is the session's shared one (``finished_run`` in tests/conftest.py); its test split
is written to PNG files once per module, as a user's images would be.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from PIL import Image

import babysit
from babysit.cli.main import main
from babysit.data import load_dataset
from babysit.data.core import DataRequest
from babysit.data.core import default_data_dir
from babysit.record.stored import stored_spec
from babysit.report.document import write_report
from babysit.report.status import status_lines
from babysit.report.status import statuses
from babysit.storage import open_storage
from tests.conftest import ROOT
from tests.conftest import FinishedRun
from tests.conftest import babysit as cli
from tests.conftest import cli_env
from tests.storage.test_remote import BUCKET
from tests.storage.test_remote import S3_KEYS


@dataclass(frozen=True)
class SplitImages:
    folder: Path  # <folder>/<class>/<i>.png, the run's test split
    files: list[Path]
    labels: list[str]
    classes: list[str]


@pytest.fixture(scope="module")
def split_images(
    finished_run: FinishedRun, tmp_path_factory: pytest.TempPathFactory
) -> SplitImages:
    """The run's test split, loaded as the run loaded it and written to PNG files."""
    spec = stored_spec(open_storage(finished_run.url, None, create=False), finished_run.name)
    request = DataRequest(
        data_dir=default_data_dir(), seed=spec.seed, download=False, options=spec.data
    )
    splits = load_dataset(spec.dataset, request)
    folder = tmp_path_factory.mktemp("images") / "test"
    files, labels = [], []
    for i, (x, y) in enumerate(zip(splits.test_x, splits.test_y, strict=True)):
        label = splits.classes[int(y)]
        (folder / label).mkdir(parents=True, exist_ok=True)
        path = folder / label / f"{i:04d}.png"
        Image.fromarray(x.numpy()[0]).save(path)  # digits: one channel, 8x8
        files.append(path)
        labels.append(label)
    return SplitImages(folder, files, labels, list(splits.classes))


def _model_file(run: FinishedRun) -> Path:
    return run.tmp / "babysit.db.artifacts" / run.name / "model.pt"


def _correct(rows: list[dict], labels: dict[str, str]) -> int:
    return sum(r["class"] == labels[r["path"]] for r in rows)


def _one_line_exit_2(proc) -> None:  # noqa: ANN001
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("babysit: ") and "Traceback" not in proc.stderr


def test_predict_reproduces_the_runs_test_accuracy_to_the_image(
    finished_run: FinishedRun, split_images: SplitImages, tmp_path: Path
) -> None:
    out = tmp_path / "preds.csv"
    proc = cli(
        "predict", "--name", finished_run.name, "--storage", finished_run.url, "--top", "2",
        "--out", str(out), str(split_images.folder), cwd=tmp_path, check=True,
    )  # fmt: skip
    n = len(split_images.files)
    assert n == 269  # digits' test split
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "class", "probability"] + [
        f"prob_{c}" for c in split_images.classes
    ]
    # One line per image on stdout (a folder's images sorted): path, then the two likeliest
    # classes with their probabilities, the first the table's.
    lines = proc.stdout.splitlines()
    assert len(lines) == n
    for line, path, r in zip(lines, sorted(split_images.files), rows, strict=True):
        shown, first, p1, second, p2 = line.split("\t")
        probs = [float(r[f"prob_{c}"]) for c in split_images.classes]
        assert shown == r["path"] == str(path) and first == r["class"] != second
        assert float(p1) >= float(p2) and float(p1) == pytest.approx(max(probs), abs=1e-4)
        assert float(p2) == pytest.approx(float(r[f"prob_{second}"]), abs=1e-4)
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert float(r["probability"]) == max(probs)
    labels = {str(p): y for p, y in zip(split_images.files, split_images.labels, strict=True)}
    test_accuracy = finished_run.final["test_accuracy"]
    assert _correct(rows, labels) == round(test_accuracy * n), (_correct(rows, labels), n)
    assert f"classified {n} images with the model of run {finished_run.name}" in proc.stderr


def test_predict_on_a_copied_run_reads_the_copys_model(
    finished_run: FinishedRun, split_images: SplitImages, tmp_path: Path, capsys
) -> None:
    copy = f"sqlite:///{tmp_path / 'copy.db'}"
    cli(
        "copy", "--name", finished_run.name, "--from", finished_run.url, "--to", copy,
        cwd=tmp_path, check=True,
    )  # fmt: skip
    out = tmp_path / "sub" / "preds.parquet"
    args = ["predict", "--name", finished_run.name, "--storage", copy]
    cli(*args, "--out", str(out), str(split_images.folder), cwd=tmp_path, check=True)
    rows = pd.read_parquet(out).to_dict("records")
    labels = {str(p): y for p, y in zip(split_images.files, split_images.labels, strict=True)}
    n = len(rows)
    assert n == len(split_images.files)
    assert [k for k in rows[0] if k.startswith("prob_")] == [
        f"prob_{c}" for c in split_images.classes
    ]
    assert _correct(rows, labels) == round(finished_run.final["test_accuracy"] * n)
    # The copy's own artifact store is read, not the source's: without it there is no model.
    (tmp_path / "copy.db.artifacts").rename(tmp_path / "moved")
    assert main([*args, str(split_images.files[0])]) == 2
    said = capsys.readouterr().err
    assert len(said.splitlines()) == 1
    assert f"{finished_run.name}/model.pt is not in {tmp_path / 'copy.db.artifacts'}" in said


def test_a_json_table_with_each_class_probability(
    finished_run: FinishedRun, split_images: SplitImages, tmp_path: Path, capsys
) -> None:
    # In this process (main() as `babysit` calls it): the subprocess tests above cost seconds.
    files = split_images.files[:5]
    out = tmp_path / "preds.json"
    args = ["predict", "--name", finished_run.name, "--storage", finished_run.url]
    code = main(
        [*args, "--device", "cpu", "--batch-size", "2", "--out", str(out), *map(str, files)]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    rows = json.loads(out.read_text())
    assert (
        [r["path"] for r in rows] == [str(f) for f in files] == [ln.split("\t")[0] for ln in lines]
    )
    model = babysit.load_model(_model_file(finished_run))
    assert [r["class"] for r in rows] == model.predict(files)
    for r in rows:
        assert list(r["probabilities"]) == split_images.classes
        assert r["probability"] == max(r["probabilities"].values())


def test_load_model_predicts_class_names_from_files_pil_images_and_tensors(
    finished_run: FinishedRun, split_images: SplitImages
) -> None:
    model = babysit.load_model(_model_file(finished_run))
    files = split_images.files[:8]
    names = model.predict([str(f) for f in files])
    assert model.classes == split_images.classes and all(n in model.classes for n in names)
    pil = [Image.open(f) for f in files]
    assert model.predict(pil) == names
    pixels = torch.stack([torch.from_numpy(np.array(p)).unsqueeze(0) for p in pil])
    assert model.predict(pixels) == names  # uint8 (N, C, H, W)
    assert model.predict(pixels.float() / 255) == names  # floats in [0, 1]
    assert model.predict(pixels[0]) == names[:1]  # one (C, H, W) image
    with pytest.raises(babysit.UsageError, match=r"\(1, 3, 8, 8\) does not fit the model"):
        model.predict(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))  # colour, for a grey model
    with pytest.raises(babysit.UsageError, match="cannot classify a dict"):
        model.predict([{}])
    top = model.top(files, k=2)
    assert [t[0][0] for t in top] == names and all(t[0][1] >= t[1][1] for t in top)
    # Still the network: its state_dict is model.pt's, its call gives logits.
    plain = torch.load(_model_file(finished_run), weights_only=True)
    assert set(model.state_dict()) == set(plain)
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_the_model_card(finished_run: FinishedRun) -> None:
    card = json.loads(_model_file(finished_run).with_name("model.json").read_text())
    final = finished_run.final
    assert card["card"] == 2 and card["run"] == finished_run.name
    assert card["classes"] == [str(d) for d in range(10)]
    assert card["num_classes"] == 10 and card["in_channels"] == 1 and card["input_size"] == 8
    pre = card["preprocessing"]
    assert pre["mode"] == "L" and pre["image_size"] == 8 and pre["resize"] == 0
    assert pre["mean"] == card["mean"] and len(pre["std"]) == 1 and 0 < pre["mean"][0] < 1
    assert card["hyperparameters"] == final["params"]
    assert card["best_epoch"] == final["best_epoch"] and card["epochs_run"] == final["epochs"]
    assert card["val_accuracy"] == final["val_accuracy"]
    assert card["test_accuracy"] == final["test_accuracy"]
    assert card["test_loss"] == final["test_loss"]
    sizes = card["dataset"]["sizes"]
    assert card["dataset"]["name"] == "digits" and sizes["test"] == 269
    assert sum(sizes.values()) == 1797  # scikit-learn's digits
    # The batch actually used: the spec says 0 (auto), the final trained with 128.
    assert card["spec"]["batch_size"] == 0 and card["batch_size"] == 128
    assert f"batch {card['batch_size']}," in finished_run.stderr
    assert card["versions"] == {p: version(p) for p in ("babysit", "torch", "optuna")}


def test_an_older_model_json_still_loads(
    finished_run: FinishedRun, split_images: SplitImages, tmp_path: Path
) -> None:
    src = _model_file(finished_run)
    card = json.loads(src.with_name("model.json").read_text())
    shutil.copy(src, tmp_path / "model.pt")
    first = ("spec", "num_classes", "in_channels", "input_size", "mean", "std")
    (tmp_path / "model.json").write_text(json.dumps({k: card[k] for k in first}))
    old = babysit.load_model(tmp_path / "model.pt")
    files = split_images.files[:20]
    assert old.classes == [str(i) for i in range(10)]  # named by label
    assert old.predict(files) == babysit.load_model(src).predict(files)


def test_status_and_report_name_the_model(finished_run: FinishedRun, tmp_path: Path) -> None:
    path = finished_run.final["model_path"]
    assert path == str(_model_file(finished_run).resolve())
    storage = open_storage(finished_run.url, None, create=False)
    lines = status_lines(statuses(storage, finished_run.name)[0])
    assert f"  model    {path}" in lines
    best, epochs = finished_run.final["best_epoch"], finished_run.final["epochs"]
    assert f"at epoch {best} of {epochs}, val" in "\n".join(lines)
    html, _ = write_report(storage, finished_run.name, tmp_path / "rep")
    page = html.read_text()
    assert path in page
    assert f"test accuracy {finished_run.final['test_accuracy']:.4f} at epoch {best} of" in page
    assert f"model: {path} " in finished_run.stderr  # the run's closing lines


def test_bad_input_is_one_line_and_exit_2(
    finished_run: FinishedRun, split_images: SplitImages, tmp_path: Path, capsys
) -> None:
    run = ["--name", finished_run.name, "--storage", finished_run.url]
    image = str(split_images.files[0])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    colour = tmp_path / "colour.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(colour)
    (tmp_path / "empty").mkdir()
    # One through the real command line (no traceback from the process either)...
    in_a_process = {
        f"cannot read image {broken} (UnidentifiedImageError": [str(broken)],
    }
    # ...and the rest through main(), in this process: each subprocess costs seconds.
    in_main = {
        "in colour (RGB) but the model was trained on grey images": [str(colour)],
        f"no run named 'nosuch' in storage {finished_run.url}; runs there: {finished_run.name}": [
            "--name", "nosuch", image
        ],
        "does not exist": [str(tmp_path / "nosuch.png")],
        "holds no images": [str(tmp_path / "empty")],
        "the table is written as .csv, .json, .parquet": [
            "--out", str(tmp_path / "preds.xlsx"), image
        ],
        "--top must be at least 1": ["--top", "0", image],
        "--batch-size must be at least 1": ["--batch-size", "0", image],
    }  # fmt: skip
    before = sorted(p.name for p in tmp_path.iterdir())
    for words, args in in_a_process.items():
        proc = cli("predict", *run, *args, cwd=tmp_path)
        _one_line_exit_2(proc)
        assert words in proc.stderr, (words, proc.stderr)
        assert proc.stdout == ""
    for words, args in in_main.items():
        assert main(["predict", *run, *args]) == 2
        said = capsys.readouterr()
        assert said.out == "" and words in said.err and len(said.err.splitlines()) == 1, said
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no table, no database


def test_a_run_without_a_final_has_no_model(
    split_images: SplitImages, tmp_path: Path, capsys
) -> None:
    url = f"sqlite:///{tmp_path / 'early.db'}"
    optuna.create_study(study_name="early/sanity", storage=url)  # a run stopped early
    proc = cli("predict", "--name", "early", "--storage", url, str(split_images.files[0]),
               cwd=tmp_path)  # fmt: skip
    _one_line_exit_2(proc)
    assert "run 'early' has no trained model: its final stage has not passed" in proc.stderr
    # No database where none was.
    missing = f"sqlite:///{tmp_path / 'no.db'}"
    assert main(["predict", "--name", "early", "--storage", missing, "x.png"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert not (tmp_path / "no.db").exists()


def test_the_readme_example_runs_as_written(
    finished_run: FinishedRun, split_images: SplitImages
) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Classify images with a finished run") :]
    example = re.search(r"```python\n(.*?)```", section, re.S)
    assert example and "babysit.load_model(" in example.group(1)
    # In the run's folder, as a user would: its storage is babysit.db there.
    shutil.copy(split_images.files[0], finished_run.tmp / "digit.png")
    proc = subprocess.run(
        [sys.executable, "-c", example.group(1)],
        cwd=finished_run.tmp,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    model = babysit.load_model(_model_file(finished_run))
    assert proc.stdout.splitlines() == [
        str(split_images.classes),
        str(model.predict([split_images.files[0]])),
    ]


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (real HTTP), as in tests/storage/test_remote.py."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_predict_reads_a_model_on_s3(
    finished_run: FinishedRun,
    split_images: SplitImages,
    tmp_path: Path,
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run copied to a database whose artifacts are on S3 (moto's server, real HTTP):
    the model is read from the bucket, with nothing of it on local disk."""
    import boto3

    from babysit.record.transfer import copy_run

    for key, value in {**S3_KEYS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)  # this process's copy and the command's
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    url, store = f"sqlite:///{tmp_path / 's3.db'}", f"s3://{BUCKET}/team"
    src = open_storage(finished_run.url, None, create=False)
    copy_run(src, open_storage(url, None, artifact_store=store), finished_run.name)
    assert not list(tmp_path.rglob("model.pt"))
    out = tmp_path / "preds.json"
    cli(
        "predict", "--name", finished_run.name, "--storage", url, "--artifact-store", store,
        "--out", str(out), str(split_images.folder), cwd=tmp_path, check=True,
    )  # fmt: skip
    rows = json.loads(out.read_text())
    labels = {str(p): y for p, y in zip(split_images.files, split_images.labels, strict=True)}
    assert len(rows) == len(split_images.files)
    assert _correct(rows, labels) == round(finished_run.final["test_accuracy"] * len(rows))
