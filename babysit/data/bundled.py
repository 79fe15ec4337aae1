"""Datasets that ship inside installed packages, so a run works offline out of the box."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from babysit.data.core import DataRequest
from babysit.data.core import DatasetEntry
from babysit.data.core import Splits
from babysit.data.core import register
from babysit.data.core import seeded_split


def _to_uint8(images: np.ndarray, scale: float) -> torch.Tensor:
    arr = np.clip(np.rint(images * scale), 0, 255).astype(np.uint8)
    return torch.from_numpy(arr).unsqueeze(1).contiguous()


def _split(x: torch.Tensor, y: torch.Tensor, classes: list[str], request: DataRequest) -> Splits:
    opts = request.options
    (trx, try_), (vx, vy), (tex, tey) = seeded_split(
        x, y, opts.val_fraction, opts.test_fraction, request.seed
    )
    return Splits(classes, trx, try_, vx, vy, tex, tey)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images N x 8 x 8, labels), read from the CSV file it ships.

    Read directly: importing ``sklearn.datasets`` (and SciPy with it) adds ~170 MB to the
    resident size of every process that trains, for a 500 kB file (docs/benchmarks.md).
    Falls back to scikit-learn's own loader where the file is not where it ships it.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")  # 64 pixels then the label, per row
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def load_digits(request: DataRequest) -> Splits:
    images, labels = _digits_arrays()
    # Pixel values are 0..16 in scikit-learn's copy.
    x = _to_uint8(images, 255.0 / 16.0)
    y = torch.from_numpy(labels)
    return _split(x, y, [str(d) for d in range(10)], request)


def load_faces(request: DataRequest) -> Splits:
    from skimage.data import lfw_subset

    images = lfw_subset()  # 200 x 25 x 25 in [0, 1]: 100 faces, then 100 non-faces
    x = _to_uint8(images, 255.0)
    y = torch.cat([torch.ones(100, dtype=torch.int64), torch.zeros(100, dtype=torch.int64)])
    return _split(x, y, ["non-face", "face"], request)


def _describe_bundled(package: str) -> Any:
    def describe(_data_dir: Path) -> dict[str, Any]:
        return {"present": True, "where": f"bundled with {package}"}

    return describe


register(
    DatasetEntry(
        name="digits",
        summary="scikit-learn's 8x8 handwritten digits, 10 classes (bundled, offline)",
        load=load_digits,
        describe=_describe_bundled("scikit-learn"),
    )
)
register(
    DatasetEntry(
        name="faces",
        summary="scikit-image's LFW subset: 100 faces vs 100 non-faces, 2 classes (bundled)",
        load=load_faces,
        describe=_describe_bundled("scikit-image"),
    )
)
