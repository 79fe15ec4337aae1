"""CIFAR-10 loading from tiny trees in both published layouts; nothing is downloaded."""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from babysit.data import DataError
from babysit.data import DataRequest
from babysit.data import cifar10
from babysit.data import describe_dataset
from babysit.data import registered
from babysit.spec import DataSpec

PER_BATCH = 20


class _Py2Pickler(pickle._Pickler):
    """Writes pickles the way the published files were written (Python 2 cPickle, protocol 2):
    byte strings as BINSTRING and numpy under its old module name."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_str8(self, obj: Any) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_str8
    dispatch[str] = _save_str8

    def save_global(self, obj: Any, name: str | None = None) -> None:
        name = name or obj.__name__
        module = "numpy.core.multiarray" if name == "_reconstruct" else obj.__module__
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)

    dispatch[type] = save_global


def _py2_dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _batches(seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(seed)
    out = {}
    for name in cifar10.TRAIN_BATCHES + [cifar10.TEST_BATCH]:
        data = rng.integers(0, 256, size=(PER_BATCH, 3072), dtype=np.uint8)
        labels = [i % 10 for i in range(PER_BATCH)]
        rng.shuffle(labels)
        out[name] = (data, labels)
    return out


def _write_py(root: Path, batches: dict, style: str = "py2") -> Path:
    folder = root / cifar10.PY_FOLDER
    folder.mkdir(parents=True)
    for name, (data, labels) in batches.items():
        content = {
            "batch_label": name,
            "labels": labels,
            "data": data,
            "filenames": [f"{name}_{i}.png" for i in range(len(labels))],
        }
        blob = _py2_dumps(content) if style == "py2" else pickle.dumps(content, protocol=4)
        (folder / name).write_bytes(blob)
    meta = {"label_names": list(cifar10.CLASSES), "num_cases_per_batch": PER_BATCH}
    (folder / "batches.meta").write_bytes(_py2_dumps(meta))
    return folder


def _write_bin(root: Path, batches: dict) -> Path:
    folder = root / cifar10.BIN_FOLDER
    folder.mkdir(parents=True)
    for name, (data, labels) in batches.items():
        records = np.concatenate([np.asarray(labels, np.uint8)[:, None], data], axis=1)
        (folder / f"{name}.bin").write_bytes(records.tobytes())
    (folder / "batches.meta.txt").write_text("\n".join(cifar10.CLASSES) + "\n\n")
    return folder


def _request(root: Path, seed: int = 0, val_size: int = 5000, download: bool = False):
    return DataRequest(
        data_dir=root, seed=seed, download=download, options=DataSpec(val_size=val_size)
    )


def _load(root: Path, **kwargs: Any):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny trees never match the published md5s
        return cifar10.load(_request(root, **kwargs))


def _all_train(batches: dict) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([batches[n][0] for n in cifar10.TRAIN_BATCHES])
    y = np.concatenate([batches[n][1] for n in cifar10.TRAIN_BATCHES])
    return x.reshape(-1, 3, 32, 32), y


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.numpy().reshape(x.shape[0], -1)}


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_python_layout_loads_images_labels_and_test_split(tmp_path: Path, style: str) -> None:
    batches = _batches()
    _write_py(tmp_path, batches, style)
    splits = _load(tmp_path, val_size=10)
    splits.check("cifar10")
    assert splits.classes == cifar10.CLASSES
    assert splits.sizes() == {"train": 90, "val": 10, "test": PER_BATCH}
    assert splits.train_x.dtype == torch.uint8 and splits.train_y.dtype == torch.int64
    # The test split is test_batch, in file order, rows reshaped channel-first.
    test_data, test_labels = batches[cifar10.TEST_BATCH]
    assert torch.equal(splits.test_x, torch.from_numpy(test_data.reshape(-1, 3, 32, 32)))
    assert splits.test_y.tolist() == test_labels
    # Red plane first: the first 1024 values of a row are channel 0.
    assert torch.equal(splits.test_x[0, 0].flatten(), torch.from_numpy(test_data[0, :1024]))
    # Every image keeps its own label through the split.
    x, y = _all_train(batches)
    by_image = {img.tobytes(): int(lab) for img, lab in zip(x, y, strict=True)}
    for part in ("train", "val"):
        images = getattr(splits, f"{part}_x").numpy()
        labels = getattr(splits, f"{part}_y").tolist()
        assert [by_image[img.tobytes()] for img in images] == labels
    assert splits.info["format"] == "python"


def test_binary_layout_gives_the_same_splits_as_the_python_layout(tmp_path: Path) -> None:
    batches = _batches(3)
    _write_py(tmp_path / "py", batches)
    _write_bin(tmp_path / "bin", batches)
    a = _load(tmp_path / "py", val_size=10, seed=5)
    b = _load(tmp_path / "bin", val_size=10, seed=5)
    assert b.info["format"] == "binary"
    assert b.classes == cifar10.CLASSES
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_split_is_seeded_disjoint_and_stratified(tmp_path: Path) -> None:
    batches = _batches()
    _write_py(tmp_path, batches)
    a = _load(tmp_path, val_size=20, seed=1)
    again = _load(tmp_path, val_size=20, seed=1)
    other = _load(tmp_path, val_size=20, seed=2)
    assert torch.equal(a.val_x, again.val_x) and torch.equal(a.train_x, again.train_x)
    assert not torch.equal(a.val_x, other.val_x)
    train_rows, val_rows = _rows(a.train_x), _rows(a.val_x)
    assert not train_rows & val_rows
    assert train_rows | val_rows == _rows(torch.from_numpy(_all_train(batches)[0]))
    # 100 images, 10 per class: a stratified 20 takes exactly 2 of each.
    assert torch.bincount(a.val_y, minlength=10).tolist() == [2] * 10


def test_val_size_is_capped_on_tiny_trees_and_the_cap_is_reported(tmp_path: Path) -> None:
    _write_py(tmp_path, _batches())
    with pytest.warns(UserWarning) as record:
        splits = cifar10.load(_request(tmp_path, val_size=5000))
    assert any("val_size 5000" in str(w.message) for w in record)
    assert splits.sizes()["val"] == 20  # a fifth of 100
    assert splits.sizes()["train"] == 80
    assert splits.info["val_size_capped"] == {"requested": 5000, "used": 20}


def test_md5_mismatch_warns_but_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _write_py(tmp_path, _batches())
    with pytest.warns(UserWarning, match="md5 mismatch"):
        splits = cifar10.load(_request(tmp_path, val_size=10))
    assert splits.sizes()["train"] == 90
    flagged = [w for w in splits.info["warnings"] if "md5" in w]
    assert len(flagged) == 1 and str(folder) in flagged[0]
    assert splits.info["md5_mismatch"] == list(cifar10.PUBLISHED_MD5)

    matching = {name: cifar10._md5(folder / name) for name in cifar10.PUBLISHED_MD5}
    monkeypatch.setattr(cifar10, "PUBLISHED_MD5", matching)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = cifar10.load(_request(tmp_path, val_size=10))
    assert clean.info["warnings"] == []
    assert "md5_mismatch" not in clean.info


def test_published_md5s_match_torchvision() -> None:
    from torchvision.datasets import CIFAR10

    published = dict(CIFAR10.train_list + CIFAR10.test_list)
    published[CIFAR10.meta["filename"]] = CIFAR10.meta["md5"]
    assert cifar10.PUBLISHED_MD5 == published


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.target,))

    def __init__(self, target: str) -> None:
        self.target = target


def test_pickle_holding_code_is_refused_and_never_run(tmp_path: Path) -> None:
    folder = _write_py(tmp_path, _batches())
    marker = tmp_path / "pwned"
    evil = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "x": _Evil(str(marker))}
    (folder / "data_batch_3").write_bytes(_py2_dumps(evil))
    with pytest.raises(DataError) as err:
        _load(tmp_path)
    message = str(err.value)
    assert "refused to unpickle" in message
    assert str(folder / "data_batch_3") in message
    assert f"({os.mkdir.__module__}.mkdir)" in message
    assert "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "not a readable"),
        (lambda p: p.write_bytes(_py2_dumps([1, 2, 3])), "expected a dict"),
        (
            lambda p: p.write_bytes(
                _py2_dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4})
            ),
            "(N, 3072)",
        ),
        (
            lambda p: p.write_bytes(
                _py2_dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 3})
            ),
            "4 images but 3 labels",
        ),
        (
            lambda p: p.write_bytes(
                _py2_dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 12]})
            ),
            "outside 0..9",
        ),
    ],
    ids=["truncated", "not-a-dict", "wrong-shape", "label-count", "label-range"],
)
def test_corrupt_python_batch_names_the_file(tmp_path: Path, damage, expected: str) -> None:
    folder = _write_py(tmp_path, _batches())
    damage(folder / "data_batch_2")
    with pytest.raises(DataError, match=str(folder / "data_batch_2")) as err:
        _load(tmp_path)
    assert expected in str(err.value)


def test_truncated_binary_batch_names_the_file(tmp_path: Path) -> None:
    folder = _write_bin(tmp_path, _batches())
    path = folder / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated") as err:
        _load(tmp_path)
    assert str(path) in str(err.value)


def test_missing_tree_says_where_what_and_how(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        _load(tmp_path)
    message = str(err.value)
    assert str(tmp_path / cifar10.PY_FOLDER) in message
    assert "data_batch_1" in message and "test_batch" in message
    assert "downloads it (about 170 MB) unless --offline or BABYSIT_OFFLINE=1" in message
    assert "\n" not in message


def test_incomplete_tree_lists_the_missing_files(tmp_path: Path) -> None:
    folder = _write_py(tmp_path, _batches())
    (folder / "data_batch_4").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="missing data_batch_4, test_batch"):
        _load(tmp_path)


def test_failed_download_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR10

    def broken_download(self: CIFAR10) -> None:
        # Half a tree, then the network drops.
        partial = Path(self.root) / cifar10.PY_FOLDER
        partial.mkdir(parents=True)
        (partial / "data_batch_1").write_bytes(b"\x80\x02half")
        raise OSError("connection reset")

    monkeypatch.setattr(CIFAR10, "download", broken_download)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="download into .* failed .*connection reset"):
        cifar10.load(_request(data_dir, download=True))
    assert list(data_dir.iterdir()) == []


def test_download_moves_the_fetched_tree_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.datasets import CIFAR10

    batches = _batches()

    def fake_download(self: CIFAR10) -> None:
        _write_py(Path(self.root), batches)

    monkeypatch.setattr(CIFAR10, "download", fake_download)
    # Skip what torchvision does after a real download: checksums and reading the files.
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(CIFAR10, "_load_meta", lambda self: None)
    data_dir = tmp_path / "data"
    splits = _load(data_dir, download=True, val_size=10)
    assert splits.sizes() == {"train": 90, "val": 10, "test": PER_BATCH}
    assert sorted(p.name for p in data_dir.iterdir()) == [cifar10.PY_FOLDER]


def test_registered_with_a_describe_that_reports_presence(tmp_path: Path) -> None:
    entry = registered()["cifar10"]
    missing = entry.describe(tmp_path)
    assert missing["present"] is False
    assert missing["where"] == str(tmp_path / cifar10.PY_FOLDER)
    assert missing["image"] == "3x32x32"
    assert "cifar-10-batches-py/data_batch_1" in missing["files"]
    _write_bin(tmp_path, _batches())
    present = entry.describe(tmp_path)
    assert present["present"] is True
    assert present["where"] == str(tmp_path / cifar10.BIN_FOLDER)
    # `babysit datasets` reports the sizes a run stores: those loading gives.
    listed = describe_dataset("cifar10", tmp_path, options=DataSpec(val_size=10))
    assert listed["sizes"] == _load(tmp_path, val_size=10).sizes()
    assert listed["image"] == "3x32x32"


def test_the_listing_says_why_it_has_no_sizes(tmp_path: Path) -> None:
    listed = describe_dataset("cifar10", tmp_path)
    assert listed["sizes"] is None
    assert listed["missing"].startswith("not downloaded: ") and "--offline" in listed["missing"]
    folder = _write_bin(tmp_path, _batches())
    (folder / "data_batch_1.bin").write_bytes(b"not a batch")  # here, but unreadable
    listed = describe_dataset("cifar10", tmp_path)
    assert listed["sizes"] is None and listed["missing"].startswith("cannot be loaded: ")
