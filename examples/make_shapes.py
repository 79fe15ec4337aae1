"""Write a small image folder to babysit: circles, squares and triangles.

    python make_shapes.py shapes              # shapes/train/{circle,square,triangle}/*.png

Each image is one shape of random size, position and colour on a random background, so
the classes are easy for a small CNN but not for a single pixel. Only ``train/`` is
written; babysit carves validation and test splits out of it (``data.val_fraction``,
``data.test_fraction``). Same seed, same images.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image
from PIL import ImageDraw

CLASSES = ("circle", "square", "triangle")


def draw(shape: str, size: int, rng: random.Random) -> Image.Image:
    # Drawn at 4x and downsampled: antialiased edges, like a photo's.
    big = size * 4
    # A dark background and a bright shape of any hue: the shape, not the colour, is
    # what tells the classes apart.
    background = tuple(rng.randrange(0, 80) for _ in range(3))
    colour = tuple(rng.randrange(150, 256) for _ in range(3))
    img = Image.new("RGB", (big, big), background)
    pen = ImageDraw.Draw(img)
    side = rng.uniform(0.5, 0.9) * big
    x0 = rng.uniform(0, big - side)
    y0 = rng.uniform(0, big - side)
    if shape == "circle":
        pen.ellipse((x0, y0, x0 + side, y0 + side), fill=colour)
    elif shape == "square":
        pen.rectangle((x0, y0, x0 + side, y0 + side), fill=colour)
    else:
        pen.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=colour)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (DIR/train/<class>/...)")
    parser.add_argument("--per-class", type=int, default=100, help="images per class")
    parser.add_argument("--size", type=int, default=32, help="side of each image in pixels")
    parser.add_argument("--format", choices=("png", "jpg"), default="png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for shape in CLASSES:
        folder = args.out / "train" / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            draw(shape, args.size, rng).save(folder / f"{shape}-{i:04d}.{args.format}")
    print(f"wrote {args.per_class * len(CLASSES)} images to {args.out / 'train'}")


if __name__ == "__main__":
    main()
