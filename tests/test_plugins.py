"""The user's own network and data through the real CLI: module:callable models and
datasets, tensor and Dataset splits, workers that cannot import them, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch

from babysit.data import DataError
from babysit.data import DataRequest
from babysit.data.streaming import DatasetSplits
from babysit.data.user import load_user_dataset
from babysit.errors import UsageError
from babysit.record.artifacts import study_spec
from babysit.spec import DataSpec
from babysit.storage import open_storage
from babysit.training.user_model import build_user_model
from tests.conftest import babysit
from tests.conftest import cli_env
from tests.conftest import popen

# One thread per process: the test machine's cores are shared, and OpenMP threads that
# spin-wait on a busy core make each step of a tiny network 10x slower, not faster.
ENV = {"OMP_NUM_THREADS": "1"}

# Budgets for a tiny CNN on 192 training images: seconds per stage.
USER_TINY = [
    "--set",
    "batch_size=32",
    "--set",
    "overfit.steps=100",
    "--set",
    "overfit.lrs={adam=[3e-3,1e-2]}",
    "--set",
    "coarse.trials=3",
    "--set",
    "coarse.epochs=1",
    "--set",
    "coarse.lr=[1e-3,3e-2]",
    "--set",
    "coarse.extend=false",
    "--set",
    "fine.trials=2",
    "--set",
    "fine.epochs=1",
    "--set",
    "final.epochs=2",
    "--quiet",
]

USER_MODULE = '''
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset


def build(num_classes, in_channels, image_size):
    """A tiny CNN: the user's own network."""
    head = nn.Linear(16 * 3 * 3, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(3), nn.Flatten(), head)


