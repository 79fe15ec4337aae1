"""FDDB face and non-face patches cut from one split's photos.

Positives: each ellipse's exact axis-aligned bounding box, grown to a square around the
ellipse centre, clipped to the photo, resized to ``patch_size``. Negatives: square windows
of random size and place whose IoU is below IOU_LIMIT with every face box of the photo
(both the tight and the square box), ``negatives_per_face`` per positive.
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from babysit.data.fddb.annotations import PICS_DIR
from babysit.data.fddb.annotations import Photo
from babysit.data.fddb.annotations import box_iou
from babysit.data.fddb.annotations import clip_box
from babysit.data.fddb.annotations import ellipse_box
from babysit.data.fddb.annotations import face_boxes
from babysit.data.fddb.annotations import square_box

# The usual "not a face" threshold for detection windows.
IOU_LIMIT = 0.3
# Negative windows are drawn in rounds of this many candidates; a photo that yields no
# clean window in _NEG_ROUNDS rounds (a close-up filling the frame) is given up on.
_NEG_BATCH = 64
_NEG_ROUNDS = 16
# Smallest negative window side in photo pixels (FDDB's smallest annotated faces are ~20).
_NEG_MIN_SIDE = 16


@dataclass
class PatchSet:
    """One split's patches and where each came from (for checks and for the curious)."""

    images: np.ndarray  # (N, 3, P, P) uint8
    labels: np.ndarray  # (N,) int64, 1 = face
    photo: np.ndarray  # (N,) int32: index into ``photos``
    face: np.ndarray  # (N,) int32: index of the ellipse in its photo, -1 for non-faces
    boxes: np.ndarray  # (N, 4) float32: x0, y0, x1, y1 of the crop in photo pixels
    photos: list[str]


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
        patches,
        positives,
        negatives,
        round(positives * negatives_per_face),
        skipped_images,
        skipped_faces,
    )
