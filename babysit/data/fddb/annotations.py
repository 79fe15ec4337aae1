"""FDDB's published annotations: the fold lists, the ellipses and their boxes.

Ellipse convention: ``major_radius`` is the semi-axis along the direction ``angle``
(radians, from the image x axis, y pointing down), ``minor_radius`` the one across it.
Upright faces have ``angle`` near +-pi/2, so their major axis is vertical and their boxes
come out taller than wide, as faces are (the real fold-01 file confirms it; see the tests).
Every line that cannot be read is a DataError naming its file and line.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from pathlib import PurePosixPath

import numpy as np

from babysit.data.core import DataError

PICS_DIR = "originalPics"
FOLDS_DIR = "FDDB-folds"
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
        [
            min(max(x0, 0.0), width),
            min(max(y0, 0.0), height),
            min(max(x1, 0.0), width),
            min(max(y1, 0.0), height),
        ],
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


def _folds_present(folds_dir: Path) -> list[int]:
    return [n for n in range(1, 100) if all(p.is_file() for p in fold_files(folds_dir, n))]
