"""``imagefolder``: your own images in torchvision's ImageFolder layout.

``DIR/train/<class>/*.png|jpg|...``, with optional ``DIR/val/<class>/`` and
``DIR/test/<class>/``; a split that is missing is carved out of train (stratified, seeded,
``data.val_fraction`` / ``data.test_fraction``). Every image is decoded once, at load,
with PIL: converted
to RGB (or L when every image is grey) and resized (squashed, not cropped) to
``data.patch_size`` x ``data.patch_size``; after that the splits are uint8 tensors like any
other dataset's, and the training loop never sees a file. A file PIL cannot read is
reported by name, skipped, and counted in ``info["skipped_files"]``.
"""

from __future__ import annotations

import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from babysit.data.core import DataError
from babysit.data.core import DataRequest
from babysit.data.core import DatasetEntry
from babysit.data.core import Splits
from babysit.data.core import register
from babysit.data.core import seeded_split

# torchvision's IMG_EXTENSIONS.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SPLITS = ("train", "val", "test")
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
# Names of skipped files kept in info (and so in storage); the count is always exact.
_KEEP_NAMES = 50
_HOW = (
    "give --data-dir DIR with one folder per class under DIR/train/ (e.g. "
    "DIR/train/cat/001.png; optional DIR/val/ and DIR/test/ the same way)"
)


def image_files(folder: Path) -> list[Path]:
    """The images under ``folder`` (any depth) the loader reads, by extension, sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def _class_folders(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _layout(root: Path) -> dict[str, Path]:
    """Which split folders exist: {"train": DIR/train, "val": ..., "test": ...}."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; {_HOW}")
    present = {s: root / s for s in _SPLITS if (root / s).is_dir()}
    if "train" in present:
        return present
    # Class folders straight under DIR are not taken as train: the default data folder
    # holds other datasets' folders, which would pass for classes.
    held = [f"{p.name}/" for p in _class_folders(root)][:5]
    found = f" (it holds {', '.join(held)})" if held else ""
    raise DataError(f"image folder {root} has no train/ folder{found}; {_HOW}")


def _list(split_dir: Path, classes: list[str] | None) -> tuple[list[str], list[Path], list[int]]:
    folders = _class_folders(split_dir)
    if not folders:
        raise DataError(f"{split_dir} has no class folders; {_HOW}")
    names = [f.name for f in folders]
    if classes is None:
        classes = names
    else:
        extra = sorted(set(names) - set(classes))
        if extra:
            raise DataError(
                f"{split_dir} has classes that train/ lacks: {', '.join(extra)}; "
                "every class needs training images"
            )
    files: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        found = image_files(folder)
        if not found:
            raise DataError(
                f"class folder {folder} holds no images "
                f"({', '.join(EXTENSIONS)}); add some or remove the folder"
            )
        files.extend(found)
        labels.extend([classes.index(folder.name)] * len(found))
    return classes, files, labels


def _mode(path: Path) -> str | None:
    """The file's PIL mode from its header alone, or None if PIL cannot identify it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode
    except Exception:  # noqa: BLE001 - any unreadable file is skipped and reported
        return None


def is_grey(mode: str) -> bool:
    """Whether a PIL mode holds grey images (decoded as L rather than RGB)."""
    return mode in _GREY_MODES


def pixels(img: Any, mode: str, size: int) -> np.ndarray:
    """A PIL image as a run sees it: converted to ``mode`` (L or RGB) and squashed to
    ``size`` x ``size`` (bilinear), as (size, size[, 3]) uint8. ``babysit predict`` decodes
    a new image this way too, so it meets the network as the run's images did."""
    from PIL import Image

    img = img.convert(mode)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(img, dtype=np.uint8)


