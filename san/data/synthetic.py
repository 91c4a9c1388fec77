"""Procedural scenes with ground-truth labels: the default dataset, no download needed.

Each class has its own base colour and texture (stripes, checkerboard or blotchy
noise at a class-specific frequency and orientation). Each image is a warped Voronoi
partition of 2-4 classes, with a per-image colour shift and per-region tint, so that
a single colour threshold does not separate the classes but colour plus texture does.
"""

from __future__ import annotations

import colorsys
import zlib
from collections.abc import Iterator

import numpy as np
import torch

from san.data.base import IndexedSource, encode_png

_TEXTURES = ("stripes", "checker", "noise")


class SyntheticScenes(IndexedSource):
    """Deterministic from (seed, split, index); class appearance depends only on n_classes."""

    def __init__(
        self, n_images: int, image_size: int, n_classes: int, seed: int = 0, split: str = "train"
    ) -> None:
        if not 2 <= n_classes <= 20:
            raise ValueError(f"n_classes={n_classes} must be in 2..20")
        if n_images < 1 or image_size < 8:
            raise ValueError(f"n_images={n_images} must be >= 1 and image_size={image_size} >= 8")
        self.n_images = n_images
        self.image_size = int(image_size)
        self.n_classes = n_classes
        self.class_names = [f"region{i}" for i in range(n_classes)]
        self.seed = seed
        self.split = split
        self._split_code = zlib.crc32(split.encode())
        # Class appearance is fixed by n_classes alone so train and val always agree.
        rng = np.random.default_rng(20230 + n_classes)
        golden = 0.6180339887
        self._hue = (np.arange(n_classes) * golden) % 1.0
        self._sat = rng.uniform(0.45, 0.9, n_classes)
        self._val = rng.uniform(0.5, 0.9, n_classes)
        self._texture = np.arange(n_classes) % len(_TEXTURES)
        self._freq = rng.uniform(3.0, 9.0, n_classes)  # cycles per image side
        self._angle = rng.uniform(0, np.pi, n_classes)
        self._amp = rng.uniform(0.2, 0.35, n_classes)
        side = self.image_size
        self._grid = (np.arange(side, dtype=np.float32) + 0.5) / side

    def __len__(self) -> int:
        return self.n_images

    def _texture_map(self, cls: int, rng: np.random.Generator) -> np.ndarray:
        """A [-1, 1] pattern for class `cls`, with a random phase per image.

        Waves are built from 1-D sines and outer products (sin(a+b) expanded), which
        keeps a 128x128 image well under a millisecond per class.
        """
        side = self.image_size
        g = self._grid
        kind = _TEXTURES[self._texture[cls]]
        freq = self._freq[cls] * (side / 128) ** 0.5 * rng.uniform(0.9, 1.1)
        angle = self._angle[cls] + rng.uniform(-0.15, 0.15)
        phase = rng.uniform(0, 2 * np.pi, 2)
        if kind == "noise":
            cells = max(2, int(round(freq * 1.5)))
            coarse = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
            index = np.minimum((g * cells).astype(np.int64), cells)
            return coarse[index[:, None], index[None, :]]
        w = np.float32(2 * np.pi * freq)
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        # u = x cos + y sin; v = -x sin + y cos; sin(w u + p) from 1-D parts.
        wave = _wave(w * c * g, w * s * g, phase[0])
        if kind == "stripes":
            return wave
        return np.sign(wave * _wave(-w * s * g, w * c * g, phase[1]))

    def _regions(self, rng: np.random.Generator) -> np.ndarray:
        """Warped Voronoi partition labelled with 2-4 (at most n_classes) classes."""
        k = int(rng.integers(2, min(4, self.n_classes) + 1))
        classes = rng.choice(self.n_classes, size=k, replace=False)
        n_seeds = int(rng.integers(k, k + 5))
        seed_cls = np.concatenate([classes, rng.choice(classes, size=n_seeds - k)])
        points = rng.uniform(0.05, 0.95, (n_seeds, 2)).astype(np.float32)
        # A smooth displacement makes region borders curvy instead of straight.
        a, f, p = rng.uniform(0.03, 0.08, 2), rng.uniform(1.5, 3.5, 2), rng.uniform(0, 6.3, 2)
        g = self._grid
        shift_x = (a[0] * np.sin(2 * np.pi * f[0] * g + p[0])).astype(np.float32)
        shift_y = (a[1] * np.sin(2 * np.pi * f[1] * g + p[1])).astype(np.float32)
        best = np.full((len(g), len(g)), np.inf, dtype=np.float32)
        label = np.zeros((len(g), len(g)), dtype=np.uint8)
        for (px, py), cls in zip(points, seed_cls, strict=True):
            dx = g[None, :] + shift_x[:, None] - px  # x warped along y
            dy = g[:, None] + shift_y[None, :] - py  # y warped along x
            d = dx * dx + dy * dy
            closer = d < best
            np.copyto(best, d, where=closer)
            label[closer] = cls
        return label

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 HxWx3 image, uint8 HxW label) for one index, deterministically."""
        if not 0 <= index < self.n_images:
            raise IndexError(f"index {index} out of range for {self.n_images} images")
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self._split_code, index])
        label = self._regions(rng)
        hue_shift = rng.uniform(-0.03, 0.03)
        gain = rng.uniform(0.8, 1.2)
        palette = np.zeros((self.n_classes, 3), dtype=np.float32)
        shade = np.ones(label.shape, dtype=np.float32)
        for cls in np.flatnonzero(np.bincount(label.ravel())):
            hue = (self._hue[cls] + hue_shift + rng.uniform(-0.015, 0.015)) % 1.0
            sat = np.clip(self._sat[cls] + rng.uniform(-0.1, 0.1), 0, 1)
            val = np.clip(self._val[cls] * gain + rng.uniform(-0.08, 0.08), 0.05, 1)
            palette[cls] = colorsys.hsv_to_rgb(hue, sat, val)
            texture = self._texture_map(int(cls), rng)
            np.copyto(shade, 1 + self._amp[cls] * texture, where=label == cls)
        # Grain: one multiplicative noise value per pixel (cheaper than per channel).
        shade += 0.06 * rng.standard_normal(shade.shape, dtype=np.float32)
        image = np.take(palette, label, axis=0) * shade[..., None]
        image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
        return image, label

    def __getitem__(self, index: int) -> dict:
        image, label = self.render(index)
        return {
            "id": f"{self.split}-{index:06d}",
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": torch.from_numpy(label),
        }

    def iter_records(self) -> Iterator[dict]:
        """Samples encoded as PNG, in the form `shards.write_shards` takes."""
        for index in range(self.n_images):
            image, label = self.render(index)
            yield {
                "id": f"{self.split}-{index:06d}",
                "image_bytes": encode_png(image),
                "label_bytes": encode_png(label),
                "width": self.image_size,
                "height": self.image_size,
            }


def _wave(ax: np.ndarray, by: np.ndarray, phase: float) -> np.ndarray:
    """sin(ax[x] + by[y] + phase) as an HxW map, from 1-D sines and cosines."""
    by = by + np.float32(phase)
    return np.sin(by)[:, None] * np.cos(ax)[None, :] + np.cos(by)[:, None] * np.sin(ax)[None, :]
