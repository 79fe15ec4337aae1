"""FDDB patches from a tree built around the real fold-01 annotations with painted photos.

Each annotated ellipse is painted in its own colour on a dark noisy background, so a
positive patch must show that colour at its centre; the photos are generated, the
ellipses are FDDB's own (or, where the shared fixture is absent, FDDB-like ones).
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from PIL import ImageDraw

from babysit.data import DataError
from babysit.data import DataRequest
from babysit.data import describe_dataset
from babysit.data import fddb
from babysit.data import registered
from babysit.spec import DataSpec

# The real fold-01 files, kept in tests/fixtures; another copy can be named with
# BABYSIT_FDDB_FIXTURE.
_FIXTURE = os.environ.get(
    "BABYSIT_FDDB_FIXTURE", str(Path(__file__).resolve().parents[1] / "fixtures" / "fddb")
)
REAL_FOLDS = Path(_FIXTURE) / "FDDB-folds"
REAL_ELLIPSES = REAL_FOLDS / "FDDB-fold-01-ellipseList.txt"
PALETTE = [
    (250, 30, 30),
    (30, 250, 30),
    (30, 30, 250),
    (250, 250, 30),
    (250, 30, 250),
    (30, 250, 250),
    (250, 140, 30),
    (140, 30, 250),
    (245, 245, 245),
    (30, 140, 250),
]
GREY_LEVELS = [250, 205, 165, 230, 185, 145, 240, 195, 155, 220]
# Photos 0..23 make fold 1, 24..35 fold 2, 36..47 fold 3.
FOLD_SLICES = {1: slice(0, 24), 2: slice(24, 36), 3: slice(36, 48)}
GREY_PHOTOS = {3, 17, 30}

Entry = tuple[str, list[tuple[float, float, float, float, float]]]


def _parse_entries(text: str) -> list[Entry]:
    """A plain reader for well-formed ellipse lists, independent of the one under test."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    out: list[Entry] = []
    i = 0
    while i < len(lines):
        path, count = lines[i], int(lines[i + 1])
        faces = [tuple(float(v) for v in lines[i + 2 + k].split()[:5]) for k in range(count)]
        out.append((path, faces))  # type: ignore[arg-type]
        i += 2 + count
    return out


def _synthetic_entries(n: int) -> list[Entry]:
    rng = np.random.default_rng(7)
    out: list[Entry] = []
    for i in range(n):
        faces = []
        for _ in range(int(rng.integers(1, 4))):
            minor = float(rng.uniform(12, 45))
            faces.append(
                (
                    minor * 1.5,
                    minor,
                    float(rng.choice([-1, 1]) * rng.uniform(1.3, 1.57)),
                    float(rng.uniform(20, 430)),
                    float(rng.uniform(30, 320)),
                )
            )
        out.append((f"2002/07/{i % 28 + 1:02d}/big/img_{i}", faces))
    return out


def _entries() -> list[Entry]:
    if REAL_ELLIPSES.is_file():
        return _parse_entries(REAL_ELLIPSES.read_text())[:48]
    return _synthetic_entries(48)


def _ellipse_points(face: tuple[float, ...], n: int = 120) -> list[tuple[float, float]]:
    a, b, t, cx, cy = face
    s = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = cx + a * np.cos(s) * math.cos(t) - b * np.sin(s) * math.sin(t)
    y = cy + a * np.cos(s) * math.sin(t) + b * np.sin(s) * math.cos(t)
    return list(zip(x.tolist(), y.tolist(), strict=True))


def _photo_size(faces: list[tuple[float, ...]]) -> tuple[int, int]:
    width = max([450] + [math.ceil(f[3]) + 20 for f in faces])
    height = max([350] + [math.ceil(f[4]) + 20 for f in faces])
    return width, height


