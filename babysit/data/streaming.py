"""The Dataset path: splits too large to preload, streamed to the device by a DataLoader.

A dataset callable may return torch ``Dataset``s instead of tensors: ``{"classes": [...],
"train": Dataset, "val": Dataset, "test": Dataset}``, each item ``(image, label)`` with the
image a uint8 tensor (C, H, W) or a PIL image and the label an int. Decoding then runs in
DataLoader worker processes; only the uint8 batch crosses to the device, where
augmentation and normalisation run batched exactly as on the tensor path, through the same
:class:`~babysit.data.augment.Preprocess`.

``BABYSIT_STREAM=1`` sends a tensor dataset down this path too (to try it, or to test it
on data that would fit in memory); ``BABYSIT_LOADER_WORKERS=N`` sets the worker processes.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Iterator
from collections.abc import Sequence
from collections.abc import Sized
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset
from torch.utils.data import IterableDataset
from torch.utils.data import Sampler

from babysit.data.augment import Preprocess
from babysit.data.core import DataError
from babysit.data.core import Splits

STREAM_ENV = "BABYSIT_STREAM"
WORKERS_ENV = "BABYSIT_LOADER_WORKERS"
# Train items read at load time to check the data and to compute the normalisation
# statistics: 256 images give each channel's mean to well under 1 % on natural images.
STATS_SAMPLE = 256
# Items of val and test read at load time, only to check them.
CHECK_SAMPLE = 32
# head(n) reads a fixed shuffle, not the first n items: Datasets such as torchvision's
# ImageFolder list their items class by class.
_HEAD_SEED = 0
_SPLITS = ("train", "val", "test")
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def stream_forced() -> bool:
    return os.environ.get(STREAM_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _default_workers() -> int:
    # Leave one core to the training process itself; more than 4 rarely pays for
    # decoding small images.
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def _workers(asked: int | None) -> int:
    env = os.environ.get(WORKERS_ENV, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            raise DataError(f"{WORKERS_ENV} must be a whole number, got '{env}'") from None
        if value < 0:
            raise DataError(f"{WORKERS_ENV} must be 0 or more, got {value}")
        return value
    return _default_workers() if asked is None else asked


def _length(ds: Dataset) -> int:
    # torch's Dataset declares no __len__ (iterable ones have none); check() has refused
    # any split without one, so every Dataset that gets here is Sized.
    assert isinstance(ds, Sized), f"{type(ds).__name__} has no len()"
    return len(ds)


def _is_image(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(obj, Image.Image)


def image_channels(img: Any) -> int:
    """Channels an item's image will have: a tensor's own, 1 for grey PIL images, else 3."""
    if isinstance(img, torch.Tensor):
        return 1 if img.dim() == 2 else int(img.shape[0])
    if _is_image(img):
        return 1 if img.mode in _GREY_MODES else 3
    return 0


def to_uint8_image(img: Any, channels: int, where: str) -> torch.Tensor:
    """One item's image as uint8 (C, H, W); PIL images converted to L or RGB."""
    if isinstance(img, torch.Tensor):
        t = img.unsqueeze(0) if img.dim() == 2 else img
        if t.dtype != torch.uint8 or t.dim() != 3:
            raise DataError(
                f"{where}: images must be uint8 tensors (C, H, W) or PIL images, "
                f"got a {t.dtype} tensor of shape {tuple(img.shape)}"
            )
        return t
    if _is_image(img):
        arr = np.array(img.convert("L" if channels == 1 else "RGB"))
        t = torch.from_numpy(arr)
        return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()
    raise DataError(
        f"{where}: images must be uint8 tensors (C, H, W) or PIL images, got {type(img).__name__}"
    )


