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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch

from babysit.data import DataError
from babysit.data import DataRequest
from babysit.data import DatasetEntry
from babysit.data import Splits
from babysit.data import register
from babysit.data.download import Archive
from babysit.data.download import ChecksumError
from babysit.data.download import DownloadError
from babysit.data.download import fetch
from babysit.data.download import parse_digest
from babysit.data.download import unpack_tar

CLASSES = ["non-face", "face"]
PICS_DIR = "originalPics"
FOLDS_DIR = "FDDB-folds"
CACHE_DIR = ".babysit-cache"
# The usual "not a face" threshold for detection windows.
IOU_LIMIT = 0.3
# Bumped whenever the patches a given input builds change, so old caches are not reused.
_CACHE_VERSION = 1
# Negative windows are drawn in rounds of this many candidates; a photo that yields no
# clean window in _NEG_ROUNDS rounds (a close-up filling the frame) is given up on.
_NEG_BATCH = 64
_NEG_ROUNDS = 16
# Smallest negative window side in photo pixels (FDDB's smallest annotated faces are ~20).
_NEG_MIN_SIDE = 16
_SPLITS = ("train", "val", "test")
_HOW_TO_GET = (
    "{first}, or get {pics_url} and {folds_url}, then "
    "`mkdir -p {data_dir}/originalPics && tar -xzf originalPics.tar.gz -C "
    "{data_dir}/originalPics && tar -xzf FDDB-folds.tgz -C {data_dir}`"
)
PICS_URL = "http://tamaraberg.com/faceDataset/originalPics.tar.gz"
FOLDS_URL = "http://vis-www.cs.umass.edu/fddb/FDDB-folds.tgz"
# Checksums of the published archives. Not measured here (this machine has no internet):
# they are the ones other projects pin for the same URLs, and a first real download should
# confirm them and add a SHA-256. originalPics.tar.gz: md5 from the get_data.sh of
# github.com/penolove/FDDB_DataSet_4_faster_rcnn (a wget of the vis-www.cs.umass.edu copy
# reports 579061091 bytes). FDDB-folds.tgz: md5 from that script and sha1 from vipy's
# dataset/fddb.py, two independent sources. Should a copy differ, the error says how to
# name another checksum (BABYSIT_FDDB_PICS_SUM / BABYSIT_FDDB_FOLDS_SUM).
PICS_DIGESTS = {"md5": "cf414253ac596cd858daae0cc321d793"}
FOLDS_DIGESTS = {
    "md5": "4cf9badc939a3398a0d6f3a3c8540f55",
    "sha1": "94ce19ba3348425dfbb8bcbe55802490f8f152f8",
}
DOWNLOAD_DIR = ".babysit-download"
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class Face:
    major: float
    minor: float
    angle: float
    cx: float
    cy: float
    line: int  # in the ellipse file, for messages


@dataclass(frozen=True)
class Photo:
    path: str  # relative to originalPics/, without .jpg
    fold: int
    faces: tuple[Face, ...]
    listed: str  # "FDDB-fold-XX.txt:LINE", for messages
    ellipse_file: str


@dataclass
class PatchSet:
    """One split's patches and where each came from (for checks and for the curious)."""

    images: np.ndarray  # (N, 3, P, P) uint8
    labels: np.ndarray  # (N,) int64, 1 = face
    photo: np.ndarray  # (N,) int32: index into ``photos``
    face: np.ndarray  # (N,) int32: index of the ellipse in its photo, -1 for non-faces
    boxes: np.ndarray  # (N, 4) float32: x0, y0, x1, y1 of the crop in photo pixels
    photos: list[str]


# ---- geometry ---------------------------------------------------------------------------