def _paint(
    index: int, faces: list[tuple[float, ...]], grey: bool
) -> tuple[Image.Image, np.ndarray]:
    """The photo, and a map of which face (1-based) covers each pixel."""
    width, height = _photo_size(faces)
    rng = np.random.default_rng(index)
    background = rng.integers(40, 90, size=(height, width, 1 if grey else 3), dtype=np.uint8)
    img = Image.fromarray(background.squeeze(-1) if grey else background)
    owner = Image.new("L", (width, height), 0)
    draw, mark = ImageDraw.Draw(img), ImageDraw.Draw(owner)
    for k, face in enumerate(faces):
        colour = GREY_LEVELS[k % 10] if grey else PALETTE[k % 10]
        draw.polygon(_ellipse_points(face), fill=colour)
        mark.polygon(_ellipse_points(face), fill=k + 1)
    return img, np.asarray(owner)


def _ellipse_lines(entries: list[Entry]) -> list[str]:
    lines = []
    for path, faces in entries:
        lines.append(path)
        lines.append(str(len(faces)))
        lines.extend(" ".join(f"{v:.6f}" for v in face) + "  1" for face in faces)
    return lines


def _write_folds(root: Path, entries: list[Entry], folds: dict[int, slice]) -> None:
    folds_dir = root / fddb.FOLDS_DIR
    folds_dir.mkdir(parents=True, exist_ok=True)
    for n, part in folds.items():
        chosen = entries[part]
        (folds_dir / f"FDDB-fold-{n:02d}.txt").write_text("\n".join(p for p, _ in chosen) + "\n")
        (folds_dir / f"FDDB-fold-{n:02d}-ellipseList.txt").write_text(
            "\n".join(_ellipse_lines(chosen)) + "\n"
        )


def _write_photos(root: Path, entries: list[Entry]) -> None:
    for i, (path, faces) in enumerate(entries):
        file = root / fddb.PICS_DIR / f"{path}.jpg"
        file.parent.mkdir(parents=True, exist_ok=True)
        img, _ = _paint(i, faces, grey=i in GREY_PHOTOS)
        img.save(file, quality=95, subsampling=0)


def _options(**overrides: Any) -> DataSpec:
    spec = DataSpec(train_folds=[1], val_folds=[2], test_folds=[3])
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


def _request(root: Path, seed: int = 0, **overrides: Any) -> DataRequest:
    return DataRequest(data_dir=root, seed=seed, download=False, options=_options(**overrides))


@pytest.fixture(scope="module")
def entries() -> list[Entry]:
    return _entries()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, entries: list[Entry]) -> Path:
    root = tmp_path_factory.mktemp("fddb")
    _write_folds(root, entries, FOLD_SLICES)
    _write_photos(root, entries)
    return root


@pytest.fixture(scope="module")
def built(tree: Path) -> tuple[dict[str, fddb.PatchSet], dict[str, Any]]:
    return fddb.load_patches(_request(tree))


def _copy(tree: Path, dest: Path) -> Path:
    return Path(shutil.copytree(tree, dest, ignore=shutil.ignore_patterns(fddb.CACHE_DIR)))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


# ---- geometry helpers -------------------------------------------------------------------


@pytest.mark.parametrize("angle", [0.0, 0.3, math.pi / 4, 1.2, math.pi / 2, -1.54, 2.9])
def test_ellipse_box_is_the_exact_bounding_box_of_the_rotated_ellipse(angle: float) -> None:
    face = (55.0, 33.0, angle, 103.4, 107.9)
    points = np.array(_ellipse_points(face, n=20000))
    box = fddb.ellipse_box(*face)
    expected = [points[:, 0].min(), points[:, 1].min(), points[:, 0].max(), points[:, 1].max()]
    np.testing.assert_allclose(box, expected, atol=1e-3)


def test_major_radius_lies_along_the_angle() -> None:
    # angle 0: the major semi-axis is horizontal; pi/2 (upright face): vertical.
    np.testing.assert_allclose(fddb.ellipse_box(50, 30, 0.0, 100, 100), [50, 70, 150, 130])
    np.testing.assert_allclose(
        fddb.ellipse_box(50, 30, math.pi / 2, 100, 100), [70, 50, 130, 150], atol=1e-9
    )


