"""A small, learnable labelled JPEG dataset made on the fly (no downloads).

Ten classes, each a distinct pattern (stripes of three orientations, checkerboard, dots, rings,
a filled disc, a square, a cross, noise blobs) drawn with random colours, phase, scale and
position, so the class is a property of the texture/shape, not of a colour or a pixel. Written
as real `.jpg` files in the ImageFolder layout `ROOT/<split>/<class>/<n>.jpg`.

    python -m tools.synthetic ROOT --train-per-class 100 --val-per-class 20
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

CLASS_NAMES = (
    "h_stripes",
    "v_stripes",
    "d_stripes",
    "checker",
    "dots",
    "rings",
    "disc",
    "square",
    "cross",
    "blobs",
)


def _pattern(cls: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Float mask in [0, 1] of shape [size, size] drawing class `cls`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    period = rng.uniform(0.12, 0.22)
    phase = rng.uniform(0, 1)
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    if cls == 0:
        m = ((yy / period + phase) % 1.0) < 0.5
    elif cls == 1:
        m = ((xx / period + phase) % 1.0) < 0.5
    elif cls == 2:
        m = (((xx + yy) / (period * 1.4) + phase) % 1.0) < 0.5
    elif cls == 3:
        m = (((xx / period).astype(int) + (yy / period).astype(int)) % 2) == 0
    elif cls == 4:
        gx = ((xx / period + phase) % 1.0) - 0.5
        gy = ((yy / period + phase) % 1.0) - 0.5
        m = gx**2 + gy**2 < 0.08
    elif cls == 5:
        m = ((r / (period * 0.8) + phase) % 1.0) < 0.5
    elif cls == 6:
        m = r < rng.uniform(0.2, 0.3)
    elif cls == 7:
        half = rng.uniform(0.18, 0.28)
        m = (np.abs(xx - cx) < half) & (np.abs(yy - cy) < half)
    elif cls == 8:
        arm = rng.uniform(0.05, 0.09)
        m = (np.abs(xx - cx) < arm) | (np.abs(yy - cy) < arm)
    elif cls == 9:
        m = np.zeros_like(xx, dtype=bool)
        for _ in range(6):
            bx, by = rng.uniform(0, 1, size=2)
            m |= (xx - bx) ** 2 / rng.uniform(0.002, 0.02) + (yy - by) ** 2 / rng.uniform(0.002, 0.02) < 1
    else:
        raise ValueError(f"class index {cls} out of range 0..{len(CLASS_NAMES) - 1}")
    return m.astype(np.float32)


def render(cls: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image [size, size, 3] of class `cls`."""
    fg = rng.uniform(0, 255, size=3)
    bg = rng.uniform(0, 255, size=3)
    # Keep foreground and background apart so the pattern survives JPEG and small crops.
    while np.abs(fg - bg).sum() < 200:
        bg = rng.uniform(0, 255, size=3)
    m = _pattern(cls, size, rng)[..., None]
    img = m * fg + (1 - m) * bg + rng.normal(0, 8, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(
    root: str,
    train_per_class: int = 100,
    val_per_class: int = 20,
    size: int = 64,
    num_classes: int = 10,
    seed: int = 0,
    quality: int = 90,
) -> str:
    """Write the dataset under `root` (train/ and, if val_per_class > 0, val/) and return `root`."""
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in 1..{len(CLASS_NAMES)}, got {num_classes}")
    rng = np.random.default_rng(seed)
    splits = [("train", train_per_class), ("val", val_per_class)]
    for split, per_class in splits:
        if per_class <= 0:
            continue
        for cls in range(num_classes):
            folder = os.path.join(root, split, f"{cls:02d}_{CLASS_NAMES[cls]}")
            os.makedirs(folder, exist_ok=True)
            for n in range(per_class):
                img = Image.fromarray(render(cls, size, rng))
                img.save(os.path.join(folder, f"{split}_{cls:02d}_{n:05d}.jpg"), quality=quality)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    make_dataset(a.root, a.train_per_class, a.val_per_class, a.size, a.num_classes, a.seed)
    print(a.root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