def ellipse_box(major: float, minor: float, angle: float, cx: float, cy: float) -> np.ndarray:
    """Exact axis-aligned bounding box ``[x0, y0, x1, y1]`` of a rotated ellipse.

    With the major semi-axis along ``angle``: the extremes of
    ``x = cx + a cos(s) cos(t) - b sin(s) sin(t)`` over ``s`` are ``cx +- sqrt(a^2 cos^2 t
    + b^2 sin^2 t)``, and likewise for y with sin and cos swapped.
    """
    c = math.cos(angle)
    s = math.sin(angle)
    half_w = math.sqrt((major * c) ** 2 + (minor * s) ** 2)
    half_h = math.sqrt((major * s) ** 2 + (minor * c) ** 2)
    return np.array([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dtype=np.float64)


def square_box(box: np.ndarray) -> np.ndarray:
    """Grow the shorter side around the centre so the box is square."""
    x0, y0, x1, y1 = (float(v) for v in box)
    half = max(x1 - x0, y1 - y0) / 2.0
    cx = (x0 + x1) / 2.0
    cy = (y0 + y1) / 2.0
    return np.array([cx - half, cy - half, cx + half, cy + half], dtype=np.float64)


def clip_box(box: np.ndarray, width: int, height: int) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array(
        [min(max(x0, 0.0), width), min(max(y0, 0.0), height),
         min(max(x1, 0.0), width), min(max(y1, 0.0), height)],
        dtype=np.float64,
    )


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4): an (N, M) array."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def face_boxes(faces: tuple[Face, ...] | list[Face]) -> np.ndarray:
    """Every box a negative must stay clear of: each face's tight box and its square crop."""
    boxes = []
    for f in faces:
        tight = ellipse_box(f.major, f.minor, f.angle, f.cx, f.cy)
        boxes.extend([tight, square_box(tight)])
    return np.array(boxes, dtype=np.float64).reshape(-1, 4)


# ---- annotation files ------------------------------------------------------------------


def fold_files(folds_dir: Path, fold: int) -> tuple[Path, Path]:
    return (
        folds_dir / f"FDDB-fold-{fold:02d}.txt",
        folds_dir / f"FDDB-fold-{fold:02d}-ellipseList.txt",
    )


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not a text file ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None


def _safe_relpath(text: str, where: str) -> str:
    """A photo path that stays inside originalPics/, or a DataError naming file and line."""
    rel = text.strip()
    if rel.lower().endswith(".jpg"):
        rel = rel[:-4]
    parts = PurePosixPath(rel).parts
    if (
        not rel
        or rel.startswith(("/", "~", "\\"))
        or _DRIVE.match(rel)
        or "\\" in rel
        or ".." in parts
    ):
        raise DataError(
            f"{where}: photo path '{text.strip()}' leaves the data folder; paths must be "
            f"relative to {PICS_DIR}/, like 2002/08/11/big/img_591"
        )
    return "/".join(p for p in parts if p != ".")


def _is_numbers(text: str) -> bool:
    fields = text.split()
    try:
        [float(f) for f in fields]
    except ValueError:
        return False
    return bool(fields)


def parse_ellipse_file(path: Path) -> dict[str, tuple[list[Face], int]]:
    """Photo path -> (faces, line of its path), checking every line against the format."""
    lines = _read_lines(path)
    name = path.name
    entries: dict[str, tuple[list[Face], int]] = {}
    pos = 0

    def next_line() -> tuple[int, str] | None:
        nonlocal pos
        while pos < len(lines):
            pos += 1
            if lines[pos - 1].strip():
                return pos, lines[pos - 1].strip()
        return None

    last: tuple[str, int, int] | None = None  # path, count line, count
    while (item := next_line()) is not None:
        path_line, text = item
        if _is_numbers(text):
            hint = ""
            if last is not None:
                hint = (
                    f"; the count at line {last[1]} says {last[2]} face(s) for {last[0]} "
                    "but more ellipse lines follow"
                )
            raise DataError(f"{name}:{path_line}: expected a photo path, found '{text}'{hint}")
        rel = _safe_relpath(text, f"{name}:{path_line}")
        if rel in entries:
            raise DataError(
                f"{name}:{path_line}: {rel} is annotated twice (first at line {entries[rel][1]})"
            )
        item = next_line()
        if item is None:
            raise DataError(
                f"{name}:{path_line}: the file ends after photo path {rel} without a face "
                "count (truncated?)"
            )
        count_line, count_text = item
        try:
            count = int(count_text)
        except ValueError:
            raise DataError(
                f"{name}:{count_line}: expected the face count of {rel}, found '{count_text}'"
            ) from None
        if count < 0:
            raise DataError(f"{name}:{count_line}: negative face count {count} for {rel}")
        faces: list[Face] = []
        for k in range(count):
            item = next_line()
            if item is None:
                raise DataError(
                    f"{name}:{count_line}: the count says {count} face(s) for {rel} but the "
                    f"file ends after {k} (truncated?)"
                )
            faces.append(_parse_face(item, name, rel, k, count, count_line))
        entries[rel] = (faces, path_line)
        last = (rel, count_line, count)
    return entries