def _label(value: Any, where: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    raise DataError(f"{where}: labels must be ints (class indices), got {value!r}")


class _Collate:
    """Items -> (uint8 batch, int64 labels), checked; runs in the DataLoader's workers."""

    def __init__(
        self, source: str, split: str, channels: int, shape: tuple[int, ...], num_classes: int
    ) -> None:
        self.source = source
        self.split = split
        self.channels = channels
        self.shape = shape
        self.num_classes = num_classes

    def __call__(self, items: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        where = f"dataset {self.source}: {self.split}"
        xs = []
        ys = []
        for item in items:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise DataError(
                    f"{where} items must be (image, label) pairs, got {type(item).__name__}"
                )
            x = to_uint8_image(item[0], self.channels, where)
            if tuple(x.shape) != self.shape:
                raise DataError(
                    f"{where} images differ in shape: {tuple(x.shape)} and "
                    f"{self.shape}; make the Dataset return one size"
                )
            xs.append(x)
            ys.append(_label(item[1], where))
        y = torch.tensor(ys, dtype=torch.int64)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise DataError(
                f"{where} labels fall outside 0..{self.num_classes - 1} "
                f"({self.num_classes} classes)"
            )
        return torch.stack(xs), y


class TensorItems(Dataset):
    """A tensor split seen as a Dataset of (uint8 image, int label): BABYSIT_STREAM=1."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


@dataclass
class DatasetSplits:
    """Three map-style Datasets and their classes: what the loaders return on this path."""

    classes: list[str]
    train: Dataset
    val: Dataset
    test: Dataset
    info: dict[str, Any] = field(default_factory=dict)
    # DataLoader worker processes asked for by the dataset (None: babysit's default).
    num_workers: int | None = None
    # Set by check(): what every item looks like, and the train sample for the statistics.
    shape: tuple[int, ...] = ()
    sample: torch.Tensor | None = None
    source: str = ""

    @classmethod
    def from_tensors(cls, splits: Splits) -> DatasetSplits:
        return cls(
            classes=list(splits.classes),
            train=TensorItems(splits.train_x, splits.train_y),
            val=TensorItems(splits.val_x, splits.val_y),
            test=TensorItems(splits.test_x, splits.test_y),
            info=dict(splits.info),
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.shape[-1])

    def sizes(self) -> dict[str, int]:
        return {part: len(getattr(self, part)) for part in _SPLITS}

    def collate(self, split: str) -> _Collate:
        return _Collate(self.source, split, self.in_channels, self.shape, self.num_classes)

    def check(self, source: str) -> None:
        """Read a sample of each split: pairs of same-sized square images and labels within
        the classes. Keeps the train sample for the normalisation statistics."""
        self.source = source
        if len(self.classes) < 2:
            raise DataError(f"dataset {source}: needs at least 2 classes, got {self.classes}")
        for part in _SPLITS:
            ds = getattr(self, part)
            if isinstance(ds, IterableDataset) or not hasattr(ds, "__getitem__"):
                raise DataError(
                    f"dataset {source}: {part} must be a map-style Dataset "
                    "(__len__ and __getitem__); iterable datasets are not supported"
                )
            try:
                n = len(ds)
            except TypeError:
                raise DataError(f"dataset {source}: {part} Dataset has no len()") from None
            if n == 0:
                raise DataError(f"dataset {source}: the {part} split is empty")
        gen = torch.Generator().manual_seed(_HEAD_SEED)
        picks = {
            "train": torch.randperm(_length(self.train), generator=gen)[:STATS_SAMPLE].tolist(),
            "val": list(range(min(CHECK_SAMPLE, _length(self.val)))),
            "test": list(range(min(CHECK_SAMPLE, _length(self.test)))),
        }
        items = {
            part: [_fetch(getattr(self, part), i, source, part) for i in idx]
            for part, idx in picks.items()
        }
        for part, got in items.items():
            for item in got:
                if not isinstance(item, (tuple, list)) or len(item) != 2:
                    raise DataError(
                        f"dataset {source}: {part} items must be (image, label) "
                        f"pairs, got {type(item).__name__}"
                    )
        channels = {image_channels(item[0]) for part in items.values() for item in part}
        channels.discard(0)
        # Grey and colour PIL images mixed: everything becomes RGB, as ImageFolder does.
        c = 3 if 3 in channels else (channels.pop() if channels else 3)
        first = to_uint8_image(items["train"][0][0], c, f"dataset {source}: train[0]")
        self.shape = tuple(first.shape)
        if self.shape[1] != self.shape[2]:
            raise DataError(
                f"dataset {source}: images must be square, got "
                f"{self.shape[1]}x{self.shape[2]}; resize them in the Dataset"
            )
        for part in _SPLITS:
            x, _ = self.collate(part)(items[part])
            if part == "train":
                self.sample = x


def _fetch(ds: Dataset, i: int, source: str, part: str) -> Any:
    try:
        return ds[i]
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's __getitem__ failed
        raise DataError(
            f"dataset {source}: {part}[{i}] raised {type(err).__name__}: {err}"
        ) from None


def stream_if_asked(splits: Splits | DatasetSplits, source: str) -> Splits | DatasetSplits:
    """BABYSIT_STREAM=1: tensor splits go through the DataLoader path as well."""
    if isinstance(splits, Splits) and stream_forced():
        streamed = DatasetSplits.from_tensors(splits)
        streamed.info["stream_forced"] = STREAM_ENV
        streamed.check(source)
        return streamed
    return splits


class _EpochSampler(Sampler[int]):
    """A permutation per epoch from a seed set just before the epoch starts.

    Lives in the main process, so a persistent worker pool needs no restart to see it.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.seed = 0

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


class StreamingData:
    """DeviceData's interface over Datasets: batches come from DataLoader workers."""

    def __init__(
        self,
        splits: DatasetSplits,
        pre: Preprocess,
        device: torch.device,
        num_workers: int | None = None,
    ) -> None:
        self.splits = splits
        self.pre = pre.to(device)
        self.num_classes = splits.num_classes
        self.num_workers = _workers(num_workers if num_workers is not None else splits.num_workers)
        self._device = device
        self._loaders: dict[tuple[str, int], DataLoader] = {}
        self._sampler = _EpochSampler(_length(splits.train))
        self._head: tuple[torch.Tensor, torch.Tensor] | None = None
        self._val_labels: torch.Tensor | None = None

    @classmethod
    def from_splits(
        cls, splits: DatasetSplits, pre: Preprocess, device: torch.device
    ) -> StreamingData:
        return cls(splits, pre, device)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def train_size(self) -> int:
        return _length(self.splits.train)

    @property
    def in_channels(self) -> int:
        return self.splits.in_channels

    @property
    def image_size(self) -> int:
        return self.splits.image_size

    def size(self, split: str) -> int:
        return len(getattr(self.splits, split))

    def _loader(self, split: str, batch_size: int) -> DataLoader:
        key = (split, batch_size)
        if key not in self._loaders:
            workers = self.num_workers
            self._loaders[key] = DataLoader(
                getattr(self.splits, split),
                batch_size=batch_size,
                sampler=self._sampler if split == "train" else None,
                shuffle=False,
                num_workers=workers,
                collate_fn=self.splits.collate(split),
                pin_memory=self._device.type == "cuda",
                drop_last=False,
                # Workers that outlive an epoch: forking and importing anew every epoch
                # would cost seconds per trial.
                persistent_workers=workers > 0,
            )
        return self._loaders[key]

    def _stream(self, loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        blocking = self._device.type != "cuda"
        try:
            for x, y in loader:
                yield (
                    x.to(self._device, non_blocking=not blocking),
                    y.to(self._device, non_blocking=not blocking),
                )
        except DataError as err:
            # A worker's DataError arrives wrapped in its traceback; keep the message.
            last = str(err).strip().splitlines()[-1]
            raise DataError(last.split("DataError: ", 1)[-1]) from None

    def head(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` training examples from a fixed shuffle of the train set, on the device."""
        if self._head is None or self._head[0].shape[0] < min(n, self.train_size):
            gen = torch.Generator().manual_seed(_HEAD_SEED)
            idx = torch.randperm(self.train_size, generator=gen)[:n].tolist()
            items = [_fetch(self.splits.train, i, self.splits.source, "train") for i in idx]
            x, y = self.splits.collate("train")(items)
            self._head = (x.to(self._device), y.to(self._device))
        return self._head[0][:n], self._head[1][:n]

    def close(self) -> None:
        """Stop the loaders' worker processes now rather than whenever this object is
        collected (a notebook may hold on to it for the whole session)."""
        # Dropping the last reference to a DataLoader shuts its persistent workers down.
        self._loaders.clear()

    def val_labels(self) -> torch.Tensor:
        if self._val_labels is None:
            self._val_labels = torch.cat([y for _, y in self.batches("val", 1024)])
        return self._val_labels

    def train_batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch in an order drawn from ``generator``, so a trial's seed fixes it."""
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
        self._sampler.seed = int(seed)
        yield from self._stream(self._loader("train", batch_size))

    def batches(self, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from self._stream(self._loader(split, batch_size))


def data_facts(splits: Splits | DatasetSplits, data: Any) -> dict[str, Any]:
    """What loading found, for the sanity study's ``data`` attr and the summary: the path
    the data took, the image geometry, and the loader's counts (skipped files, ...)."""
    info = json.loads(json.dumps(splits.info, default=str))
    facts: dict[str, Any] = {
        **info,
        "loader": "streaming" if isinstance(data, StreamingData) else "tensor",
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "input_size": data.pre.resize or data.image_size,
        # The class names, in label order: the model card names its predictions with them.
        "classes": [str(c) for c in splits.classes],
    }
    if isinstance(data, StreamingData):
        facts["loader_workers"] = data.num_workers
    return facts
