"""Parquet shards on any fsspec URL (local path or s3://): how prepared datasets are stored.

One row per image: `id`, `image`, `label` (null when unlabelled), `width`, `height`.
`image` holds, by the manifest's `image_encoding`:

- "source" (default): the encoded JPEG/PNG file bytes as they are: the smallest shards,
  but every read pays the decode (about 0.25 ms for a 240x180 JPEG and 0.6 ms at
  480x360, read included, on one core of the project's test machine);
- "raw": the decoded pixels, uint8 RGB, interleaved (height x width x 3), row-major:
  the same pixels, read with no decode at all, at about 8x the bytes of CamVid's JPEGs.
  Pick it when image decode limits training throughput and the storage is affordable
  (the approach of FFCV's raw write mode); benchmarks/data_path.py measures both.

`label` holds, by the manifest's `label_encoding`, the label PNG as it is ("png", what
"source" shards keep) or the class ids, uint8 height x width, row-major ("raw", what
"raw" shards keep), in a zstd-compressed column: CamVid's val labels take 1.7 KiB each
that way against 1.8 KiB as PNG, and read in 0.04 ms against 0.15 ms for a PNG decode.
Training never reads the label column. Manifests from before `label_encoding` mean "png".

A `manifest.json`, written last, lists the shards with their row counts and sha256
checksums; readers go through it, so a half-written dataset (no manifest yet) is never
read. Every file is written to a temporary name and then renamed, so an interrupted
write leaves no truncated shard behind.

Remote shards (s3://...) can be kept in a local cache directory (`data.shard_cache`):
each shard is fetched once, checked against its manifest sha256, and stored under that
checksum, so later epochs and restarts read local disk and a changed shard is never
confused with its old copy. Either way a reader fetches remote shards one ahead, in a
background thread, so it decodes one shard while the next is on its way; in training,
across epoch boundaries too.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor

from san.data.base import (
    DataError,
    check_sizes,
    decode_image,
    decode_label,
    decode_label_ids,
    decode_raw,
    encode_png,
    epoch_rng,
    first_line,
    log,
)
from san.storage import (
    ForkSafeFilesystem,
    StorageError,
    check_storage,
    fetch_object,
    filesystem,
)

__all__ = [
    "IMAGE_ENCODINGS",
    "LABEL_ENCODINGS",
    "SCHEMA",
    "ShardDataset",
    "decode_stored",
    "encode_png",
    "write_shards",
]

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.binary(), nullable=True),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
)
MANIFEST = "manifest.json"
SHARD_FORMAT = "san-parquet-shards"
IMAGE_ENCODINGS = ("source", "raw")
LABEL_ENCODINGS = ("png", "raw")
# Rows per Parquet row group: the unit a reader holds in memory at once.
ROW_GROUP = 64
# Dataset roots this process has looked for dictionary pages (`_check_page_layout`).
_PAGE_LAYOUT_CHECKED: set[str] = set()


def _atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write to a temporary sibling, then rename it into place."""
    parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
    tmp = (
        f"{parent}/.{name}.tmp-{uuid.uuid4().hex}" if parent else f".{name}.tmp-{uuid.uuid4().hex}"
    )
    with fs.open(tmp, "wb") as f:
        f.write(data)
    try:
        fs.mv(tmp, path)
    except Exception:
        fs.rm(tmp)
        raise


def _sha256(src: IO[bytes]) -> str:
    """Hex sha256 of what is left in `src`, read in 4 MiB chunks."""
    checksum = hashlib.sha256()
    while chunk := src.read(1 << 22):
        checksum.update(chunk)
    return checksum.hexdigest()


def _check_record_size(what: str, height_width: tuple[int, ...], record: dict) -> None:
    """A decoded image or label must have the size its record says (message in width x
    height), so a raw row's byte count and its width and height always agree."""
    height, width = height_width
    if (height, width) != (int(record["height"]), int(record["width"])):
        raise DataError(
            f"{what} {str(record['id'])!r} decodes to {width}x{height} but its record says "
            f"{record['width']}x{record['height']} (width x height)"
        )


def raw_pixels(record: dict) -> bytes:
    """A record's image as raw uint8 H x W x 3 bytes (the "raw" image encoding)."""
    image = decode_image(record["image_bytes"], str(record["id"]))
    _check_record_size("image", tuple(image.shape[1:]), record)
    return image.permute(1, 2, 0).numpy().tobytes()