def _parse_face(
    item: tuple[int, str], name: str, rel: str, k: int, count: int, count_line: int
) -> Face:
    line, text = item
    fields = text.split()
    where = f"{name}:{line}: face {k + 1} of {count} for {rel}"
    try:
        values = [float(f) for f in fields]
    except ValueError:
        values = []
    if len(fields) not in (5, 6) or len(values) != len(fields):
        hint = ""
        if not _is_numbers(text):
            hint = f"; the count at line {count_line} says {count} but fewer faces follow"
        raise DataError(
            f"{where}: expected 'major_radius minor_radius angle center_x center_y 1', "
            f"found '{text}'{hint}"
        )
    major, minor, angle, cx, cy = values[:5]
    if not all(math.isfinite(v) for v in values[:5]) or major <= 0 or minor <= 0:
        raise DataError(f"{where}: radii must be positive and all values finite, found '{text}'")
    return Face(major, minor, angle, cx, cy, line)


def read_fold(folds_dir: Path, fold: int) -> tuple[list[Photo], int]:
    """The photos of one fold in listed order, and how many repeated listings were dropped.

    The fold list and the ellipse list must name the same photos. The published fold-01
    list names two photos twice; a repeat adds nothing, so it is dropped.
    """
    list_path, ellipse_path = fold_files(folds_dir, fold)
    annotated = parse_ellipse_file(ellipse_path)
    photos: list[Photo] = []
    seen: set[str] = set()
    repeats = 0
    for number, text in enumerate(_read_lines(list_path), start=1):
        if not text.strip():
            continue
        where = f"{list_path.name}:{number}"
        rel = _safe_relpath(text, where)
        if rel in seen:
            repeats += 1
            continue
        if rel not in annotated:
            raise DataError(f"{where}: {rel} has no entry in {ellipse_path.name}")
        seen.add(rel)
        photos.append(Photo(rel, fold, tuple(annotated[rel][0]), where, ellipse_path.name))
    for rel, (_faces, line) in annotated.items():
        if rel not in seen:
            raise DataError(f"{ellipse_path.name}:{line}: {rel} is not listed in {list_path.name}")
    return photos, repeats


# ---- building patches -------------------------------------------------------------------


def _photo_rng(seed: int, rel: str) -> np.random.Generator:
    # Per photo, so one photo's negatives do not depend on which photos came before it.
    return np.random.default_rng([seed % (1 << 32), zlib.crc32(rel.encode())])


def _negative_windows(
    rng: np.random.Generator, width: int, height: int, avoid: np.ndarray, want: int
) -> list[np.ndarray]:
    short = min(width, height)
    lo = min(short, _NEG_MIN_SIDE)
    found: list[np.ndarray] = []
    for _ in range(_NEG_ROUNDS):
        if len(found) >= want or short < 2:
            break
        # Log-uniform sizes: as many small windows as large ones, like the faces.
        side = np.exp(rng.uniform(math.log(lo), math.log(short), _NEG_BATCH))
        side = np.clip(np.rint(side), lo, short).astype(np.int64)
        x0 = (rng.random(_NEG_BATCH) * (width - side + 1)).astype(np.int64)
        y0 = (rng.random(_NEG_BATCH) * (height - side + 1)).astype(np.int64)
        cand = np.stack([x0, y0, x0 + side, y0 + side], axis=1).astype(np.float64)
        if avoid.size:
            clean = box_iou(cand, avoid).max(axis=1) < IOU_LIMIT
            cand = cand[clean]
        found.extend(cand[: want - len(found)])
    return found


@dataclass
class BuiltSplit:
    """A split's patches and what building them found (for ``info`` and the tests)."""

    patches: PatchSet
    positives: int
    negatives: int
    target_negatives: int
    skipped_images: list[str]
    skipped_faces: list[str]


