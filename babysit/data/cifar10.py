"""CIFAR-10 from the published files under ``--data-dir``; downloads only when asked.

Both published layouts are read here without torchvision: ``cifar-10-batches-py/``
(pickles, the layout torchvision's ``root`` holds) and ``cifar-10-batches-bin/``
(records of 1 label byte + 3072 pixel bytes). torchvision's reader is not used because its
checksum check rejects any tree that is not byte-for-byte the published one, and its
``pickle.load`` would run whatever code a tampered file holds.
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from babysit.data.core import DataError
from babysit.data.core import DataRequest
from babysit.data.core import DatasetEntry
from babysit.data.core import Splits
from babysit.data.core import register
from babysit.data.core import say_download

PY_FOLDER = "cifar-10-batches-py"
BIN_FOLDER = "cifar-10-batches-bin"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
# The published md5s of cifar-10-python.tar.gz's members (torchvision.datasets.CIFAR10's
# train_list / test_list / meta), kept here so checking them needs no torchvision import.
PUBLISHED_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
_PIXELS = 3 * 32 * 32
_RECORD = 1 + _PIXELS


def _numpy_reconstruct() -> Any:
    # numpy 2 moved the module to numpy._core; touching numpy.core there warns.
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    return multiarray._reconstruct


# Everything a CIFAR pickle references: numpy array reconstruction, nothing that runs code.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(module, name) from None


def _how_to_get(data_dir: Path) -> str:
    return (
        "`babysit run` downloads it (about 170 MB) unless --offline or BABYSIT_OFFLINE=1, "
        f"or copy {PY_FOLDER}/ (from cifar-10-python.tar.gz) into {data_dir}"
    )


def _unpickle(path: Path, data_dir: Path) -> dict[Any, Any]:
    try:
        with open(path, "rb") as fh:
            # encoding="bytes" as in the official loader: the files were written by Python 2.
            obj = _CifarUnpickler(fh, encoding="bytes").load()
    except _RefusedGlobal as err:
        raise DataError(
            f"refused to unpickle {path}: it holds code ({err.qualname}), not CIFAR data; "
            f"delete {path.parent} and {_how_to_get(data_dir)}"
        ) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        UnicodeDecodeError,
    ) as err:
        raise DataError(
            f"{path} is not a readable CIFAR-10 batch ({type(err).__name__}: {err}); "
            f"{_how_to_get(data_dir)}"
        ) from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{path} is not a CIFAR-10 batch (a {type(obj).__name__}, expected a dict); "
            f"{_how_to_get(data_dir)}"
        )
    return obj


def _field(batch: dict[Any, Any], key: str) -> Any:
    if key.encode() in batch:
        return batch[key.encode()]
    return batch.get(key)


def _read_py_batch(path: Path, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path, data_dir)
    data = _field(batch, "data")
    labels = _field(batch, "labels")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != _PIXELS:
        shape = getattr(data, "shape", None)
        raise DataError(
            f"{path}: 'data' must be an (N, {_PIXELS}) array, found {shape}; "
            f"{_how_to_get(data_dir)}"
        )
    if labels is None or len(labels) != data.shape[0]:
        raise DataError(
            f"{path}: {data.shape[0]} images but "
            f"{'no' if labels is None else len(labels)} labels; {_how_to_get(data_dir)}"
        )
    y = np.asarray(labels, dtype=np.int64)
    return _checked(path, data, y, data_dir)


def _read_bin_batch(path: Path, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    if raw.size == 0 or raw.size % _RECORD:
        raise DataError(
            f"{path} is truncated or not a CIFAR-10 binary batch: {raw.size} bytes is not a "
            f"multiple of {_RECORD} (1 label byte + {_PIXELS} pixels); {_how_to_get(data_dir)}"
        )
    records = raw.reshape(-1, _RECORD)
    return _checked(path, records[:, 1:], records[:, 0].astype(np.int64), data_dir)


def _checked(
    path: Path, data: np.ndarray, y: np.ndarray, data_dir: Path
) -> tuple[np.ndarray, np.ndarray]:
    if data.dtype != np.uint8:
        raise DataError(f"{path}: pixels must be uint8, found {data.dtype}")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(
            f"{path}: labels outside 0..9 ({int(y.min())}..{int(y.max())}); "
            f"{_how_to_get(data_dir)}"
        )
    # Rows are 1024 red, 1024 green, 1024 blue values: already channel-first.
    return np.ascontiguousarray(data).reshape(-1, 3, 32, 32), y


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _class_names(folder: Path, layout: str, data_dir: Path) -> list[str]:
    # The names only label reports; a missing or odd meta file falls back to the known ten.
    if layout == "python":
        meta = folder / "batches.meta"
        if meta.is_file():
            names = _field(_unpickle(meta, data_dir), "label_names")
            if isinstance(names, list) and len(names) == 10:
                return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    else:
        meta = folder / "batches.meta.txt"
        if meta.is_file():
            names = [line.strip() for line in meta.read_text(errors="replace").splitlines()]
            names = [n for n in names if n]
            if len(names) == 10:
                return names
    return list(CLASSES)


def _layouts(data_dir: Path) -> list[tuple[str, Path, list[str]]]:
    return [
        ("python", data_dir / PY_FOLDER, TRAIN_BATCHES + [TEST_BATCH]),
        ("binary", data_dir / BIN_FOLDER, [f"{b}.bin" for b in TRAIN_BATCHES + [TEST_BATCH]]),
    ]


def _find(data_dir: Path) -> tuple[str, Path, list[str]] | None:
    """The first layout with every batch file present, python before binary."""
    for layout, folder, files in _layouts(data_dir):
        if all((folder / name).is_file() for name in files):
            return layout, folder, files
    return None


def _missing_error(data_dir: Path) -> DataError:
    for _layout, folder, files in _layouts(data_dir):
        if folder.is_dir():
            missing = [name for name in files if not (folder / name).is_file()]
            return DataError(
                f"CIFAR-10 in {folder} is incomplete: missing {', '.join(missing)}; "
                f"{_how_to_get(data_dir)}"
            )
    py_files = ", ".join(TRAIN_BATCHES + [TEST_BATCH])
    return DataError(
        f"CIFAR-10 not found: expected {data_dir / PY_FOLDER}/ ({py_files}) or "
        f"{data_dir / BIN_FOLDER}/ (the same names + .bin); {_how_to_get(data_dir)}"
    )


def download(data_dir: Path, quiet: bool = False) -> Path:
    """Fetch the python version with torchvision into a temporary folder, then move it in.

    A download that fails half-way leaves nothing behind, so the next run does not find a
    half-written ``cifar-10-batches-py/`` and trust it.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".cifar10-download-", dir=data_dir))
    except OSError as err:
        raise DataError(f"cannot create {data_dir} for the download: {err}") from None
    target = data_dir / PY_FOLDER
    say_download("CIFAR-10", "about 170 MB", data_dir, quiet)
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(root=str(staging), train=True, download=True)
        fetched = staging / PY_FOLDER
        if target.exists():
            # An incomplete folder from an earlier copy: set it aside, dropped with staging.
            target.rename(staging / "replaced")
        fetched.rename(target)
    except Exception as err:  # noqa: BLE001 - network, disk and checksum errors alike
        raise DataError(
            f"CIFAR-10 download into {data_dir} failed ({type(err).__name__}: {err}); "
            f"check the connection, or copy {PY_FOLDER}/ into {data_dir}"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _val_indices(y: np.ndarray, n_val: int, seed: int) -> np.ndarray:
    """Stratified by class with an exact total: each class gives ~n_val/n of its images.

    Within each class the images are ranked by a seeded permutation; the n_val images with
    the smallest within-class quantile go to validation.
    """
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(y.size, generator=gen).numpy()
    quantile = np.empty(y.size, dtype=np.float64)
    for label in np.unique(y):
        members = perm[y[perm] == label]
        quantile[members] = (np.arange(members.size) + 0.5) / members.size
    # A stable sort of the quantiles in permutation order breaks ties by the permutation.
    order = perm[np.argsort(quantile[perm], kind="stable")]
    return np.sort(order[:n_val])


def load(request: DataRequest) -> Splits:
    data_dir = Path(request.data_dir)
    found = _find(data_dir)
    if found is None and request.download:
        download(data_dir, quiet=request.quiet)
        found = _find(data_dir)
    if found is None:
        raise _missing_error(data_dir)
    layout, folder, _files = found
    warns: list[str] = []
    info: dict[str, Any] = {"source": str(folder), "format": layout}
    if layout == "python":
        differ = [
            name
            for name, expected in PUBLISHED_MD5.items()
            if (folder / name).is_file() and _md5(folder / name) != expected
        ]
        if differ:
            info["md5_mismatch"] = differ
            warns.append(
                f"{len(differ)} file(s) in {folder} differ from the published CIFAR-10 files "
                f"(md5 mismatch: {', '.join(differ)}); loading them anyway"
            )
    read = _read_py_batch if layout == "python" else _read_bin_batch
    suffix = "" if layout == "python" else ".bin"
    train = [read(folder / f"{name}{suffix}", data_dir) for name in TRAIN_BATCHES]
    test_x, test_y = read(folder / f"{TEST_BATCH}{suffix}", data_dir)
    x = np.concatenate([b[0] for b in train])
    y = np.concatenate([b[1] for b in train])

    requested = int(request.options.val_size)
    if requested < 1:
        raise DataError(f"data.val_size must be at least 1, got {requested}")
    # Tiny trees (tests, a trimmed copy) would otherwise leave no training images.
    cap = max(1, y.size // 5)
    n_val = min(requested, cap)
    info["val_size"] = n_val
    if n_val < requested:
        info["val_size_capped"] = {"requested": requested, "used": n_val}
        warns.append(
            f"data.val_size {requested} would leave too few of the {y.size} training "
            f"images; using {n_val} (a fifth) for validation"
        )
    val = _val_indices(y, n_val, request.seed)
    keep = np.ones(y.size, dtype=bool)
    keep[val] = False
    for message in warns:
        warnings.warn(message, stacklevel=2)
    info["warnings"] = warns

    def _t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    return Splits(
        classes=_class_names(folder, layout, data_dir),
        train_x=_t(x[keep]),
        train_y=_t(y[keep]),
        val_x=_t(x[val]),
        val_y=_t(y[val]),
        test_x=_t(test_x),
        test_y=_t(test_y),
        info=info,
    )


def describe(data_dir: Path) -> dict[str, Any]:
    data_dir = Path(data_dir)
    found = _find(data_dir)
    folder = found[1] if found else data_dir / PY_FOLDER
    return {
        "present": found is not None,
        "where": str(folder),
        "format": found[0] if found else None,
        "image": "3x32x32",
        "files": [f"{PY_FOLDER}/{name}" for name in TRAIN_BATCHES + [TEST_BATCH]]
        + [f"{BIN_FOLDER}/{name}.bin" for name in TRAIN_BATCHES + [TEST_BATCH]],
    }


register(
    DatasetEntry(
        name="cifar10",
        summary="CIFAR-10, 10 classes, 45k/5k/10k train/val/test (files under --data-dir)",
        load=load,
        describe=describe,
    )
)
