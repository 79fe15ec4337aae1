"""The user's own data, ``module:callable``: a Splits, or a mapping of (images,
labels) pairs or torch Datasets, checked and turned into Splits or DatasetSplits.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import Dataset

from babysit.data.core import DataError
from babysit.data.core import DataRequest
from babysit.data.core import Splits
from babysit.data.streaming import DatasetSplits
from babysit.errors import UsageError
from babysit.refs import _accepts
from babysit.refs import resolve


def _as_uint8(x: Any, where: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype != torch.uint8:
        raise DataError(f"{where}: images must be uint8 (N, C, H, W), got {t.dtype}")
    return t


def _call_loader(fn: Callable[..., Any], ref: str, request: DataRequest) -> Any:
    if _accepts(fn, 2):
        args: tuple[Any, ...] = (request.data_dir, request.seed)
    elif _accepts(fn, 0):
        args = ()
    else:
        raise UsageError(f"dataset '{ref}' must take no arguments or (data_dir, seed)")
    try:
        return fn(*args)
    except UsageError:
        raise
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the user's loader failed
        raise UsageError(
            f"dataset '{ref}' failed while loading: {type(err).__name__}: {err}"
        ) from None


def load_user_dataset(ref: str, request: DataRequest) -> Splits | DatasetSplits:
    result = _call_loader(resolve(ref, "dataset"), ref, request)
    if isinstance(result, (Splits, DatasetSplits)):
        return result
    if isinstance(result, Mapping) and {"train", "val", "test"} <= set(result):
        return _from_mapping(ref, result)
    raise UsageError(
        f"dataset '{ref}' returned {type(result).__name__}; return babysit's "
        "Splits or {'classes', 'train', 'val', 'test'} with (images, labels) "
        "pairs or torch Datasets"
    )


def as_splits(ref: str, result: Any) -> Splits | DatasetSplits:
    """A Splits or mapping handed over directly (babysit.run(data=...)), as load would."""
    if isinstance(result, (Splits, DatasetSplits)):
        return result
    if isinstance(result, Mapping) and {"train", "val", "test"} <= set(result):
        return _from_mapping(ref, result)
    raise UsageError(
        f"data {type(result).__name__} is not a dataset; give a name, "
        "'module:callable', a callable, babysit's Splits or {'classes', "
        "'train', 'val', 'test'}"
    )


def _from_mapping(ref: str, result: Mapping[str, Any]) -> Splits | DatasetSplits:
    if "classes" in result:
        classes = [str(c) for c in result["classes"]]
    else:
        classes = _infer_classes(ref, result)
    workers = result.get("num_workers")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise DataError(f"dataset '{ref}': num_workers must be an int >= 0, got {workers!r}")
    parts = {part: result[part] for part in ("train", "val", "test")}
    if any(isinstance(p, Dataset) for p in parts.values()):
        from babysit.data.streaming import TensorItems

        datasets: dict[str, Dataset] = {}
        for part, value in parts.items():
            if isinstance(value, Dataset):
                datasets[part] = value
            else:
                x, y = _pair(ref, part, value)
                datasets[part] = TensorItems(x, y)
        return DatasetSplits(
            classes=classes,
            train=datasets["train"],
            val=datasets["val"],
            test=datasets["test"],
            num_workers=workers,
        )
    pairs = {part: _pair(ref, part, value) for part, value in parts.items()}
    splits = Splits(
        classes=classes,
        train_x=pairs["train"][0],
        train_y=pairs["train"][1],
        val_x=pairs["val"][0],
        val_y=pairs["val"][1],
        test_x=pairs["test"][0],
        test_y=pairs["test"][1],
    )
    if result.get("stream"):
        splits.check(ref)
        streamed = DatasetSplits.from_tensors(splits)
        streamed.num_workers = workers
        streamed.info["stream_forced"] = "the dataset's 'stream' key"
        return streamed
    return splits


def _infer_classes(ref: str, result: Mapping[str, Any]) -> list[str]:
    """No "classes" key: the labels are the classes, 0..C-1 with C one past the largest
    label of any split, named by their numbers; said on stderr, since a class that never
    occurs above the largest label seen would go unnoticed."""
    top = -1
    for part in ("train", "val", "test"):
        value = result[part]
        if isinstance(value, Dataset):
            named = getattr(value, "classes", None)
            targets = getattr(value, "targets", None)
            if named is not None:
                top = max(top, len(named) - 1)
                continue
            if targets is None:
                raise DataError(
                    f"dataset '{ref}': no 'classes' given and the {part} Dataset has no "
                    "'classes' or 'targets' to read them from; add 'classes': [names] to "
                    "the mapping"
                )
            labels = torch.as_tensor(targets)
        else:
            labels = _pair(ref, part, value)[1]
        if labels.numel():
            if int(labels.min()) < 0:
                raise DataError(
                    f"dataset '{ref}' {part}: labels must be 0..C-1, found {int(labels.min())}"
                )
            top = max(top, int(labels.max()))
    if top < 1:
        raise DataError(
            f"dataset '{ref}': no 'classes' given and the labels hold fewer "
            "than 2 classes; add 'classes': [names] to the mapping"
        )
    print(
        f"note: dataset '{ref}' gives no 'classes'; the labels define {top + 1} classes, "
        f"named 0..{top} (add 'classes': [names] to the mapping to name them)",
        file=sys.stderr,
    )
    return [str(i) for i in range(top + 1)]


def _pair(ref: str, part: str, value: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise DataError(
            f"dataset '{ref}': '{part}' must be a pair (images, labels) or a "
            f"torch Dataset, got {type(value).__name__}"
        )
    x = _as_uint8(value[0], f"dataset '{ref}' {part}")
    y = torch.as_tensor(value[1])
    if y.is_floating_point():
        raise DataError(f"dataset '{ref}' {part}: labels must be integers, got {y.dtype}")
    return x, y.long()