def build_split(
    data_dir: Path, photos: list[Photo], patch_size: int, negatives_per_face: float, seed: int
) -> BuiltSplit:
    """Decode each photo once and cut its face and non-face patches."""
    from PIL import Image
    from PIL import UnidentifiedImageError

    pics = data_dir / PICS_DIR
    images: list[np.ndarray] = []
    labels: list[int] = []
    photo_idx: list[int] = []
    face_idx: list[int] = []
    boxes: list[np.ndarray] = []
    kept: list[str] = []
    skipped_images: list[str] = []
    skipped_faces: list[str] = []
    positives = 0
    negatives = 0
    size = (patch_size, patch_size)
    for photo in photos:
        file = pics / f"{photo.path}.jpg"
        try:
            with warnings.catch_warnings():
                # A photo over PIL's pixel limit is skipped by name, not decoded after a raw
                # DecompressionBombWarning.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(file) as raw:
                    # Grey and CMYK photos become RGB so every patch has three channels.
                    img = raw.convert("RGB")
        except FileNotFoundError:
            skipped_images.append(f"{photo.listed} ({PICS_DIR}/{photo.path}.jpg is missing)")
            continue
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            skipped_images.append(
                f"{photo.listed} ({PICS_DIR}/{photo.path}.jpg is oversized, not decoded as it "
                f"may be a decompression bomb: {err})"
            )
            continue
        except (UnidentifiedImageError, OSError, ValueError) as err:
            skipped_images.append(
                f"{photo.listed} ({PICS_DIR}/{photo.path}.jpg unreadable: {err})"
            )
            continue
        width, height = img.size
        index = len(kept)
        kept.append(photo.path)
        for k, face in enumerate(photo.faces):
            tight = ellipse_box(face.major, face.minor, face.angle, face.cx, face.cy)
            crop = clip_box(square_box(tight), width, height)
            if crop[2] - crop[0] < 2 or crop[3] - crop[1] < 2:
                skipped_faces.append(
                    f"{photo.ellipse_file}:{face.line} (face {k + 1} of {photo.path} lies "
                    f"outside its {width}x{height} photo)"
                )
                continue
            patch = img.resize(size, Image.Resampling.BILINEAR, box=tuple(crop))
            images.append(np.asarray(patch, dtype=np.uint8).transpose(2, 0, 1))
            labels.append(1)
            photo_idx.append(index)
            face_idx.append(k)
            boxes.append(crop)
            positives += 1
        # Cumulative target, so a photo that could not give its share passes it on.
        want = round(positives * negatives_per_face) - negatives
        if want <= 0:
            continue
        rng = _photo_rng(seed, photo.path)
        for window in _negative_windows(rng, width, height, face_boxes(photo.faces), want):
            patch = img.resize(size, Image.Resampling.BILINEAR, box=tuple(window))
            images.append(np.asarray(patch, dtype=np.uint8).transpose(2, 0, 1))
            labels.append(0)
            photo_idx.append(index)
            face_idx.append(-1)
            boxes.append(window)
            negatives += 1
    n = len(labels)
    patches = PatchSet(
        images=np.stack(images) if n else np.zeros((0, 3, *size), dtype=np.uint8),
        labels=np.asarray(labels, dtype=np.int64),
        photo=np.asarray(photo_idx, dtype=np.int32),
        face=np.asarray(face_idx, dtype=np.int32),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(n, 4),
        photos=kept,
    )
    return BuiltSplit(
        patches, positives, negatives, round(positives * negatives_per_face),
        skipped_images, skipped_faces,
    )


# ---- download ----------------------------------------------------------------------------


def _archives() -> tuple[Archive, Archive]:
    """The photos and the folds archives, with the URL and checksum overrides applied.

    ``BABYSIT_FDDB_PICS_URL`` / ``BABYSIT_FDDB_FOLDS_URL`` point at a mirror (or a test
    server); ``BABYSIT_FDDB_PICS_SUM`` / ``BABYSIT_FDDB_FOLDS_SUM`` (``sha256:HEX``,
    ``sha1:HEX`` or ``md5:HEX``) replace the pinned checksums. A URL override alone keeps the
    pinned checksums: a mirror must serve the published bytes.
    """
    out = []
    for name, url, digests, var in (
        ("originalPics.tar.gz", PICS_URL, PICS_DIGESTS, "BABYSIT_FDDB_PICS"),
        ("FDDB-folds.tgz", FOLDS_URL, FOLDS_DIGESTS, "BABYSIT_FDDB_FOLDS"),
    ):
        url = os.environ.get(f"{var}_URL") or url
        given = os.environ.get(f"{var}_SUM")
        if given:
            algorithm, hexdigest = parse_digest(given, f"{var}_SUM")
            digests = {algorithm: hexdigest}
        out.append(Archive(name, url, dict(digests)))
    return out[0], out[1]