def _decode(path: Path, mode: str, size: int) -> np.ndarray | str:
    """The image as (size, size[, 3]) uint8, or why it could not be read."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            return pixels(opened, mode, size)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        # PIL's own words give the pixel count and the limit (Image.MAX_IMAGE_PIXELS).
        return (
            f"oversized image, not decoded as it may be a decompression bomb: {err} "
            "Shrink it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
        )
    except Exception as err:  # noqa: BLE001 - truncated, corrupt, not an image: skip it
        return f"{type(err).__name__}: {err}"


def _pool() -> ThreadPoolExecutor:
    # PIL releases the GIL while decoding and resizing, so threads decode in parallel.
    return ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))


def load_folder(
    root: Path, size: int, seed: int, val_fraction: float, test_fraction: float
) -> Splits:
    root = Path(root)
    if size < 2:
        raise DataError(f"data.patch_size must be at least 2, got {size}")
    layout = _layout(root)
    classes, files, labels = _list(layout["train"], None)
    if len(classes) < 2:
        raise DataError(
            f"{layout['train']} has one class folder ({classes[0]}); a classifier "
            "needs at least two"
        )
    listed = {"train": (files, labels)}
    for split in ("val", "test"):
        if split in layout:
            _, split_files, split_labels = _list(layout[split], classes)
            listed[split] = (split_files, split_labels)
    everything = [p for f, _ in listed.values() for p in f]
    from PIL import Image

    with warnings.catch_warnings():
        # An image over PIL's pixel limit (a possible decompression bomb) raises instead of
        # printing PIL's raw warning; _decode names the file and it is skipped like a
        # corrupt one. Filters are process-wide, so the pool's threads see this one too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with _pool() as pool:
            modes = list(pool.map(_mode, everything))
        readable = [m for m in modes if m is not None]
        mode = "L" if readable and all(is_grey(m) for m in readable) else "RGB"
        with _pool() as pool:
            decoded = list(pool.map(lambda p: _decode(p, mode, size), everything))
    skipped: list[str] = []
    arrays: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    at = 0
    for split, (paths, ys) in listed.items():
        keep_x: list[np.ndarray] = []
        keep_y: list[int] = []
        for path, label in zip(paths, ys, strict=True):
            out = decoded[at]
            at += 1
            if isinstance(out, str):
                skipped.append(f"{path.relative_to(root)} ({out})")
            else:
                keep_x.append(out)
                keep_y.append(label)
        arrays[split] = (keep_x, keep_y)
    if skipped:
        shown = "; ".join(skipped[:5]) + (
            f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        )
        print(
            f"imagefolder: skipped {len(skipped)} unreadable file(s): {shown}",
            file=sys.stderr,
            flush=True,
        )
    tensors = {split: _stack(root, split, xs, ys, classes) for split, (xs, ys) in arrays.items()}
    gen = torch.Generator().manual_seed(seed)
    # Class-ordered files would make head(n) (the overfit subset) a single class.
    tensors = {s: _shuffle(x, y, gen) for s, (x, y) in tensors.items()}
    missing = [s for s in ("val", "test") if s not in tensors]
    carved: list[str] = []
    if missing:
        x, y = tensors["train"]
        counts = torch.bincount(y, minlength=len(classes))
        if int(counts.min()) < 3:
            thin = classes[int(counts.argmin())]
            raise DataError(
                f"class '{thin}' has {int(counts.min())} readable training images; "
                f"carving {' and '.join(missing)} out of train needs at least 3 per "
                "class"
            )
        # seeded_split always carves both; a part that exists on disk goes back to train.
        (trx, tr_y), (vx, vy), (tex, tey) = seeded_split(
            x,
            y,
            val_fraction if "val" in missing else 0.0,
            test_fraction if "test" in missing else 0.0,
            seed,
        )
        back = [(vx, vy)] if "val" not in missing else []
        back += [(tex, tey)] if "test" not in missing else []
        tensors["train"] = (
            torch.cat([trx] + [b[0] for b in back]),
            torch.cat([tr_y] + [b[1] for b in back]),
        )
        if "val" in missing:
            tensors["val"] = (vx, vy)
        if "test" in missing:
            tensors["test"] = (tex, tey)
        carved = missing
    info: dict[str, Any] = {
        "source": str(root),
        "layout": "/".join(s for s in _SPLITS if s in layout),
        "carved_from_train": carved,
        "mode": mode,
        "patch_size": size,
        "files": len(everything),
        "skipped_files": len(skipped),
        "skipped": skipped[:_KEEP_NAMES],
    }
    return Splits(
        classes=classes,
        train_x=tensors["train"][0],
        train_y=tensors["train"][1],
        val_x=tensors["val"][0],
        val_y=tensors["val"][1],
        test_x=tensors["test"][0],
        test_y=tensors["test"][1],
        info=info,
    )


def _stack(
    root: Path, split: str, xs: list[np.ndarray], ys: list[int], classes: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    if not xs:
        raise DataError(f"no readable images under {root}/{split}/ (all were skipped); {_HOW}")
    x = torch.from_numpy(np.stack(xs))
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.tensor(ys, dtype=torch.int64)


def _shuffle(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randperm(x.shape[0], generator=gen)
    return x[idx].contiguous(), y[idx].contiguous()


def load(request: DataRequest) -> Splits:
    opts = request.options
    return load_folder(
        Path(request.data_dir),
        int(opts.patch_size),
        request.seed,
        float(opts.val_fraction),
        float(opts.test_fraction),
    )


def describe(data_dir: Path) -> dict[str, Any]:
    root = Path(data_dir)
    try:
        layout = _layout(root)
    except DataError:
        return {"present": False, "where": str(root), "image": "Cx32x32"}
    return {
        "present": True,
        "where": str(root),
        "folders": {split: str(folder) for split, folder in layout.items()},
        "classes": [f.name for f in _class_folders(layout["train"])],
        "image": "Cx32x32",
    }


register(
    DatasetEntry(
        name="imagefolder",
        summary="your images: --data-dir DIR with DIR/train/<class>/*.png|jpg (optional val/, "
        "test/), resized to data.patch_size",
        load=load,
        describe=describe,
    )
)