def test_square_and_clip() -> None:
    sq = fddb.square_box(np.array([10.0, 0.0, 30.0, 60.0]))
    np.testing.assert_allclose(sq, [-10, 0, 50, 60])
    np.testing.assert_allclose(fddb.clip_box(sq, 40, 50), [0, 0, 40, 50])


def test_box_iou_matches_a_plain_computation() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, size=(30, 2))
    wh = rng.uniform(1, 60, size=(30, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    got = fddb.box_iou(boxes[:10], boxes[10:])
    want = np.array([[_iou(a, b) for b in boxes[10:]] for a in boxes[:10]])
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert fddb.box_iou(boxes[:1], boxes[:1])[0, 0] == pytest.approx(1.0)
    assert fddb.box_iou([0, 0, 10, 10], [20, 20, 30, 30])[0, 0] == 0.0


# ---- the real annotation files ----------------------------------------------------------


@pytest.mark.skipif(not REAL_ELLIPSES.is_file(), reason="shared FDDB fold-01 fixture absent")
def test_real_fold_01_parses_completely() -> None:
    photos, repeats = fddb.read_fold(REAL_FOLDS, 1)
    entries = _parse_entries(REAL_ELLIPSES.read_text())
    listed = [line for line in (REAL_FOLDS / "FDDB-fold-01.txt").read_text().splitlines() if line]
    assert len(listed) == 290
    # The published list names two photos twice; the ellipse list has each once.
    assert len(photos) == len(entries) == 288 and repeats == 2
    assert sorted(p.path for p in photos) == sorted(path for path, _ in entries)
    faces = [f for p in photos for f in p.faces]
    lines = [line for line in REAL_ELLIPSES.read_text().splitlines() if line.strip()]
    assert len(faces) == len(lines) - 2 * 288 == 512
    first = photos[0].faces[0]
    assert (first.major, first.minor, first.angle) == (55.012198, 33.056167, -1.540952)
    assert (first.cx, first.cy, first.line) == (103.432230, 107.856136, 3)
    # The convention check: upright faces have angle ~ +-pi/2, so the major radius must be
    # vertical and nearly every box taller than wide.
    boxes = np.array([fddb.ellipse_box(f.major, f.minor, f.angle, f.cx, f.cy) for f in faces])
    taller = (boxes[:, 3] - boxes[:, 1]) > (boxes[:, 2] - boxes[:, 0])
    assert taller.mean() > 0.95


# ---- patches ---------------------------------------------------------------------------


def test_splits_have_the_right_shape_and_counts(tree: Path, entries: list[Entry]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = fddb.load(_request(tree))
    splits.check("fddb")
    assert splits.classes == ["non-face", "face"]
    assert splits.train_x.shape[1:] == (3, 32, 32)
    for split, n in (("train", 1), ("val", 2), ("test", 3)):
        faces = sum(len(f) for _, f in entries[FOLD_SLICES[n]])
        y = getattr(splits, f"{split}_y")
        assert int((y == 1).sum()) == faces == splits.info["faces"][split]
        # negatives_per_face 1.0 on sparse photos: exactly one non-face per face.
        assert int((y == 0).sum()) == faces
    assert splits.info["skipped_images"] == 0 and splits.info["negatives_short"] == 0
    assert splits.info["photos"] == {"train": 24, "val": 12, "test": 12}


def test_positives_sit_on_their_ellipses(built, entries: list[Entry]) -> None:
    sets, _info = built
    by_path = {path: (i, faces) for i, (path, faces) in enumerate(entries)}
    checked = 0
    total = 0
    for ps in sets.values():
        for j in np.flatnonzero(ps.labels == 1):
            total += 1
            index, faces = by_path[ps.photos[ps.photo[j]]]
            k = int(ps.face[j])
            img, owner = _paint(index, faces, grey=index in GREY_PHOTOS)
            tight = fddb.ellipse_box(*faces[k])
            expected = fddb.clip_box(fddb.square_box(tight), *img.size)
            np.testing.assert_allclose(ps.boxes[j], expected, atol=1e-3)
            cx = int((expected[0] + expected[2]) / 2)
            cy = int((expected[1] + expected[3]) / 2)
            # Only where this face, not a later-painted neighbour, covers the crop's centre.
            if not (owner[cy - 2 : cy + 3, cx - 2 : cx + 3] == k + 1).all():
                continue
            checked += 1
            centre = ps.images[j][:, 15:17, 15:17].reshape(3, -1).mean(axis=1)
            if index in GREY_PHOTOS:
                colour = (GREY_LEVELS[k % 10],) * 3
                assert (ps.images[j][0] == ps.images[j][1]).all()
                assert (ps.images[j][1] == ps.images[j][2]).all()
            else:
                colour = PALETTE[k % 10]
            np.testing.assert_allclose(centre, colour, atol=30)
    assert checked >= 0.8 * total > 0


def test_negatives_stay_clear_of_every_face(built, entries: list[Entry]) -> None:
    sets, _info = built
    by_path = dict(entries)
    seen = 0
    for ps in sets.values():
        for j in np.flatnonzero(ps.labels == 0):
            faces = by_path[ps.photos[ps.photo[j]]]
            box = ps.boxes[j].astype(np.float64)
            assert ps.face[j] == -1
            assert box[2] - box[0] == box[3] - box[1] > 0  # square windows
            for face in faces:
                tight = fddb.ellipse_box(*face)
                assert _iou(box, tight) < 0.3
                assert _iou(box, fddb.square_box(tight)) < 0.3
            seen += 1
    assert seen > 50


def test_folds_do_not_leak(built, entries: list[Entry]) -> None:
    sets, info = built
    photos = {split: set(ps.photos) for split, ps in sets.items()}
    assert not photos["train"] & photos["val"]
    assert not photos["train"] & photos["test"]
    assert not photos["val"] & photos["test"]
    for split, n in (("train", 1), ("val", 2), ("test", 3)):
        assert photos[split] == {path for path, _ in entries[FOLD_SLICES[n]]}
        ps = sets[split]
        assert set(ps.photo.tolist()) == set(range(len(ps.photos)))
    assert info["folds"] == {"train": [1], "val": [2], "test": [3]}


def test_negatives_follow_the_seed_and_the_ratio(tree: Path) -> None:
    photos, _ = fddb.read_fold(tree / fddb.FOLDS_DIR, 2)
    a = fddb.build_split(tree, photos, 16, 2.5, seed=1)
    b = fddb.build_split(tree, photos, 16, 2.5, seed=1)
    c = fddb.build_split(tree, photos, 16, 2.5, seed=2)
    assert np.array_equal(a.patches.images, b.patches.images)
    assert a.negatives == round(a.positives * 2.5) == a.target_negatives
    pos = a.patches.labels == 1
    assert np.array_equal(a.patches.boxes[pos], c.patches.boxes[c.patches.labels == 1])
    assert not np.array_equal(a.patches.boxes[~pos], c.patches.boxes[c.patches.labels == 0])


# ---- cache -----------------------------------------------------------------------------


def test_cache_is_reused_fast_and_rebuilt_when_a_parameter_changes(
    tree: Path, tmp_path: Path
) -> None:
    data = _copy(tree, tmp_path / "t")
    first = fddb.load(_request(data))
    assert first.info["cache"] == "built"
    cache_dir = data / fddb.CACHE_DIR
    assert [p.suffix for p in cache_dir.iterdir()] == [".npz"]  # no temp file left over

    started = time.perf_counter()
    second = fddb.load(_request(data))
    elapsed = time.perf_counter() - started
    assert second.info["cache"] == "hit"
    assert elapsed < 1.0
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert np.array_equal(getattr(first, name).numpy(), getattr(second, name).numpy())
    assert second.info["faces"] == first.info["faces"]

    smaller = fddb.load(_request(data, patch_size=24))
    assert smaller.info["cache"] == "built"
    assert smaller.train_x.shape[1:] == (3, 24, 24)
    reseeded = fddb.load(_request(data, seed=3))
    assert reseeded.info["cache"] == "built"
    assert len(list(cache_dir.glob("fddb-*.npz"))) == 3

    # Edited annotations invalidate the cache even with the same parameters.
    ellipses = data / fddb.FOLDS_DIR / "FDDB-fold-02-ellipseList.txt"
    lines = ellipses.read_text().splitlines()
    lines[2] = lines[2].replace(lines[2].split()[0], "40.000000", 1)
    ellipses.write_text("\n".join(lines) + "\n")
    assert fddb.load(_request(data)).info["cache"] == "built"


def test_unreadable_cache_is_rebuilt_with_a_warning(tree: Path, tmp_path: Path) -> None:
    data = _copy(tree, tmp_path / "t")
    first = fddb.load(_request(data))
    Path(first.info["cache_file"]).write_bytes(b"PK\x03\x04 not a zip")
    with pytest.warns(UserWarning, match="unreadable cache"):
        again = fddb.load(_request(data))
    assert again.info["cache"] == "built"
    assert np.array_equal(again.train_x.numpy(), first.train_x.numpy())


# ---- bad input ---------------------------------------------------------------------------


def _tiny_tree(root: Path, entries: list[Entry], photos: bool = False) -> Path:
    """Three folds of two photos each; photos are only written when asked."""
    folds = {1: slice(0, 2), 2: slice(2, 4), 3: slice(4, 6)}
    _write_folds(root, entries, folds)
    (root / fddb.PICS_DIR).mkdir(exist_ok=True)
    if photos:
        _write_photos(root, entries[:6])
    return root


def _edit(path: Path, line: int, text: str | None) -> None:
    lines = path.read_text().splitlines()
    if text is None:
        del lines[line - 1]
    else:
        lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "line, text, where, says",
    [
        (3, "55.012198 33.056167 -1.540952", 3, "expected 'major_radius"),
        (3, "55.0 33.0 -1.5 103.4 abc 1", 3, "expected 'major_radius"),
        (3, "nan 33.0 -1.5 103.4 107.8 1", 3, "finite"),
        (3, "-5 33.0 -1.5 103.4 107.8 1", 3, "positive"),
        (2, "two", 2, "expected the face count"),
        ("count+1", None, "path", "fewer faces follow"),
        ("count-1", None, "face2", "more ellipse lines follow"),
        ("last", None, "count2", "truncated"),
        (1, "../../../etc/passwd", 1, "leaves the data folder"),
        (1, "/etc/2002/07/31/big/img_228", 1, "leaves the data folder"),
    ],
    ids=[
        "short-line",
        "not-a-number",
        "nan",
        "negative-radius",
        "bad-count",
        "count-too-high",
        "count-too-low",
        "truncated-file",
        "parent-path",
        "absolute-path",
    ],
)
def test_bad_ellipse_file_names_file_and_line(
    tmp_path: Path, entries: list[Entry], line: Any, text: Any, where: Any, says: str
) -> None:
    data = _tiny_tree(tmp_path, entries)
    path = data / fddb.FOLDS_DIR / "FDDB-fold-01-ellipseList.txt"
    lines = path.read_text().splitlines()
    n1 = len(entries[0][1])
    if line == "count+1":
        _edit(path, 2, str(n1 + 1))
        where = 3 + n1  # the next photo's path, read as a face
    elif line == "count-1":
        _edit(path, 2, str(n1 - 1))
        where = 2 + n1  # the last face, read as a photo path
    elif line == "last":
        _edit(path, len(lines), None)
        where = 4 + n1  # the second photo's count line
    else:
        _edit(path, line, text)
    with pytest.raises(DataError) as err:
        fddb.load(_request(data))
    message = str(err.value)
    assert f"FDDB-fold-01-ellipseList.txt:{where}:" in message
    assert says in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "text, says",
    [
        ("/abs/2002/07/31/big/img_228", "leaves the data folder"),
        ("2002/01/01/big/img_0", "has no entry in FDDB-fold-01-ellipseList.txt"),
    ],
    ids=["absolute", "unannotated"],
)
def test_bad_fold_list_names_file_and_line(
    tmp_path: Path, entries: list[Entry], text: str, says: str
) -> None:
    data = _tiny_tree(tmp_path, entries)
    _edit(data / fddb.FOLDS_DIR / "FDDB-fold-01.txt", 2, text)
    with pytest.raises(DataError, match=f"FDDB-fold-01.txt:2: .*{says}"):
        fddb.load(_request(data))


def test_annotated_photo_missing_from_the_fold_list_is_an_error(
    tmp_path: Path, entries: list[Entry]
) -> None:
    data = _tiny_tree(tmp_path, entries)
    _edit(data / fddb.FOLDS_DIR / "FDDB-fold-01.txt", 2, None)
    line = 3 + len(entries[0][1])
    with pytest.raises(DataError, match=f"ellipseList.txt:{line}: .* not listed in"):
        fddb.load(_request(data))


def test_missing_photo_is_skipped_with_a_warning(tmp_path: Path, entries: list[Entry]) -> None:
    data = _tiny_tree(tmp_path, entries, photos=True)
    (data / fddb.PICS_DIR / f"{entries[1][0]}.jpg").unlink()
    with pytest.warns(UserWarning, match=r"FDDB-fold-01.txt:2 \(originalPics/.* is missing\)"):
        splits = fddb.load(_request(data))
    assert splits.info["skipped_images"] == 1
    assert splits.info["photos"]["train"] == 1
    assert int((splits.train_y == 1).sum()) == len(entries[0][1])


def test_missing_folders_say_what_and_how(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        fddb.load(_request(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message
    assert "originalPics/" in message and "FDDB-folds/" in message
    assert "FDDB-fold-01-ellipseList.txt" in message
    assert "vis-www.cs.umass.edu/fddb" in message


def test_missing_fold_names_the_files_and_the_folds_present(
    tmp_path: Path, entries: list[Entry]
) -> None:
    data = _tiny_tree(tmp_path, entries)
    with pytest.raises(DataError) as err:
        fddb.load(_request(data, val_folds=[9]))
    message = str(err.value)
    assert "fold 9 (data.val_folds) is missing" in message
    assert "FDDB-fold-09.txt" in message and "FDDB-fold-09-ellipseList.txt" in message
    assert "folds present: 1, 2, 3" in message


def test_a_fold_in_two_splits_is_refused(tmp_path: Path, entries: list[Entry]) -> None:
    data = _tiny_tree(tmp_path, entries)
    with pytest.raises(DataError, match="fold 1 is in both data.train_folds and data.test_folds"):
        fddb.load(_request(data, test_folds=[1]))


def test_a_photo_in_two_folds_is_refused(tmp_path: Path, entries: list[Entry]) -> None:
    data = _tiny_tree(tmp_path, entries)
    # Fold 3 takes fold 1's files: every photo now sits in train and test.
    for suffix in (".txt", "-ellipseList.txt"):
        shutil.copy(
            data / fddb.FOLDS_DIR / f"FDDB-fold-01{suffix}",
            data / fddb.FOLDS_DIR / f"FDDB-fold-03{suffix}",
        )
    with pytest.raises(DataError, match="FDDB-fold-03.txt:1: .* also in fold 1"):
        fddb.load(_request(data))


def test_registered_with_a_describe(tree: Path, tmp_path: Path) -> None:
    entry = registered()["fddb"]
    here = entry.describe(tree)
    assert here["present"] is True and here["folds"] == [1, 2, 3]
    assert here["where"] == str(tree)
    assert "FDDB-folds/FDDB-fold-10-ellipseList.txt" in here["files"]
    assert entry.describe(tmp_path)["present"] is False
    # `babysit datasets` reports the patch counts a run stores: those loading gives.
    listed = describe_dataset("fddb", tree, options=_options())
    assert listed["sizes"] == fddb.load(_request(tree)).sizes()
    assert listed["image"] == "3x32x32"
    missing = describe_dataset("fddb", tmp_path)
    assert missing["sizes"] is None
    assert missing["missing"].startswith("not downloaded: FDDB not found in ")