def _how_to_get(data_dir: Path, downloading: bool = False) -> str:
    try:
        pics, folds = _archives()
        urls = {"pics_url": pics.url, "folds_url": folds.url}
    except DataError:
        urls = {"pics_url": PICS_URL, "folds_url": FOLDS_URL}
    first = "check the connection and run again" if downloading else "pass --download"
    return _HOW_TO_GET.format(data_dir=data_dir, first=first, **urls)


def _place(root: Path, target: Path) -> None:
    """Move the unpacked tree into place in one rename: the loader sees all of it or none."""
    try:
        os.rename(root, target)
    except OSError:
        if not target.is_dir():
            raise
        # Another run placed the same tree first; theirs is as good as ours.


def download(data_dir: Path, quiet: bool = False) -> None:
    """Fetch, check and unpack whichever of ``originalPics/`` and ``FDDB-folds/`` is missing.

    The photos archive holds ``2002/``, ``2003/`` at its top (it unpacks *into*
    ``originalPics/``); the folds archive holds ``FDDB-folds/``. Either wrapping is accepted.
    """
    data_dir = Path(data_dir)
    pics, folds = _archives()
    work = data_dir / DOWNLOAD_DIR
    for archive, target in ((pics, data_dir / PICS_DIR), (folds, data_dir / FOLDS_DIR)):
        if target.is_dir():
            continue
        try:
            path = fetch(archive, work, quiet=quiet)
            staging = unpack_tar(path, work, quiet=quiet)
            try:
                root = staging / target.name if (staging / target.name).is_dir() else staging
                if target.name == PICS_DIR and next(root.rglob("*.jpg"), None) is None:
                    raise DownloadError(f"{archive.name} from {archive.url} holds no .jpg photos")
                if target.name == FOLDS_DIR and not _folds_present(root):
                    raise DownloadError(
                        f"{archive.name} from {archive.url} holds no FDDB-fold-XX.txt with its "
                        "FDDB-fold-XX-ellipseList.txt"
                    )
                _place(root, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        except ChecksumError as err:
            _drop_if_empty(work)
            var = "BABYSIT_FDDB_PICS_SUM" if target.name == PICS_DIR else "BABYSIT_FDDB_FOLDS_SUM"
            raise DataError(
                f"FDDB download failed: {err}; retry with --download, or, if you trust this "
                f"copy, name its checksum with {var}=sha256:<hex>; "
                + _how_to_get(data_dir, downloading=True)
            ) from None
        except DataError as err:
            _drop_if_empty(work)
            raise DataError(
                f"FDDB download failed: {err}; {_how_to_get(data_dir, downloading=True)}"
            ) from None
        except OSError as err:
            _drop_if_empty(work)
            raise DataError(
                f"FDDB download failed: cannot write under {work} ({err.strerror or err}); "
                + _how_to_get(data_dir, downloading=True)
            ) from None
        # The archive is only a means; 550 MB kept beside the unpacked photos helps no one.
        path.unlink(missing_ok=True)
    _drop_if_empty(work)


def _drop_if_empty(folder: Path) -> None:
    # A .part worth resuming keeps the folder; an empty one is clutter in the data folder.
    with contextlib.suppress(OSError):
        folder.rmdir()


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


def _folds_present(folds_dir: Path) -> list[int]:
    return [n for n in range(1, 100) if all(p.is_file() for p in fold_files(folds_dir, n))]


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
            np.savez_compressed(fh, **arrays)
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
            data_dir, by_split[split], int(options.patch_size),
            float(options.negatives_per_face), seed,
        )
        if built.positives == 0:
            raise DataError(
                f"FDDB folds {folds[split]} (data.{split}_folds) gave no face patches: "
                f"{len(built.skipped_images)} of {len(by_split[split])} photos are missing "
                f"or unreadable under {data_dir / PICS_DIR}; "
                + _how_to_get(data_dir)
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
        problems.append(f"could not write the cache {cache} ({err.strerror or err}); "
                        "the patches will be rebuilt next time")
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
        train_x=_t(tr.images), train_y=_t(tr.labels),
        val_x=_t(va.images), val_y=_t(va.labels),
        test_x=_t(te.images), test_y=_t(te.labels),
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
        # Patch counts depend on data.negatives_per_face and on which folds feed which split.
        "sizes": {"train": None, "val": None, "test": None},
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
