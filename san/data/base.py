"""Pieces every data source shares: the error type, decoding, and index partitioning.

Kept apart from `__init__` so the dataset modules can import it without a cycle.
"""

from __future__ import annotations

import functools
import io
import logging
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("san")


class DataError(ValueError):
    """A dataset is missing, empty or holds a bad sample (one-line message naming it)."""


class SkipBad:
    """`on_bad` hook for a source: skip a bad sample with a warning naming it, up to a limit.

    A corrupt file deep in a large dataset should not kill a long run hours in, but many
    bad files mean a broken dataset, so past `limit` skips (per reading process) the run
    stops with a DataError. Each warning carries the running count.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def __call__(self, exc: DataError) -> None:
        self.count += 1
        if self.count > self.limit:
            raise DataError(
                f"{self.count} bad samples, more than data.max_bad_samples={self.limit}; "
                f"last: {exc}"
            ) from None
        log.warning("skipped bad sample %d of at most %d: %s", self.count, self.limit, exc)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text, so our messages stay one line."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# The signatures of the formats given to torchcodec's decoders: JPEG (SOI marker), PNG.
_JPEG_OR_PNG = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


@functools.cache
def _torchcodec_decoder() -> Callable | None:
    """torchcodec's decode_image, or None (with a warning, once per process) where it is
    missing (benchmarks/gpu_device.sh's bare image) or cannot load: its wheel links one
    CUDA version's libraries, and a torch built for another does not provide them."""
    try:
        from torchcodec.decoders import decode_image
    except Exception as exc:  # ImportError, or OSError from loading its native library
        log.warning("torchcodec unavailable (%s); decoding images with PIL", first_line(exc))
        return None
    return decode_image


_EXIF_ORIENTATION = 0x0112


def _jpeg_header_has_exif(data: bytes) -> bool:
    """Whether a JPEG's header segments (those before its first scan) include EXIF: a walk
    over a few segment headers, where searching the bytes took 7 us per CamVid JPEG."""
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
        elif marker == 0xDA:  # start of scan: the header is over
            return False
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            at += 2
        elif marker == 0xE1 and data[at + 4 : at + 10] == b"Exif\x00\x00":
            return True
        else:
            at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return False


def _exif_turns(data: bytes) -> bool:
    """Whether a JPEG/PNG carries an EXIF orientation other than "as stored".

    torchcodec turns such an image upright; PIL, and with it every label drawn on the
    stored pixels (what STEGO's loaders read), does not. A 180-degree turn keeps the size,
    so nothing else would notice labels landing on the wrong pixels. PIL reads the tag only
    where a JPEG header or a PNG holds EXIF, which none of CamVid's files do.
    """
    has_exif = _jpeg_header_has_exif(data) if data[:2] == b"\xff\xd8" else b"eXIf" in data
    if not has_exif:
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.getexif().get(_EXIF_ORIENTATION, 1) != 1
    except Exception:  # noqa: BLE001 - unreadable here: PIL's decode names the problem
        return True


def _decode_with_torchcodec(data: bytes) -> torch.Tensor | None:
    """JPEG/PNG bytes -> uint8 3xHxW RGB through torchcodec's decoders (libjpeg-turbo and
    libpng, as PIL's, written straight into a tensor); None for other formats, for what
    they refuse (PIL then decides, and names the problem), for 16-bit PNGs (PIL's
    conversion to 8 bits is the one this project has always used) and for files with an
    EXIF orientation (`_exif_turns`).

    The same pixels as PIL's, bit for bit, on all 936 CamVid JPEGs and PNGs and on
    grayscale, CMYK, palette and alpha files; decode_image 0.27 -> 0.22 ms per CamVid
    JPEG, 7-20% less per PNG. torchvision's decoders (as fast) are deprecated since 0.29
    in favour of these.
    """
    decode_with_torchcodec = _torchcodec_decoder()
    if decode_with_torchcodec is None or not data.startswith(_JPEG_OR_PNG):
        return None
    if _exif_turns(data):
        return None
    try:
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        image = decode_with_torchcodec(encoded, mode="RGB", output_dtype="auto")
    except (RuntimeError, ValueError):
        return None
    return image if image.dtype == torch.uint8 else None


def decode_image(data: bytes, sample_id: str) -> torch.Tensor:
    """Encoded JPEG/PNG bytes -> uint8 3xHxW RGB tensor; DataError naming the id if corrupt.

    The tensor is a 3xHxW view of H x W x 3 (channels-last) memory, the layout decoders
    write: reordering it would cost a strided copy of every pixel, and the resize that
    makes training views is fastest on this layout anyway.
    """
    image = _decode_with_torchcodec(data)
    if image is not None:
        return image
    try:
        with Image.open(io.BytesIO(data)) as im:
            array = np.array(im.convert("RGB"))  # a writable copy, which torch can share
    except Exception as exc:  # PIL raises many types for corrupt files
        raise DataError(f"image {sample_id!r} could not be decoded: {first_line(exc)}") from None
    return torch.from_numpy(array).permute(2, 0, 1)


def _from_raw(
    data: bytes | memoryview, shape: tuple[int, ...], kind: str, noun: str, sample_id: str
) -> torch.Tensor:
    """Raw uint8 bytes -> a uint8 tensor of `shape` (height, width[, channels]); DataError
    naming the `kind` ("image", "label") and id if the byte count differs.

    A writable buffer (a view of the column Arrow has just read, `shards._binary_views`)
    becomes the tensor's memory as it is: copying a 240x180 image out of it again cost 7%
    of the training data path's time from raw shards. Read-only bytes are copied once
    (a tensor must be writable); so is a read-only view, such as one of a memory-mapped
    file, which must never be written through."""
    height, width, needed = shape[0], shape[1], math.prod(shape)
    if len(data) != needed:
        raise DataError(
            f"{kind} {sample_id!r} has {len(data)} raw bytes; a {width}x{height} {noun} "
            f"(width x height) needs {needed}"
        )
    writable = isinstance(data, memoryview) and not data.readonly
    return torch.frombuffer(data if writable else bytearray(data), dtype=torch.uint8).view(shape)


def decode_raw(data: bytes | memoryview, height: int, width: int, sample_id: str) -> torch.Tensor:
    """Raw uint8 H x W x 3 pixel bytes -> uint8 3xHxW tensor, as `decode_image` gives
    (a view of channels-last memory).

    No decode, and no copy of a writable buffer (`_from_raw`); DataError naming the id if
    the byte count does not match.
    """
    return _from_raw(data, (height, width, 3), "image", "RGB image", sample_id).permute(2, 0, 1)


def decode_label_ids(data: bytes, height: int, width: int, sample_id: str) -> torch.Tensor:
    """Raw uint8 class ids (height x width bytes, row-major) -> uint8 HxW tensor, as
    `decode_label` gives; DataError naming the id if the byte count does not match."""
    return _from_raw(data, (height, width), "label", "label", sample_id)


def decode_label(data: bytes, sample_id: str) -> torch.Tensor:
    """Encoded single-channel PNG bytes -> uint8 HxW class ids; DataError naming the id."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DataError(
                    f"label {sample_id!r} has mode {im.mode!r}; expected a single-channel "
                    "PNG of class ids (mode L or P)"
                )
            array = np.asarray(im)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"label {sample_id!r} could not be decoded: {first_line(exc)}") from None
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DataError(f"label {sample_id!r} has class ids outside 0..255")
        array = array.astype(np.uint8)
    return torch.from_numpy(array.copy())


def encode_png(array: np.ndarray | torch.Tensor) -> bytes:
    """uint8 HxW (label) or HxWx3 (image) array -> PNG bytes (lossless, fast compression)."""
    if isinstance(array, torch.Tensor):
        array = array.numpy()
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"encode_png needs uint8, got {array.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def check_sizes(image: torch.Tensor, label: torch.Tensor | None, sample_id: str) -> None:
    """A label must cover its image pixel for pixel."""
    if label is not None and tuple(label.shape) != tuple(image.shape[-2:]):
        raise DataError(
            f"label {sample_id!r} is {label.shape[1]}x{label.shape[0]} but its image is "
            f"{image.shape[2]}x{image.shape[1]} (width x height); they must match"
        )


def epoch_rng(seed: int, epoch: int, *extra: int) -> np.random.Generator:
    """One numpy generator per (seed, epoch, ...): every partition draws the same order."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, *extra])


def partition_indices(
    n: int, part: int, n_parts: int, epoch: int, shuffle: bool, seed: int
) -> np.ndarray:
    """The indices of `part` out of `n_parts`: disjoint slices of one shared (shuffled) order."""
    if n_parts < 1 or not 0 <= part < n_parts:
        raise ValueError(f"part={part} must be in [0, n_parts={n_parts})")
    order = epoch_rng(seed, epoch).permutation(n) if shuffle else np.arange(n)
    return order[part::n_parts]


class IndexedSource:
    """Map-style source: subclasses give `__len__` and `__getitem__`; streaming comes free."""

    class_names: list[str] | None = None
    n_classes: int | None = None
    # Called with the DataError of a bad sample while streaming; None re-raises it.
    on_bad: Callable[[DataError], None] | None = None
    # Training never looks at labels: it sets this False so they are neither read nor decoded.
    load_labels: bool = True

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def iter_partition(
        self, part: int, n_parts: int, epoch: int, shuffle: bool, seed: int, start: int = 0
    ) -> Iterator[dict]:
        """Yield this part's samples from position `start` of its epoch order, each with its
        "position" there; the parts of one epoch cover every item exactly once."""
        indices = partition_indices(len(self), part, n_parts, epoch, shuffle, seed)
        for position in range(start, len(indices)):
            try:
                sample = self[int(indices[position])]
            except DataError as exc:
                if self.on_bad is None:
                    raise
                self.on_bad(exc)
                continue
            sample["position"] = position
            yield sample
