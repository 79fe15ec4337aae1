"""FDDB face / non-face patches cut from the published photos and ellipses, split by fold.

``--data-dir`` holds FDDB as published: ``originalPics/<yyyy>/<mm>/<dd>/big/img_N.jpg`` and
``FDDB-folds/FDDB-fold-XX.txt`` (one photo path per line, no ``.jpg``) with
``FDDB-fold-XX-ellipseList.txt`` (per photo: its path, a face count, then one line per face
``major_radius minor_radius angle center_x center_y 1``).

Ellipse convention: ``major_radius`` is the semi-axis along the direction ``angle``
(radians, from the image x axis, y pointing down), ``minor_radius`` the one across it.
Upright faces have ``angle`` near +-pi/2, so their major axis is vertical and their boxes
come out taller than wide, as faces are (the real fold-01 file confirms it; see the tests).

Positives: each ellipse's exact axis-aligned bounding box, grown to a square around the
ellipse centre, clipped to the photo, resized to ``patch_size``. Negatives: square windows
of random size and place whose IoU is below 0.3 with every face box of the photo (both the
tight and the square box), ``negatives_per_face`` per positive. FDDB does not annotate
every face in a photo, so a few negatives may hold an unannotated face: that is the
dataset's noise, not ours.

``--download`` fetches the two published archives when either folder is missing, checks
their checksums, resumes a broken transfer and unpacks them safely (see ``download`` and
babysit/data/download.py); ``BABYSIT_FDDB_PICS_URL`` / ``BABYSIT_FDDB_FOLDS_URL`` (and
``..._SUM``) name a mirror.

Building the patches decodes every photo with PIL once; the result is cached as one
``.npz`` under ``DATA_DIR/.babysit-cache/`` keyed by everything it depends on, so the
training loop never touches PIL. A changed photo (same annotations) is not detected:
delete the cache folder after editing ``originalPics/``.

This module is the loader and its cache; babysit.data.fddb.annotations reads the folds and
ellipses, babysit.data.fddb.patches cuts the patches and babysit.data.fddb.download fetches
the archives. Their public names are importable from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from babysit.data.core import DataError
from babysit.data.core import DataRequest
from babysit.data.core import DatasetEntry
from babysit.data.core import Splits
from babysit.data.core import register
from babysit.data.fddb.annotations import FOLDS_DIR
from babysit.data.fddb.annotations import PICS_DIR
from babysit.data.fddb.annotations import Face  # noqa: F401
from babysit.data.fddb.annotations import Photo
from babysit.data.fddb.annotations import _folds_present
from babysit.data.fddb.annotations import box_iou  # noqa: F401
from babysit.data.fddb.annotations import clip_box  # noqa: F401
from babysit.data.fddb.annotations import ellipse_box  # noqa: F401
from babysit.data.fddb.annotations import fold_files
from babysit.data.fddb.annotations import parse_ellipse_file  # noqa: F401
from babysit.data.fddb.annotations import read_fold
from babysit.data.fddb.annotations import square_box  # noqa: F401
from babysit.data.fddb.download import DOWNLOAD_DIR  # noqa: F401
from babysit.data.fddb.download import FOLDS_URL  # noqa: F401
from babysit.data.fddb.download import PICS_URL  # noqa: F401
from babysit.data.fddb.download import _how_to_get
from babysit.data.fddb.download import download
from babysit.data.fddb.patches import IOU_LIMIT
from babysit.data.fddb.patches import PatchSet
from babysit.data.fddb.patches import build_split

CLASSES = ["non-face", "face"]
CACHE_DIR = ".babysit-cache"
# Bumped whenever the patches a given input builds change, so old caches are not reused.
_CACHE_VERSION = 1
_SPLITS = ("train", "val", "test")


# ---- folds, cache, splits ---------------------------------------------------------------


def _check_tree(data_dir: Path) -> None:
    missing = [d for d in (PICS_DIR, FOLDS_DIR) if not (data_dir / d).is_dir()]
    if missing:
        raise DataError(
            f"FDDB not found in {data_dir}: missing {' and '.join(m + '/' for m in missing)} "
            f"(expected {PICS_DIR}/<yyyy>/<mm>/<dd>/big/img_N.jpg and "
            f"{FOLDS_DIR}/FDDB-fold-01.txt + FDDB-fold-01-ellipseList.txt .. fold 10); "
            + _how_to_get(data_dir)
        )


def _split_folds(options: Any, folds_dir: Path) -> dict[str, list[int]]:
    folds: dict[str, list[int]] = {}
    owner: dict[int, str] = {}
    for split in _SPLITS:
        requested = list(dict.fromkeys(getattr(options, f"{split}_folds")))
        if not requested:
            raise DataError(f"data.{split}_folds is empty; name at least one FDDB fold (1-10)")
        for n in requested:
            if n < 1:
                raise DataError(f"data.{split}_folds: fold {n} does not exist (folds are 1-10)")
            if n in owner:
                raise DataError(
                    f"FDDB fold {n} is in both data.{owner[n]}_folds and data.{split}_folds; "
                    "a photo must feed only one split"
                )
            owner[n] = split
            list_path, ellipse_path = fold_files(folds_dir, n)
            if not (list_path.is_file() and ellipse_path.is_file()):
                present = ", ".join(str(p) for p in _folds_present(folds_dir)) or "none"
                raise DataError(
                    f"FDDB fold {n} (data.{split}_folds) is missing: looked for {list_path} "
                    f"and {ellipse_path.name} (folds present: {present}); copy the "
                    f"{FOLDS_DIR}/ folder from FDDB-folds.tgz or set data.{split}_folds to "
                    "folds that exist"
                )
        folds[split] = requested
    return folds


def _cache_key(folds_dir: Path, folds: dict[str, list[int]], options: Any, seed: int) -> str:
    annotations = {}
    for n in sorted(n for group in folds.values() for n in group):
        annotations[str(n)] = [
            hashlib.sha256(p.read_bytes()).hexdigest() for p in fold_files(folds_dir, n)
        ]
    params = {
        "version": _CACHE_VERSION,
        "folds": folds,
        "patch_size": int(options.patch_size),
        "negatives_per_face": float(options.negatives_per_face),
        "seed": int(seed),
        "iou_limit": IOU_LIMIT,
        "annotations": annotations,
    }
    blob = json.dumps(params, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _save_cache(path: Path, sets: dict[str, PatchSet], info: dict[str, Any]) -> None:
    arrays: dict[str, np.ndarray] = {"info": np.array(json.dumps(info))}
    for split, ps in sets.items():
        arrays[f"{split}_images"] = ps.images
        arrays[f"{split}_labels"] = ps.labels
        arrays[f"{split}_photo"] = ps.photo
        arrays[f"{split}_face"] = ps.face
        arrays[f"{split}_boxes"] = ps.boxes
        arrays[f"{split}_photos"] = np.array(ps.photos, dtype=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: a crash mid-write never leaves a torn cache.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            # The reader refuses pickles (allow_pickle=False), so the writer does too.
            np.savez_compressed(fh, allow_pickle=False, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cache(path: Path) -> tuple[dict[str, PatchSet], dict[str, Any]]:
    # Our own handle: np.load leaks its file when the zip turns out to be broken.
    with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
        info = json.loads(z["info"].item())
        sets = {
            split: PatchSet(
                images=z[f"{split}_images"],
                labels=z[f"{split}_labels"],
                photo=z[f"{split}_photo"],
                face=z[f"{split}_face"],
                boxes=z[f"{split}_boxes"],
                photos=[str(p) for p in z[f"{split}_photos"]],
            )
            for split in _SPLITS
        }
    return sets, info


def _summarise(kind: str, items: list[str]) -> str:
    shown = "; ".join(items[:3])
    more = f"; and {len(items) - 3} more" if len(items) > 3 else ""
    return f"skipped {len(items)} {kind}: {shown}{more}"


def _build(
    data_dir: Path, folds: dict[str, list[int]], options: Any, seed: int
) -> tuple[dict[str, PatchSet], dict[str, Any]]:
    folds_dir = data_dir / FOLDS_DIR
    # Read every annotation before decoding any photo: a bad line fails in a second.
    by_split: dict[str, list[Photo]] = {}
    first_fold: dict[str, int] = {}
    repeats = 0
    for split in _SPLITS:
        by_split[split] = []
        for n in folds[split]:
            photos, dropped = read_fold(folds_dir, n)
            repeats += dropped
            for photo in photos:
                if photo.path in first_fold:
                    raise DataError(
                        f"{photo.listed}: {photo.path} is also in fold {first_fold[photo.path]}; "
                        "a photo in two folds would leak between splits"
                    )
                first_fold[photo.path] = n
            by_split[split].extend(photos)
    sets: dict[str, PatchSet] = {}
    info: dict[str, Any] = {
        "source": str(data_dir),
        "folds": folds,
        "photos": {},
        "faces": {},
        "negatives": {},
        "skipped_images": 0,
        "skipped_faces": 0,
        "negatives_short": 0,
        "repeated_listings": repeats,
        "warnings": [],
    }
    for split in _SPLITS:
        built = build_split(
            data_dir,
            by_split[split],
            int(options.patch_size),
            float(options.negatives_per_face),
            seed,
        )
        if built.positives == 0:
            raise DataError(
                f"FDDB folds {folds[split]} (data.{split}_folds) gave no face patches: "
                f"{len(built.skipped_images)} of {len(by_split[split])} photos are missing "
                f"or unreadable under {data_dir / PICS_DIR}; " + _how_to_get(data_dir)
            )
        sets[split] = built.patches
        info["photos"][split] = len(built.patches.photos)
        info["faces"][split] = built.positives
        info["negatives"][split] = built.negatives
        info["skipped_images"] += len(built.skipped_images)
        info["skipped_faces"] += len(built.skipped_faces)
        short = built.target_negatives - built.negatives
        info["negatives_short"] += short
        if built.skipped_images:
            info["warnings"].append(f"{split}: " + _summarise("photo(s)", built.skipped_images))
        if built.skipped_faces:
            info["warnings"].append(f"{split}: " + _summarise("face(s)", built.skipped_faces))
        if short:
            info["warnings"].append(
                f"{split}: found {built.negatives} of {built.target_negatives} non-face windows "
                f"with IoU < {IOU_LIMIT}; the photos are too crowded for the rest"
            )
    return sets, info


def load_patches(request: DataRequest) -> tuple[dict[str, PatchSet], dict[str, Any]]:
    """The three splits' patches with their provenance, from the cache when it matches."""
    data_dir = Path(request.data_dir)
    if request.download:
        download(data_dir, quiet=request.quiet)
    _check_tree(data_dir)
    options = request.options
    if int(options.patch_size) < 2:
        raise DataError(f"data.patch_size must be at least 2, got {options.patch_size}")
    if not float(options.negatives_per_face) >= 0:
        raise DataError(
            f"data.negatives_per_face must be 0 or more, got {options.negatives_per_face}"
        )
    folds = _split_folds(options, data_dir / FOLDS_DIR)
    key = _cache_key(data_dir / FOLDS_DIR, folds, options, request.seed)
    cache = data_dir / CACHE_DIR / f"fddb-{key}.npz"
    problems: list[str] = []
    if cache.is_file():
        try:
            sets, info = _load_cache(cache)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            problems.append(f"ignored the unreadable cache {cache} ({err}); rebuilt it")
        else:
            info["cache"] = "hit"
            info["cache_file"] = str(cache)
            return sets, info
    started = time.perf_counter()
    sets, info = _build(data_dir, folds, options, request.seed)
    info["build_seconds"] = round(time.perf_counter() - started, 2)
    try:
        _save_cache(cache, sets, info)
        info["cache"] = "built"
        info["cache_file"] = str(cache)
    except OSError as err:
        problems.append(
            f"could not write the cache {cache} ({err.strerror or err}); "
            "the patches will be rebuilt next time"
        )
        info["cache"] = "off"
    info["warnings"] = info["warnings"] + problems
    return sets, info


