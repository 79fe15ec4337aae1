"""``imagefolder``: folders of PNG and JPEG files decoded once into uint8 splits."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from PIL import ImageDraw

from babysit.data import DataError
from babysit.data import DataRequest
from babysit.data import describe_dataset
from babysit.data import load_dataset
from babysit.data.imagefolder import describe
from babysit.data.imagefolder import load_folder
from babysit.spec import DataSpec
from tests.conftest import babysit
from tests.conftest import cli_env
from tests.conftest import popen

ENV = {"OMP_NUM_THREADS": "1"}
CLASSES = ("circle", "square", "triangle")


def _shape(kind: str, side: int, rng: random.Random, grey: bool) -> Image.Image:
    img = Image.new("L" if grey else "RGB", (side, side), 20 if grey else (20, 30, 40))
    pen = ImageDraw.Draw(img)
    s = rng.randint(side // 2, side - 2)
    x, y = rng.randint(0, side - s), rng.randint(0, side - s)
    fill = rng.randint(150, 255) if grey else tuple(rng.randint(150, 255) for _ in range(3))
    if kind == "circle":
        pen.ellipse((x, y, x + s, y + s), fill=fill)
    elif kind == "square":
        pen.rectangle((x, y, x + s, y + s), fill=fill)
    else:
        pen.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=fill)
    return img


def make_folder(
    root: Path,
    per_class: int = 12,
    split: str = "train",
    side: int = 20,
    grey: bool = False,
    seed: int = 0,
) -> None:
    """Half PNG, half JPEG, in DIR/<split>/<class>/; sides other than the patch size."""
    rng = random.Random(seed)
    for kind in CLASSES:
        folder = root / split / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = "png" if i % 2 == 0 else "jpg"
            _shape(kind, side, rng, grey).save(folder / f"{kind}{i:03d}.{ext}")


def test_png_and_jpeg_decoded_resized_and_split_with_a_corrupt_file_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_folder(tmp_path, per_class=20)
    (tmp_path / "train" / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "train" / "circle" / "notes.txt").write_text("not an image, not counted")
    splits = load_folder(tmp_path, 16, seed=0, val_fraction=0.2, test_fraction=0.2)
    assert splits.classes == list(CLASSES)
    assert splits.train_x.dtype == torch.uint8 and splits.train_x.shape[1:] == (3, 16, 16)
    # Stratified: 20 per class -> 4 val, 4 test, 12 train each.
    assert splits.sizes() == {"train": 36, "val": 12, "test": 12}
    for part in ("train", "val", "test"):
        counts = torch.bincount(getattr(splits, f"{part}_y"), minlength=3).tolist()
        assert len(set(counts)) == 1
    assert splits.info["skipped_files"] == 1
    assert splits.info["files"] == 61
    assert splits.info["skipped"][0].startswith("train/square/broken.png (")
    assert splits.info["carved_from_train"] == ["val", "test"]
    assert "skipped 1 unreadable file(s): train/square/broken.png" in capsys.readouterr().err
    # Decoded once: the same folder and seed give the same tensors.
    again = load_folder(tmp_path, 16, seed=0, val_fraction=0.2, test_fraction=0.2)
    assert torch.equal(again.train_x, splits.train_x)
    assert torch.equal(again.test_y, splits.test_y)
    # The shuffle breaks the class order of the files, so the first examples mix classes.
    assert len(set(splits.train_y[:12].tolist())) > 1


def test_grey_images_give_one_channel_and_given_splits_are_kept(tmp_path: Path) -> None:
    make_folder(tmp_path, per_class=8, grey=True)
    make_folder(tmp_path, per_class=3, split="val", grey=True, seed=1)
    splits = load_folder(tmp_path, 12, seed=0, val_fraction=0.2, test_fraction=0.25)
    assert splits.info["mode"] == "L" and splits.in_channels == 1
    assert splits.image_size == 12
    assert splits.sizes()["val"] == 9  # the folder's own val, untouched
    assert splits.info["carved_from_train"] == ["test"]
    assert splits.sizes()["test"] == 6  # 25 % of 8 per class
    assert splits.sizes()["train"] == 18
    info = describe(tmp_path)
    assert info["present"] and info["classes"] == list(CLASSES)
    # `babysit datasets` reports the sizes a run stores (test carved out of train), not
    # the files in each folder.
    listed = describe_dataset(
        "imagefolder",
        tmp_path,
        options=DataSpec(patch_size=12, val_fraction=0.2, test_fraction=0.25),
    )
    assert listed["sizes"] == splits.sizes() and listed["image"] == "1x12x12"
    missing = describe_dataset("imagefolder", tmp_path / "nothing")
    assert missing["sizes"] is None and missing["missing"].startswith("not downloaded: ")


def test_one_colour_image_makes_every_image_rgb(tmp_path: Path) -> None:
    make_folder(tmp_path, per_class=4, grey=True)
    Image.new("RGB", (20, 20), (200, 0, 0)).save(tmp_path / "train" / "circle" / "red.png")
    splits = load_folder(tmp_path, 8, seed=0, val_fraction=0.25, test_fraction=0.25)
    assert splits.info["mode"] == "RGB" and splits.in_channels == 3


@pytest.mark.parametrize(
    "setup, words",
    [
        ("missing", "does not exist"),
        ("empty_train", "has no class folders"),
        ("empty_class", "class folder"),
        ("one_class", "needs at least two"),
        ("val_only", "has no train/ folder (it holds val/)"),
        ("flat", "has no train/ folder (it holds circle/, square/, triangle/)"),
        ("val_extra_class", "classes that train/ lacks: hexagon"),
        ("too_few", "needs at least 3 per class"),
        ("all_corrupt", "no readable images"),
    ],
)
def test_bad_folders(tmp_path: Path, setup: str, words: str) -> None:
    root = tmp_path / "images"
    if setup == "empty_train":
        (root / "train").mkdir(parents=True)
    elif setup == "empty_class":
        make_folder(root, per_class=4)
        (root / "train" / "hexagon").mkdir()
    elif setup == "one_class":
        make_folder(root, per_class=4)
        for kind in CLASSES[1:]:
            for f in (root / "train" / kind).iterdir():
                f.unlink()
            (root / "train" / kind).rmdir()
    elif setup == "val_only":
        make_folder(root, per_class=4, split="val")
    elif setup == "flat":
        make_folder(root, per_class=4)
        for kind in CLASSES:
            (root / "train" / kind).rename(root / kind)
        (root / "train").rmdir()
    elif setup == "val_extra_class":
        make_folder(root, per_class=4)
        make_folder(root, per_class=2, split="val")
        (root / "val" / "hexagon").mkdir()
        _shape("circle", 20, random.Random(0), False).save(root / "val" / "hexagon" / "h.png")
    elif setup == "too_few":
        make_folder(root, per_class=2)
    elif setup == "all_corrupt":
        for kind in CLASSES:
            (root / "train" / kind).mkdir(parents=True)
            (root / "train" / kind / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError) as err:
        load_folder(root, 16, seed=0, val_fraction=0.2, test_fraction=0.2)
    assert words in str(err.value)


def test_registered_and_sized_by_patch_size(tmp_path: Path) -> None:
    make_folder(tmp_path, per_class=6)
    opts = DataSpec(patch_size=10)
    splits = load_dataset(
        "imagefolder", DataRequest(data_dir=tmp_path, seed=0, download=False, options=opts)
    )
    assert splits.train_x.shape[1:] == (3, 10, 10)


@pytest.mark.slow
def test_imagefolder_through_the_cli_reports_the_skipped_file(tmp_path: Path) -> None:
    images = tmp_path / "images"
    make_folder(images, per_class=12)
    (images / "train" / "triangle" / "truncated.jpg").write_bytes(
        (images / "train" / "triangle" / "triangle001.jpg").read_bytes()[:40]
    )
    summary = tmp_path / "s.json"
    # `check` (sanity and overfit) loads and reports the data as `run` does, in seconds;
    # a whole run on 24 images at these budgets can end at chance, a narrowing verdict.
    proc = babysit(
        "check",
        "--name",
        "shapes",
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(images),
        "--set",
        "data.patch_size=16",
        "--set",
        "model.fc_width=128",
        "--set",
        "overfit.steps=60",
        "--set",
        "overfit.samples=8",
        "--quiet",
        "--summary-json",
        str(summary),
        cwd=tmp_path,
        env=cli_env(**ENV),
    )
    assert proc.returncode == 0, proc.stderr
    assert "imagefolder: skipped 1 unreadable file(s): train/triangle/truncated.jpg" in proc.stderr
    s = json.loads(summary.read_text())
    assert s["dataset"] == "imagefolder" and s["num_classes"] == 3
    assert s["data"]["skipped_files"] == 1
    assert s["data"]["skipped"][0].startswith("train/triangle/truncated.jpg")
    assert s["data"]["mode"] == "RGB" and s["data"]["image_size"] == 16
    assert s["data"]["loader"] == "tensor"
    assert s["stages"]["overfit"]["status"] == "passed"


@pytest.mark.slow
def test_missing_or_empty_image_folder_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "empty" / "train").mkdir(parents=True)
    procs = [
        popen(
            "run",
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(tmp_path / where),
            "--quiet",
            "--storage",
            f"sqlite:///{tmp_path / f'{where}.db'}",
            cwd=tmp_path,
            env=cli_env(**ENV),
        )
        for where in ("nowhere", "empty")
    ]
    for proc, words in zip(procs, ("does not exist", "has no class folders"), strict=True):
        _, err = proc.communicate(timeout=300)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert proc.returncode == 2, err
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith("babysit: ")
        assert words in lines[0] and "--data-dir DIR" in lines[0]
