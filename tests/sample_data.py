"""Small datasets that tests write on disk in the layouts the adapters read."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from san.data import encode_png


def write_folder(root: Path, n: int = 3, size: int = 32, n_classes: int = 3) -> Path:
    """A tiny images/ + labels/ folder dataset with train and val splits and classes.txt."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(n):
            image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            label = rng.integers(0, n_classes, (size, size), dtype=np.uint8)
            (root / split / "images" / f"img{i}.png").write_bytes(encode_png(image))
            (root / split / "labels" / f"img{i}.png").write_bytes(encode_png(label))
    (root / "classes.txt").write_text("\n".join(f"c{i}" for i in range(n_classes)))
    return root