def load(request: DataRequest) -> Splits:
    sets, info = load_patches(request)
    for message in info["warnings"]:
        warnings.warn(f"fddb: {message}", stacklevel=2)

    def _t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    tr, va, te = (sets[s] for s in _SPLITS)
    return Splits(
        classes=list(CLASSES),
        train_x=_t(tr.images),
        train_y=_t(tr.labels),
        val_x=_t(va.images),
        val_y=_t(va.labels),
        test_x=_t(te.images),
        test_y=_t(te.labels),
        info=info,
    )


def describe(data_dir: Path) -> dict[str, Any]:
    data_dir = Path(data_dir)
    folds_dir = data_dir / FOLDS_DIR
    folds = _folds_present(folds_dir) if folds_dir.is_dir() else []
    files = [f"{PICS_DIR}/"]
    for n in range(1, 11):
        files.extend(f"{FOLDS_DIR}/{p.name}" for p in fold_files(Path(), n))
    return {
        "present": (data_dir / PICS_DIR).is_dir() and bool(folds),
        "where": str(data_dir),
        "folds": folds,
        "image": "3x32x32",
        "files": files,
    }


register(
    DatasetEntry(
        name="fddb",
        summary="FDDB face vs non-face patches, 2 classes, split by fold (files under --data-dir)",
        load=load,
        describe=describe,
    )
)