def raw_label_ids(record: dict) -> bytes:
    """A record's label as raw uint8 class ids, H x W bytes (the "raw" label encoding)."""
    label = decode_label(record["label_bytes"], str(record["id"]))
    _check_record_size("label", tuple(label.shape), record)
    return label.numpy().tobytes()


def decode_stored(
    data: bytes | memoryview, encoding: str, height: int, width: int, sample_id: str
) -> Tensor:
    """A shard row's `image` column -> uint8 3xHxW, by the manifest's `image_encoding`."""
    if encoding == "raw":
        return decode_raw(data, height, width, sample_id)
    return decode_image(bytes(data), sample_id)


def _binary_views(column: pa.ChunkedArray) -> list[memoryview]:
    """Each value of a binary column without nulls, as a view of Arrow's buffer: a raw
    image's tensor is then that memory (`decode_raw`), not a copy of a bytes object made
    on the way (`col[r].as_py()`, 8 us more per 240x180 image, and the tensor's own copy
    of it cost more again). The tensors of a row group's images keep its buffer alive."""
    views: list[memoryview] = []
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        ends = np.frombuffer(offsets, dtype=offset_type)[chunk.offset :][: len(chunk) + 1]
        whole = memoryview(data) if data is not None else memoryview(b"")
        views.extend(whole[a:b] for a, b in itertools.pairwise(ends.tolist()))
    return views


def _table_bytes(rows: list[dict], image_encoding: str) -> bytes:
    raw = image_encoding == "raw"
    table = pa.Table.from_pydict(
        {
            "id": [str(r["id"]) for r in rows],
            "image": [raw_pixels(r) if raw else bytes(r["image_bytes"]) for r in rows],
            "label": [
                None
                if r.get("label_bytes") is None
                else (raw_label_ids(r) if raw else bytes(r["label_bytes"]))
                for r in rows
            ],
            "width": [int(r["width"]) for r in rows],
            "height": [int(r["height"]) for r in rows],
        },
        schema=SCHEMA,
    )
    sink = pa.BufferOutputStream()
    # Encoded images do not compress further, and raw pixels are read for speed: no
    # compression for them. Raw label ids (large flat regions) shrink 25x with zstd.
    compression = {name: "none" for name in SCHEMA.names}
    if raw:
        compression["label"] = "zstd"
    # No dictionary encoding: every image and label is unique, so Arrow's default puts a
    # whole row group's values in a dictionary page, and reading it back copies each value
    # twice (the dictionary, then the plain column). Measured per raw 240x180 image: the
    # row-group read 44 -> 21 us; read + decode through `iter_partition` 80 -> 42 us.
    pq.write_table(
        table, sink, row_group_size=ROW_GROUP, compression=compression, use_dictionary=False
    )
    return sink.getvalue().to_pybytes()


def write_shards(
    samples: Iterable[dict],
    out_url: str,
    shard_size: int = 256,
    class_names: list[str] | None = None,
    image_encoding: str = "source",
) -> dict:
    """Write samples ({id, image_bytes, label_bytes|None, width, height}) as Parquet shards.

    `image_encoding` is "source" (store `image_bytes` as they are) or "raw" (store the
    decoded pixels; see the module docstring). Holds at most one shard in memory.
    Returns the manifest, which is written last.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    if image_encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"image_encoding={image_encoding!r}; allowed: {list(IMAGE_ENCODINGS)}")
    fs, root = filesystem(out_url)
    fs.makedirs(root, exist_ok=True)
    shards: list[dict] = []
    seen: set[str] = set()
    n_labelled = 0
    rows: list[dict] = []

    def flush() -> None:
        name = f"shard-{len(shards):05d}.parquet"
        data = _table_bytes(rows, image_encoding)
        _atomic_write(fs, f"{root}/{name}", data)
        shards.append({"file": name, "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()})
        rows.clear()

    for sample in samples:
        sample_id = str(sample["id"])
        if sample_id in seen:
            raise DataError(f"duplicate sample id {sample_id!r} while writing shards to {out_url}")
        seen.add(sample_id)
        n_labelled += sample.get("label_bytes") is not None
        rows.append(sample)
        if len(rows) >= shard_size:
            flush()
    if rows:
        flush()
    if not shards:
        raise DataError(f"no samples to write to {out_url}")
    manifest = {
        "format": SHARD_FORMAT,
        "version": 1,
        "n_images": sum(s["rows"] for s in shards),
        "n_labelled": n_labelled,
        "n_shards": len(shards),
        "shard_size": shard_size,
        "image_encoding": image_encoding,
        "label_encoding": "raw" if image_encoding == "raw" else "png",
        "class_names": list(class_names) if class_names else None,
        "n_classes": len(class_names) if class_names else None,
        "shards": shards,
    }
    _atomic_write(fs, f"{root}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
    return manifest


def is_shard_manifest(manifest: object) -> bool:
    """True for a manifest.json that write_shards wrote (by its format marker): a folder of
    images may hold another tool's manifest.json, which is not shards."""
    return isinstance(manifest, dict) and manifest.get("format") == SHARD_FORMAT


