"""The plain `images/ + labels/` folder layout, which every standard dataset can be put into.

    <root>/<split>/images/<id>.jpg|jpeg|png (also .bmp, .webp, .tif, through PIL)
    <root>/<split>/labels/<id>.png      optional; uint8 class ids, 255 = ignore
    <root>/classes.txt | classes.json   optional class names

Problems are reported as one-line `DataError`s naming the path or sample id: a missing
or empty folder when the dataset is built, a bad image or label when it is read. Files
the layout does not read (other formats, labels without an image) are counted in a
warning, never dropped without a word.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from san.data.base import (
    DataError,
    IndexedSource,
    check_sizes,
    decode_image,
    decode_label,
    log,
)

# JPEG and PNG decode through torchcodec, the others through PIL (san.data.base).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LAYOUT = (
    "<root>/<split>/images/<id>.(jpg|jpeg|png|bmp|webp|tif|tiff) with optional "
    "<root>/<split>/labels/<id>.png"
)


def read_class_names(*folders: Path) -> list[str] | None:
    """Class names from the first classes.txt (one per line) or classes.json found, else None."""
    for folder in folders:
        txt = folder / "classes.txt"
        if txt.is_file():
            names = [line.strip() for line in _read_text(txt).splitlines() if line.strip()]
            return _distinct(txt, names) or None
        js = folder / "classes.json"
        if js.is_file():
            try:
                data = json.loads(_read_text(js))
            except json.JSONDecodeError as exc:
                raise DataError(f"{js} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
            if isinstance(data, dict) and "class_names" in data:
                data = data["class_names"]
            if isinstance(data, dict):  # {"0": "sky", "1": "building", ...}
                # The keys are the class ids: they must be 0..N-1, or a name would go to
                # another class's id ({"0": .., "1": .., "3": "car"} named id 2 "car").
                by_id = {str(i): data.get(str(i)) for i in range(len(data))}
                if set(data) != set(by_id):
                    raise DataError(
                        f"{js} maps class ids to names: its keys must be the ids 0..N-1, "
                        f"got {sorted(data)[:6]}"
                    )
                data = list(by_id.values())
            if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
                raise DataError(
                    f"{js} must hold a list of class names, {{'class_names': [...]}} "
                    "or {'0': name, ...}"
                )
            return _distinct(js, data) or None
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None


def _distinct(path: Path, names: list[str]) -> list[str]:
    """Each class its own name: two classes of one name report one iou/<name> metric."""
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"{path} names a class twice: {', '.join(map(repr, twice[:3]))}")
    return names


def _files(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    except OSError as exc:
        raise DataError(f"cannot list {str(folder)!r}: {exc.strerror}") from None


def _warn_ignored(folder: Path, names: list[str], what: str) -> None:
    if names:
        log.warning(
            "%s: %d %s (%s%s), ignored; expected %s",
            folder,
            len(names),
            what,
            ", ".join(names[:3]),
            ", ..." if len(names) > 3 else "",
            LAYOUT,
        )


class FolderDataset(IndexedSource):
    """Images (and optional labels) read from a folder, one file per sample."""

    def __init__(self, root: str, split: str) -> None:
        if "://" in root:
            raise DataError(
                f"data.dataset=folder reads a local folder; {root} is a URL: write it as shards "
                "with pipelines/prepare_data.py, or copy it here"
            )
        base = Path(root).expanduser()
        folder = base / split
        if not (folder / "images").is_dir() and (base / "images").is_dir():
            folder = base
        image_dir = folder / "images"
        if not image_dir.is_dir():
            raise DataError(
                f"image folder {str(base / split / 'images')!r} not found; expected {LAYOUT}"
            )
        self.root = base
        self.split = split
        self.folder = folder
        entries = _files(image_dir)
        files = sorted(p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(
                f"image folder {str(image_dir)!r} has no {'/'.join(IMAGE_SUFFIXES)} files; "
                f"expected {LAYOUT}"
            )
        _warn_ignored(image_dir, sorted(p.name for p in entries if p not in files), "not images")
        self.ids = [p.stem for p in files]
        if len(set(self.ids)) != len(self.ids):
            dupes = sorted({i for i in self.ids if self.ids.count(i) > 1})
            raise DataError(f"image folder {str(image_dir)!r} has duplicate ids: {dupes[:5]}")
        self.image_paths = files
        label_dir = folder / "labels"
        labels = {}
        if label_dir.is_dir():
            label_files = _files(label_dir)
            labels = {p.stem: p for p in label_files if p.suffix.lower() == ".png"}
            not_png = sorted(p.name for p in label_files if p.suffix.lower() != ".png")
            _warn_ignored(label_dir, not_png, "labels not PNG")
        self.label_paths: list[Path | None] = [labels.get(i) for i in self.ids]
        _warn_ignored(label_dir, sorted(set(labels) - set(self.ids)), "labels with no image")
        self.class_names = read_class_names(folder, base)
        self.n_classes = len(self.class_names) if self.class_names else None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_labels(self) -> bool:
        return any(p is not None for p in self.label_paths)

    def _read(self, path: Path, sample_id: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise DataError(f"sample {sample_id!r}: cannot read {path}: {exc.strerror}") from None

    def __getitem__(self, index: int) -> dict:
        sample_id = self.ids[index]
        image = decode_image(self._read(self.image_paths[index], sample_id), sample_id)
        label_path = self.label_paths[index] if self.load_labels else None
        label = None
        if label_path is not None:
            label = decode_label(self._read(label_path, sample_id), sample_id)
            check_sizes(image, label, sample_id)
        return {"id": sample_id, "image": image, "label": label}

    def iter_records(self, validate: bool = True) -> Iterator[dict]:
        """Samples as raw file bytes, in the form `shards.write_shards` takes.

        The encoded bytes are kept as they are; with `validate`, each sample is decoded
        once so a bad file fails here (naming its id) rather than during training.
        """
        for index in range(len(self.ids)):
            yield self.record(index, validate)

    def record(self, index: int, validate: bool = True) -> dict:
        """One sample of `iter_records`; a bad one raises DataError naming its id, so a caller
        can report it and go on with the next (pipelines/prepare_data.py --on-bad skip)."""
        sample_id = self.ids[index]
        image_bytes = self._read(self.image_paths[index], sample_id)
        label_path = self.label_paths[index]
        label_bytes = self._read(label_path, sample_id) if label_path else None
        image = decode_image(image_bytes, sample_id)
        if validate and label_bytes is not None:
            check_sizes(image, decode_label(label_bytes, sample_id), sample_id)
        return {
            "id": sample_id,
            "image_bytes": image_bytes,
            "label_bytes": label_bytes,
            "width": int(image.shape[2]),
            "height": int(image.shape[1]),
        }
