"""What the standard-layout adapters (COCO-Stuff, Cityscapes, Potsdam) share.

An adapter lists its samples once, from the dataset's own on-disk layout, as
`(id, image path, label path | None)`, and maps the dataset's raw label ids to the
benchmark's classes with a 256-entry lookup table (255 = ignore). Everything else is
here: reading through fsspec (so a root may be a local path or an `s3://` URL), decoding
with errors that name the sample id, the map-style access training streams from, the
records `write_shards` takes, and a cheap fingerprint of the source that lets
`pipelines/prepare_data.py` skip work that is already done.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image

from san.data.base import DataError, IndexedSource, decode_image, encode_png, first_line
from san.storage import ForkSafeFilesystem

IGNORE = 255


def lookup_table(mapping: dict[int, int]) -> np.ndarray:
    """A uint8 table of 256 entries: raw id -> class, every unmapped id -> IGNORE."""
    table = np.full(256, IGNORE, dtype=np.uint8)
    for raw, cls in mapping.items():
        if not 0 <= raw <= 255 or not (0 <= cls < IGNORE or cls == IGNORE):
            raise ValueError(f"bad label mapping entry {raw} -> {cls}")
        table[raw] = cls
    return table


def remap(raw: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Map raw label ids through `table`; ids outside 0..255 (e.g. -1 in int32 maps) -> IGNORE."""
    if raw.dtype == np.uint8:
        return table[raw]
    raw = raw.astype(np.int64)
    out = np.full(raw.shape, IGNORE, dtype=np.uint8)
    inside = (raw >= 0) & (raw <= 255)
    out[inside] = table[raw[inside]]
    return out