def check_shard_manifest(manifest: object, where: str) -> None:
    """A one-line DataError for a manifest.json that write_shards did not write (another
    tool's, or edited by hand): its fields were a KeyError traceback."""
    if not is_shard_manifest(manifest):
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest)
        raise DataError(
            f"{where} is not a SAN shard manifest (format {found!r}, expected "
            f"{SHARD_FORMAT!r}): write the shards with pipelines/prepare_data.py"
        )
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
        isinstance(s, dict)
        and {"file", "rows", "sha256"} <= s.keys()
        and type(s["rows"]) is int
        and s["rows"] >= 0
        for s in shards
    ):
        raise DataError(
            f"{where} is damaged: 'shards' must list {{file, rows, sha256}} for each "
            "shard, rows a count; rewrite the shards with pipelines/prepare_data.py"
        )


class ShardDataset(ForkSafeFilesystem):
    """Reads `<url>/<split>/` (or `<url>` itself when it has a manifest) through its manifest."""

    # Called with the DataError of a bad row while streaming; None re-raises it.
    on_bad = None
    # Training never looks at labels: it sets this False so they are neither read nor decoded.
    load_labels = True
    # StreamDataset sets this when it reads epoch after epoch (training): an epoch's last
    # remote shard then fetches the next epoch's first one ahead, as within an epoch.
    epochs_follow = False
    # ((process id, the epoch's iter_partition arguments, its first shard), that shard's fetch).
    _ahead: tuple[tuple, Future] | None = None
    # How `_part_slices` splits the data into parts, saved with a training stream's position
    # (`stream_checkpoint`): 2, equal stretches of the epoch's rows; 1 (before), whole
    # shards per part or every n-th row. Other sources split one way only (1).
    partition_layout = 2

    def __init__(self, url: str, split: str, cache_dir: str = "") -> None:
        """`cache_dir`: local directory for verified copies of remote shards ("" reads
        the remote shards every time; local shards are never copied)."""
        self.split = split
        root = self._open_filesystem(url.rstrip("/"))
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.cache_dir = "" if self.is_local or not cache_dir else os.path.expanduser(cache_dir)
        direct = f"{root}/{MANIFEST}"
        nested = f"{root}/{split}/{MANIFEST}"
        try:
            if self.fs.isfile(nested):
                self.root = f"{root}/{split}"
            elif self.fs.isfile(direct):
                self.root = root
            else:
                if not self.is_local:  # s3fs answers False for any failure: say which
                    self._check_reachable()
                raise DataError(
                    f"no {MANIFEST} at {self.url}/{split}/ or {self.url}/; expected Parquet "
                    "shards written by write_shards (pipelines/prepare_data.py)"
                )
            with self.fs.open(f"{self.root}/{MANIFEST}", "rb") as f:
                self.manifest = json.loads(f.read())
        except DataError:
            raise
        except Exception as exc:
            raise DataError(
                f"cannot read shard manifest under {self.url}: {first_line(exc)}"
            ) from None
        check_shard_manifest(self.manifest, f"{self.root}/{MANIFEST}")
        self.image_encoding = self._encoding("image_encoding", "source", IMAGE_ENCODINGS)
        self.label_encoding = self._encoding("label_encoding", "png", LABEL_ENCODINGS)
        self.shards: list[dict] = self.manifest["shards"]
        self.class_names: list[str] | None = self.manifest.get("class_names")
        self.n_classes: int | None = self.manifest.get("n_classes")
        self._offsets = [0]
        for shard in self.shards:
            self._offsets.append(self._offsets[-1] + int(shard["rows"]))

    def _encoding(self, key: str, default: str, known: tuple[str, ...]) -> str:
        """The manifest's `key` (`default` when absent: older manifests), if this version
        reads it; a one-line DataError otherwise."""
        value = self.manifest.get(key, default)
        if value not in known:
            raise DataError(
                f"shard manifest under {self.url} has {key}={value!r}; "
                f"this version reads {list(known)}"
            )
        return value

    def _check_reachable(self) -> None:
        """A DataError naming the cause when the store itself cannot be read (no
        credentials, no endpoint, no bucket), rather than reporting the data missing."""
        try:
            check_storage(self.url, write=False)
        except StorageError as exc:
            raise DataError(f"shards at {self.url} cannot be read: {exc}") from None

    def __len__(self) -> int:
        return self._offsets[-1]

    def _path(self, shard: dict) -> str:
        return f"{self.root}/{shard['file']}"

    def _unopenable(self, shard: dict, exc: Exception) -> DataError:
        return DataError(f"shard {self._path(shard)} cannot be opened: {first_line(exc)}")

    def _mismatched(self, shard: dict) -> DataError:
        return DataError(f"shard {self._path(shard)} fails its manifest sha256 checksum")

    def _fetch(self, shard: dict) -> str | bytes:
        """Where a shard is read from: a local path (the file itself, or its verified copy
        in `cache_dir`) or, for a remote shard without a cache, its checked bytes."""
        if self.is_local:
            return self._path(shard)
        if self.cache_dir and shard.get("sha256"):
            return self._cached(shard)
        return self.download(shard)

    def download(self, shard: dict) -> bytes:
        """A remote shard's whole bytes, checked against the manifest's sha256 (where it
        has one) before any row is read, cached or not.

        Fetched whole in one request (as much memory as s3fs's 50 MiB read-ahead block,
        fewer requests): 15-20% less time per image than ranged reads through a file object
        on the moto endpoint, measured. The checksum runs in the prefetch thread without
        the GIL: 5.6 ms per 8 MiB shard on this project's CPU.
        """
        try:
            data = fetch_object(self.fs, self._path(shard))
        except Exception as exc:
            raise self._unopenable(shard, exc) from None
        digest = shard.get("sha256")
        if digest and hashlib.sha256(data).hexdigest() != digest:
            raise self._mismatched(shard)
        return data

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_ahead", None)  # a fetch in flight belongs to this process's thread
        return state

    def _part_slices(
        self, part: int, n_parts: int, epoch: int, shuffle: bool, seed: int
    ) -> list[tuple[int, int, int]]:
        """This part's rows in `epoch`: (file index, first row, end row) for each shard it
        reads, in the order it reads them.

        The epoch's shard order (shuffled by epoch) is one sequence of rows, and part p
        takes the p-th of n_parts equal stretches of it: parts differ by at most one row,
        and each reads about 1/n_parts of the shards (plus the ones its stretch shares
        with its neighbours'). Whole shards per part would tie each part to the same
        files every epoch and make parts unequal (a 256-row and a 111-row shard: the 111
        images read 2.3x as often, since every part feeds batches at the same rate).
        """
        if n_parts < 1 or not 0 <= part < n_parts:
            raise ValueError(f"part={part} must be in [0, n_parts={n_parts})")
        order = list(range(len(self.shards)))
        if shuffle:
            order = [int(i) for i in epoch_rng(seed, epoch).permutation(len(order))]
        total = self._offsets[-1]
        lo, hi = total * part // n_parts, total * (part + 1) // n_parts
        slices, first = [], 0  # first: where file_idx's rows begin in the epoch's sequence
        for file_idx in order:
            rows = self._offsets[file_idx + 1] - self._offsets[file_idx]
            begin, end = max(lo, first), min(hi, first + rows)
            if begin < end:
                slices.append((file_idx, begin - first, end - first))
            first += rows
        return slices

    def _fetched_in_order(
        self, order: list[int], epoch_key: tuple, next_epoch: tuple[tuple, int] | None
    ) -> Iterator[tuple[int, str | bytes]]:
        """(file index, `_fetch` result) for each shard in `order`, the shards of the epoch
        `epoch_key` names. Remote shards are fetched one ahead, in a background thread,
        while the reader decodes the current one, so it does not wait on the network at
        each shard boundary (at most two shards' bytes in memory). With `next_epoch` (its
        key, its first file), the last shard's turn fetches that one ahead too, for the
        next call to pick up. A fetch error is raised when its shard's turn comes."""
        if self.is_local or not order:
            yield from ((i, self._path(self.shards[i])) for i in order)
            return
        ahead, self._ahead = self._ahead, None
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")
        finished = False
        try:
            # Forked processes (loader workers) inherit the parent's fetch but not its thread.
            if ahead is not None and ahead[0] == (os.getpid(), epoch_key, order[0]):
                pending = ahead[1]
            else:
                pending = pool.submit(self._fetch, self.shards[order[0]])
            for k, file_idx in enumerate(order):
                fetched = pending.result()
                if k + 1 < len(order):
                    pending = pool.submit(self._fetch, self.shards[order[k + 1]])
                elif next_epoch is not None:
                    key, first = next_epoch
                    future = pool.submit(self._fetch, self.shards[first])
                    self._ahead = ((os.getpid(), key, first), future)
                yield file_idx, fetched
            finished = True
        finally:
            # A reader that stops early does not wait for the fetch ahead to finish, and
            # drops it; one that finished leaves the next epoch's fetch running.
            if not finished:
                self._ahead = None
            pool.shutdown(wait=False, cancel_futures=not finished)

    @contextlib.contextmanager
    def _open(self, shard: dict, fetched: str | bytes) -> Iterator[pq.ParquetFile]:
        """Open one shard from what `_fetch` gave as a ParquetFile; a missing or corrupt
        file is a DataError naming it."""
        try:
            # A local file is memory-mapped: Arrow reads the pages in place instead of
            # through a Python file object (about 40% less time per row group, measured).
            handle = (
                pa.memory_map(fetched) if isinstance(fetched, str) else pa.BufferReader(fetched)
            )
        except Exception as exc:
            raise self._unopenable(shard, exc) from None
        try:
            try:
                pf = pq.ParquetFile(handle)
            except Exception as exc:
                raise DataError(
                    f"shard {self._path(shard)} is not a readable Parquet file: {first_line(exc)}"
                ) from None
            yield pf
        finally:
            handle.close()

    def _cached(self, shard: dict) -> str:
        """The local path of the shard's verified copy, fetched on first use. The copy is
        written to a temporary name and renamed once its sha256 matches the manifest, so a
        cache entry is always a whole, checked shard, and concurrent readers (loader
        workers, Ray workers on one node) at worst fetch twice. An entry damaged since
        (truncated or overwritten, so no longer a Parquet file) is fetched again rather
        than failing every later epoch."""
        path = Path(self.cache_dir) / f"{shard['sha256']}.parquet"
        if path.is_file():
            try:
                pq.read_metadata(path)  # the footer: 0.03 ms, once per shard and epoch
                return str(path)
            except Exception:
                path.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.touch()
        except OSError as exc:
            raise DataError(
                f"data.shard_cache={self.cache_dir!r} cannot be written: {exc.strerror or exc}; "
                "give a writable local directory, or an empty value to read remote shards "
                "every epoch"
            ) from None
        try:
            tmp.write_bytes(self.download(shard))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return str(path)

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (reads each file once)."""
        for shard in self.shards:
            with self.fs.open(self._path(shard), "rb") as f:
                digest = _sha256(f)
            if digest != shard["sha256"]:
                raise self._mismatched(shard)

    def _decode(self, row: dict) -> dict:
        sample_id = row["id"]
        image = decode_stored(
            row["image"], self.image_encoding, row["height"], row["width"], sample_id
        )
        label = None
        if self.load_labels and row.get("label") is not None:
            if self.label_encoding == "raw":
                label = decode_label_ids(row["label"], row["height"], row["width"], sample_id)
            else:
                label = decode_label(row["label"], sample_id)
            check_sizes(image, label, sample_id)
        return {"id": sample_id, "image": image, "label": label}

    def __getitem__(self, index: int) -> dict:
        """Random access (reads one row group); streaming with iter_partition is the fast path."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        shard_idx = next(i for i in range(len(self.shards)) if index < self._offsets[i + 1])
        row = index - self._offsets[shard_idx]
        shard = self.shards[shard_idx]
        with self._open(shard, self._fetch(shard)) as pf:
            start = 0
            for group in range(pf.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                if row < start + n:
                    table = pf.read_row_group(group)
                    return self._decode(table.slice(row - start, 1).to_pylist()[0])
                start += n
        raise DataError(f"shard {self._path(shard)} has fewer rows than its manifest")

    def iter_partition(
        self, part: int, n_parts: int, epoch: int, shuffle: bool, seed: int, start: int = 0
    ) -> Iterator[dict]:
        """Stream this part's samples from position `start` of its epoch order, each with
        its "position" there, one row group in memory at a time (which shards and rows:
        `_part_slices`). Shards and row groups wholly before `start` are not read."""
        slices = self._part_slices(part, n_parts, epoch, shuffle, seed)
        position = 0  # of the first row of slices[0] in this part's epoch order
        while slices and position + slices[0][2] - slices[0][1] <= start:
            _, first_row, end_row = slices.pop(0)
            position += end_row - first_row
        next_epoch = None
        if self.epochs_follow and not self.is_local:
            following = self._part_slices(part, n_parts, epoch + 1, shuffle, seed)
            if following:
                next_epoch = ((part, n_parts, epoch + 1, shuffle, seed, 0), following[0][0])
        epoch_key = (part, n_parts, epoch, shuffle, seed, start)
        order = [file_idx for file_idx, _, _ in slices]
        fetched_files = self._fetched_in_order(order, epoch_key, next_epoch)
        for (file_idx, fetched), (_, first_row, end_row) in zip(fetched_files, slices, strict=True):
            with self._open(self.shards[file_idx], fetched) as pf:
                yield from self._iter_file(
                    pf, file_idx, first_row, end_row, epoch, shuffle, seed, position, start
                )
            position += end_row - first_row

    def _check_page_layout(self, pf: pq.ParquetFile) -> None:
        """Warn, once per process and dataset, about shards whose images sit in a dictionary
        page (as `write_shards` wrote them before `_table_bytes` turned dictionaries off):
        they still read, but each image is copied twice, and rewriting them is the cure.
        Once per dataset, not per reader: every evaluation makes its own readers."""
        if self.root in _PAGE_LAYOUT_CHECKED or pf.metadata.num_row_groups == 0:
            return
        _PAGE_LAYOUT_CHECKED.add(self.root)
        image = pf.metadata.row_group(0).column(pf.schema_arrow.get_field_index("image"))
        if image.has_dictionary_page:
            log.warning(
                "shards under %s keep their images in Parquet dictionary pages (written "
                "before write_shards turned them off): reading copies each image twice (a "
                "raw 240x180 image: 80 us against 42); rewrite them with "
                "pipelines/prepare_data.py to read them faster",
                self.root,
            )

    def _iter_file(
        self,
        pf: pq.ParquetFile,
        file_idx: int,
        first_row: int,
        end_row: int,
        epoch: int,
        shuffle: bool,
        seed: int,
        position: int,
        start: int,
    ) -> Iterator[dict]:
        """Rows [first_row, end_row) of one shard, row group by row group (shuffled within
        the file), the first of them at `position` of the part's order; rows before `start`
        are skipped, and row groups wholly before it are not read. The skipped groups'
        shuffles are drawn all the same, so the rest come in the order an unbroken epoch
        gives."""
        self._check_page_layout(pf)
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        rng = epoch_rng(seed, epoch, file_idx + 1)
        groups = list(range(len(sizes)))
        if shuffle:
            groups = [int(g) for g in rng.permutation(len(groups))]
        for group in groups:
            begin = max(first_row, starts[group]) - starts[group]
            end = min(end_row, starts[group + 1]) - starts[group]
            if begin >= end:
                continue
            rows = list(range(begin, end))
            if shuffle:
                rows = [rows[int(i)] for i in rng.permutation(len(rows))]
            skip = min(max(0, start - position), len(rows))
            position += skip
            rows = rows[skip:]
            if not rows:
                continue
            names = ["id", "image", "height", "width"] + (["label"] if self.load_labels else [])
            table = pf.read_row_group(group, columns=names)
            columns = {
                name: _binary_views(table.column(name))
                if name == "image"
                else table.column(name).to_pylist()
                for name in names
            }
            for r in rows:
                position += 1
                try:
                    sample = self._decode({k: values[r] for k, values in columns.items()})
                except DataError as exc:
                    if self.on_bad is None:
                        raise
                    self.on_bad(exc)
                    continue
                sample["position"] = position - 1
                yield sample