def _part(n, seed, channels=1):
    """Grey 12x12 noise with one bright horizontal band; the band's place is the class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randint(0, 60, (n, channels, 12, 12), generator=g, dtype=torch.uint8)
    for c in range(3):
        x[y == c, :, c * 4:(c + 1) * 4, :] += 150
    return x, y


def blobs():
    return {"classes": ["top", "middle", "bottom"], "train": _part(192, 0),
            "val": _part(48, 1), "test": _part(48, 2)}


class PilBlobs(Dataset):
    """The same images as PIL images, made one by one as a disk-backed Dataset would."""

    def __init__(self, n, seed):
        self.x, self.y = _part(n, seed)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return Image.fromarray(self.x[i, 0].numpy(), mode="L"), int(self.y[i])


def pil_blobs(data_dir, seed):
    return {"classes": ["top", "middle", "bottom"], "train": PilBlobs(192, 0),
            "val": PilBlobs(48, 1), "test": PilBlobs(48, 2), "num_workers": 1}


def two_args(num_classes, in_channels):
    return build(num_classes, in_channels, 12)


def wrong_width(num_classes, in_channels, image_size):
    return build(num_classes + 2, in_channels, image_size)


def three_args(a, b, c):
    return blobs()


def bad_labels():
    data = blobs()
    x, y = data["val"]
    data["val"] = (x, y + 5)
    return data


class BadLabels(PilBlobs):
    def __getitem__(self, i):
        img, label = super().__getitem__(i)
        return img, label + 3


def bad_dataset_labels():
    return {"classes": ["top", "middle", "bottom"], "train": BadLabels(64, 0),
            "val": PilBlobs(16, 1), "test": PilBlobs(16, 2)}


def crashes():
    raise FileNotFoundError("/data/blobs.npz")


def wrong_type():
    return [1, 2, 3]
'''


def write_module(folder: Path, name: str = "usermods") -> Path:
    path = folder / f"{name}.py"
    path.write_text(USER_MODULE)
    return path


def _summary(path: Path) -> dict:
    return json.loads(path.read_text())


def _one_line(proc) -> str:  # noqa: ANN001
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("babysit: ")
    return lines[0]


@pytest.mark.slow
def test_user_model_and_tensor_dataset_then_a_worker_without_the_module(tmp_path: Path) -> None:
    home = tmp_path / "project"
    home.mkdir()
    write_module(home)
    db = home / "babysit.db"
    proc = babysit(
        "run",
        "--name",
        "mine",
        "--model",
        "usermods:build",
        "--dataset",
        "usermods:blobs",
        *USER_TINY,
        "--summary-json",
        str(home / "s.json"),
        cwd=home,
        env=cli_env(**ENV),
    )
    assert proc.returncode == 0, proc.stderr
    s = _summary(home / "s.json")
    assert s["model"] == "usermods:build" and s["dataset"] == "usermods:blobs"
    assert s["num_classes"] == 3
    assert s["data"]["loader"] == "tensor"
    assert s["data"]["in_channels"] == 1 and s["data"]["image_size"] == 12
    assert s["stages"]["sanity"]["status"] == "passed"
    assert s["stages"]["overfit"]["status"] == "passed"
    assert s["stages"]["coarse"]["trials"] == 3 and s["stages"]["fine"]["trials"] == 2
    assert s["stages"]["final"]["status"] == "passed"
    # The spec in storage names the reference, so another machine imports the same thing.
    study = optuna.load_study(study_name="mine/coarse", storage=f"sqlite:///{db}")
    spec = study_spec(open_storage(f"sqlite:///{db}", None, create=False), study)
    assert spec["model"]["name"] == "usermods:build"

    elsewhere = tmp_path / "other-machine"
    elsewhere.mkdir()
    line = _one_line(
        babysit(
            "worker",
            "--name",
            "mine",
            "--storage",
            f"sqlite:///{db}",
            cwd=elsewhere,
            env=cli_env(**ENV),
        )
    )
    assert "cannot import" in line and "'usermods'" in line
    assert "PYTHONPATH" in line and "install it" in line


BAD_INPUTS = [
    (
        ["--dataset", "nosuch_data_module:load"],
        "cannot import dataset module 'nosuch_data_module'",
    ),
    (["--model", "usermods:two_args"], "must accept (num_classes, in_channels, image_size)"),
    (["--model", "usermods:wrong_width"], "outputs (2, 5) for 2 images; expected (2, 3)"),
    (["--dataset", "usermods:bad_labels"], "val labels fall outside 0..2"),
    (["--dataset", "usermods:bad_dataset_labels"], "train labels fall outside 0..2"),
]


@pytest.mark.slow
def test_bad_user_input_is_one_line_and_exit_2_before_training(tmp_path: Path) -> None:
    write_module(tmp_path)
    # The model checks need a dataset that loads; the dataset checks use the default model.
    # Side by side to save the start-up time, each with its own SQLite file: processes that
    # create one fresh file's schema at the same moment race each other.
    procs = []
    for i, (args, _) in enumerate(BAD_INPUTS):
        extra = ["--dataset", "usermods:blobs"] if args[0] == "--model" else []
        procs.append(
            popen(
                "run",
                *extra,
                *args,
                "--quiet",
                "--storage",
                f"sqlite:///{tmp_path / f'bad{i}.db'}",
                cwd=tmp_path,
                env=cli_env(**ENV),
            )
        )
    for proc, (args, words) in zip(procs, BAD_INPUTS, strict=True):
        _, err = proc.communicate(timeout=300)
        proc.stderr = err
        assert words in _one_line(proc), (args, err)
    # Nothing was stored: a refused run leaves no database file behind.
    assert not list(tmp_path.glob("bad*.db"))


def _request(tmp_path: Path) -> DataRequest:
    return DataRequest(data_dir=tmp_path, seed=0, download=False, options=DataSpec())


def test_datasets_returned_by_a_callable_take_the_streaming_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(tmp_path, "usermods_ds")
    monkeypatch.chdir(tmp_path)
    splits = load_user_dataset("usermods_ds:pil_blobs", _request(tmp_path))
    assert isinstance(splits, DatasetSplits)
    splits.check("usermods_ds:pil_blobs")
    assert splits.num_workers == 1
    assert splits.shape == (1, 12, 12) and splits.sizes() == {"train": 192, "val": 48, "test": 48}
    assert splits.sample.dtype == torch.uint8 and splits.sample.shape == (192, 1, 12, 12)
    with pytest.raises(DataError, match="train labels fall outside 0..2"):
        load_user_dataset("usermods_ds:bad_dataset_labels", _request(tmp_path)).check("x")


@pytest.mark.parametrize(
    "ref, words",
    [
        ("usermods_bad:three_args", "must take no arguments or (data_dir, seed)"),
        ("usermods_bad:crashes", "failed while loading: FileNotFoundError: /data/blobs.npz"),
        ("usermods_bad:wrong_type", "returned list; return babysit's Splits"),
        ("usermods_bad", "is not of the form module:callable"),
        ("usermods_bad:missing", "has no attribute 'missing'"),
    ],
)
def test_bad_dataset_callables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ref: str, words: str
) -> None:
    write_module(tmp_path, "usermods_bad")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as err:
        load_user_dataset(ref, _request(tmp_path))
    assert words in str(err.value)


def test_an_import_error_inside_the_users_module_names_the_missing_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "needs_timm.py").write_text(
        "import timm_not_installed_here\ndef build(a, b, c):\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        UsageError, match="imports 'timm_not_installed_here', which is not installed here"
    ):
        build_user_model("needs_timm:build", 3, 1, 12)


@pytest.mark.parametrize(
    "item, words",
    [
        (torch.zeros(1, 12, 12, dtype=torch.uint8), "items must be (image, label) pairs"),
        ((torch.zeros(1, 12, 12), 0), "images must be uint8 tensors (C, H, W) or PIL images"),
        (("a picture", 0), "got str"),
        ((torch.zeros(1, 12, 10, dtype=torch.uint8), 0), "images must be square"),
        ((torch.zeros(1, 12, 12, dtype=torch.uint8), 0.5), "labels must be ints"),
    ],
)
def test_dataset_items_are_checked_on_a_sample(item: object, words: str) -> None:
    class Same(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> object:
            return item

    splits = DatasetSplits(classes=["a", "b"], train=Same(), val=Same(), test=Same())
    with pytest.raises(DataError) as err:
        splits.check("mine:load")
    assert words in str(err.value) and "dataset mine:load" in str(err.value)