def decode_raw_label(data: bytes, sample_id: str) -> np.ndarray:
    """A single-channel label PNG -> its raw ids (HxW); DataError naming the id otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            array = np.asarray(im)
    except Exception as exc:  # PIL raises many types for corrupt files
        raise DataError(f"label {sample_id!r} could not be decoded: {first_line(exc)}") from None
    if array.ndim != 2:
        raise DataError(
            f"label {sample_id!r} has shape {array.shape}; expected one channel of class ids"
        )
    return array


def check_label_size(image_hw: tuple[int, int], label: np.ndarray, sample_id: str) -> None:
    """A label must cover its image pixel for pixel (message in width x height)."""
    if tuple(label.shape) != tuple(image_hw):
        raise DataError(
            f"label {sample_id!r} is {label.shape[1]}x{label.shape[0]} but its image is "
            f"{image_hw[1]}x{image_hw[0]} (width x height); they must match"
        )


def file_sizes(fs: fsspec.AbstractFileSystem, paths: Sequence[str | None]) -> list[int]:
    """Size of each path (-1 when missing, 0 for None), from one listing per parent folder.

    Listing folders instead of asking per file keeps this to a few requests on S3.
    """
    parents = sorted({os.path.dirname(str(p)) for p in paths if p is not None})
    known: dict[str, int] = {}
    for parent in parents:
        try:
            entries = fs.ls(parent, detail=True)
        except FileNotFoundError:
            continue
        for entry in entries:
            name = str(entry["name"]).rstrip("/")
            known[name] = int(entry.get("size") or 0)
            known[fs._strip_protocol(name)] = known[name]
    return [0 if p is None else known.get(fs._strip_protocol(str(p)), -1) for p in paths]


def fingerprint(source: Any, dataset: str) -> dict:
    """Count and hash of (id, image size, label size) for a source listing its files.

    Works for any source with `ids`, `image_paths`, `label_paths` (and `fs`, else local):
    the adapters here and `FolderDataset`. Content edits that keep a file's size are not
    seen; that is the price of not reading every file to decide whether to rewrite.
    """
    fs = getattr(source, "fs", None) or fsspec.filesystem("file")
    images = file_sizes(fs, [str(p) for p in source.image_paths])
    labels = file_sizes(fs, [None if p is None else str(p) for p in source.label_paths])
    items = [[i, a, b] for i, a, b in zip(source.ids, images, labels, strict=True)]
    text = json.dumps({"dataset": dataset, "split": source.split, "items": items})
    return {"n_items": len(items), "sha256": hashlib.sha256(text.encode()).hexdigest()}


class LayoutDataset(ForkSafeFilesystem, IndexedSource):
    """Base adapter: subclasses fill `ids`, `image_paths`, `label_paths` and `table`.

    Subclasses override `load_image` when images are not plain JPEG/PNG files (Potsdam's
    .mat tiles) and `load_label` when labels are not single-channel PNGs.
    """

    # Raw label id -> class (uint8, 256 entries, IGNORE where unmapped).
    table: np.ndarray
    class_names: list[str]
    n_classes: int
    LAYOUT = ""

    def __init__(self, root: str, split: str) -> None:
        self.split = split
        self.root = self._open_filesystem(str(root).rstrip("/") or str(root))
        self.ids: list[str] = []
        self.image_paths: list[str] = []
        self.label_paths: list[str | None] = []

    # -- listing helpers for subclasses

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def require_dir(self, path: str) -> None:
        """DataError naming the folder and the expected layout when `path` is not a folder."""
        try:
            ok = self.fs.isdir(path)
        except Exception as exc:  # noqa: BLE001 - any backend failure reads the same
            raise DataError(f"cannot read {path}: {first_line(exc)}") from None
        if not ok:
            raise DataError(f"folder {path!r} not found; expected {self.LAYOUT}")

    def read_text(self, path: str) -> str:
        try:
            return self.fs.cat_file(path).decode()
        except FileNotFoundError:
            raise DataError(f"file {path!r} not found; expected {self.LAYOUT}") from None
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"cannot read {path}: {first_line(exc)}") from None

    def listing(self, folder: str, suffix: str) -> list[str]:
        """Sorted paths under `folder` (recursively) whose names end with `suffix`."""
        self.require_dir(folder)
        found = self.fs.find(folder)
        return sorted(str(p) for p in found if str(p).endswith(suffix))

    def check_not_empty(self) -> None:
        if not self.ids:
            raise DataError(
                f"{type(self).__name__} split {self.split!r} at {self.url} has no images; "
                f"expected {self.LAYOUT}"
            )

    # -- reading

    def __len__(self) -> int:
        return len(self.ids)

    def read_bytes(self, path: str, sample_id: str) -> bytes:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise DataError(f"sample {sample_id!r}: file {path} is missing") from None
        except Exception as exc:  # noqa: BLE001
            message = f"sample {sample_id!r}: cannot read {path}: {first_line(exc)}"
            raise DataError(message) from None

    def load_image(self, data: bytes, sample_id: str) -> tuple[np.ndarray, bytes]:
        """(uint8 HxWx3 RGB, bytes to store); JPEG/PNG files are stored as they are."""
        image = decode_image(data, sample_id).permute(1, 2, 0).numpy()
        return image, data

    def load_label(self, data: bytes, sample_id: str) -> np.ndarray:
        """Raw label ids (HxW) from a label file."""
        return decode_raw_label(data, sample_id)

    def load(self, index: int) -> tuple[str, np.ndarray, bytes, np.ndarray | None]:
        """(id, RGB image, image bytes to store, remapped uint8 label or None)."""
        sample_id = self.ids[index]
        image, stored = self.load_image(
            self.read_bytes(self.image_paths[index], sample_id), sample_id
        )
        label_path = self.label_paths[index] if self.load_labels else None
        label = None
        if label_path is not None:
            raw = self.load_label(self.read_bytes(label_path, sample_id), sample_id)
            check_label_size(image.shape[:2], raw, sample_id)
            label = remap(raw, self.table)
        return sample_id, image, stored, label

    def __getitem__(self, index: int) -> dict:
        sample_id, image, _, label = self.load(index)
        return {
            "id": sample_id,
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": None if label is None else torch.from_numpy(label),
        }

    def record(self, index: int) -> dict:
        """One sample in the form `shards.write_shards` takes; DataError naming a bad one."""
        sample_id, image, stored, label = self.load(index)
        return {
            "id": sample_id,
            "image_bytes": stored,
            "label_bytes": None if label is None else encode_png(label),
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
        }

    def iter_records(self, validate: bool = True) -> Iterator[dict]:
        """Every sample as a `write_shards` record (always decoded: labels must be remapped)."""
        for index in range(len(self)):
            yield self.record(index)

    def fingerprint(self, dataset: str) -> dict:
        return fingerprint(self, dataset)


def stem(path: str | Path, suffix: str = "") -> str:
    """File name without folder and without `suffix` (or its last extension)."""
    name = os.path.basename(str(path))
    if suffix and name.endswith(suffix):
        return name[: -len(suffix)]
    return os.path.splitext(name)[0]
