"""Convert a dataset in its standard layout into Parquet shards on any fsspec URL.

    python pipelines/prepare_data.py --dataset NAME --source PATH_OR_URL --out URL \\
        [--split train,val] [--shard-size N] [--on-bad skip|fail] [--class-names a,b,...] \\
        [--image-encoding source|raw]

Writes `<out>/<split>/shard-*.parquet` and `<out>/<split>/manifest.json` (counts, class
names, per-shard sha256, the source fingerprint and any skipped samples). Training reads
them with `data.dataset=shards data.root=<out>`.

- Idempotent: a split whose complete manifest already records the same source fingerprint
  (count and hash of ids and file sizes) and options is left alone, and says so.
- Never half-visible: shards are written under a temporary prefix, then moved into place
  with the manifest last. A rewrite's shards take names of their own, so the old manifest
  and its shards stay whole until the new manifest replaces it: readers never take a mix
  of old and new files for a complete dataset, and a failed run (removing its temporary
  prefix and what it had moved) leaves the old output untouched.
- `--image-encoding raw` stores decoded pixels and label ids instead of the image and label
  files: no decode when training or evaluation reads them, at about 8x the storage for
  JPEGs (labels stay as small as their PNGs; see san/data/shards.py).
- Bad samples (undecodable image or label, label size different from its image) are
  reported by id, one line each on stderr; `--on-bad skip` (default) leaves them out and
  lists them in the manifest, `--on-bad fail` stops with a one-line error naming the id.

The last stdout line is one JSON object: {"out": URL, "dataset": NAME, "splits": {...}}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.common import UserError, print_result, progress, run_main  # noqa: E402
from san.config import DataConfig  # noqa: E402
from san.data import DataError, create_dataset  # noqa: E402
from san.data.layout import fingerprint  # noqa: E402
from san.data.shards import IMAGE_ENCODINGS, MANIFEST, write_shards  # noqa: E402
from san.storage import (  # noqa: E402
    StorageError,
    check_storage,
    filesystem,
    join,
    write_bytes_atomic,
)

log = logging.getLogger("san")

# Datasets that read a standard layout (not "synthetic" or already-prepared "shards").
PREPARABLE = ("folder", "cocostuff27", "cityscapes27", "potsdam", "potsdam3")
# Bumped when the way shards are made changes, so older outputs are rewritten.
PREPARE_VERSION = 1
PROGRESS_EVERY = 500


class BadSample(DataError):
    """A sample is bad and --on-bad fail was given."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=PREPARABLE, help="source layout")
    parser.add_argument("--source", required=True, help="dataset root: local path or URL")
    parser.add_argument(
        "--out",
        required=True,
        help="output root: local path (relative to the current directory) or s3:// URL; "
        "train.py reads a relative data.root from the project root, so outside it pass the "
        'absolute "out" this prints',
    )
    parser.add_argument("--split", default="train,val", help="comma-separated split names")
    parser.add_argument("--shard-size", type=int, default=256, help="images per shard file")
    parser.add_argument("--on-bad", choices=("skip", "fail"), default="skip")
    parser.add_argument(
        "--class-names",
        default="",
        help="comma-separated class names, for a folder without classes.txt (e.g. CamVid)",
    )
    parser.add_argument(
        "--image-encoding",
        choices=IMAGE_ENCODINGS,
        default="source",
        help="source: keep image and label files as they are (small); raw: decoded pixels "
        "and label ids (no decode when read, about 8x larger for JPEGs)",
    )
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error(f"--shard-size={args.shard_size} must be >= 1")
    args.splits = [s.strip() for s in args.split.split(",") if s.strip()]
    if not args.splits:
        parser.error("--split names no split")
    return args


def absolute(url: str) -> str:
    """Local paths as absolute paths (relative to the current directory); URLs without a
    trailing "/" (`s3://` alone, say from an unset $BUCKET, is refused: it was "s3:", a
    local folder of that name)."""
    if "://" in url:
        if not url.split("://", 1)[1].strip("/"):
            raise UserError(f"{url} names no bucket or folder")
        return url.rstrip("/")
    return os.path.abspath(os.path.expanduser(url))


def check_source(dataset: str, source: str) -> None:
    """Fail in one line, before anything is written, on a missing or unsupported source."""
    if "://" not in source and not os.path.exists(source):
        raise UserError(f"source {source} does not exist")
    if dataset == "folder" and "://" in source:
        raise UserError(f"--dataset folder reads a local folder; {source} is a URL")


def build_source(dataset: str, source: str, split: str) -> Any:
    try:
        built = create_dataset(DataConfig(dataset=dataset, root=source), split)
    except DataError as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - e.g. an unreachable S3 source
        raise UserError(f"cannot read {dataset} source {source}: {_first_line(exc)}") from None
    if not hasattr(built, "record"):
        raise UserError(f"dataset {dataset!r} cannot be prepared (its source has no records)")
    if len(built) == 0:
        raise UserError(f"{dataset} split {split!r} at {source} is empty")
    return built


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def read_manifest(url: str) -> dict | None:
    """The manifest at `<url>/manifest.json` if it parses and every listed shard exists."""
    fs, root = filesystem(url)
    path = f"{root}/{MANIFEST}"
    try:
        if not fs.isfile(path):
            return None
        manifest = json.loads(fs.cat_file(path))
        if not all(fs.isfile(f"{root}/{s['file']}") for s in manifest["shards"]):
            return None
    except (ValueError, KeyError, TypeError, OSError):
        return None
    return manifest


def records(source: Any, on_bad: str, skipped: list[dict]) -> Iterator[dict]:
    """The source's records; bad ones reported by id, then skipped (recorded) or fatal."""
    start = time.perf_counter()
    for index in range(len(source)):
        try:
            record = source.record(index)
        except DataError as exc:
            sample_id = source.ids[index]
            if on_bad == "fail":
                raise BadSample(f"bad sample {sample_id!r}: {exc} (--on-bad fail)") from None
            print(f"skipped {sample_id}: {exc}", file=sys.stderr, flush=True)
            skipped.append({"id": sample_id, "reason": str(exc)})
            continue
        if (index + 1) % PROGRESS_EVERY == 0:
            rate = (index + 1) / max(time.perf_counter() - start, 1e-9)
            bar = progress(index + 1, len(source), 1 / rate)
            log.info("%d/%d images (%.0f/s) %s", index + 1, len(source), rate, bar)
        yield record


def promote(tmp_url: str, dest_url: str, manifest: dict, write_id: str) -> None:
    """Move shards from the temporary prefix into place, then the manifest, then drop the
    shards it no longer lists.

    Over an existing dataset the new shards take names of their own (shard-<write_id>-
    NNNNN.parquet), so the old manifest and every shard it lists stay whole until the new
    manifest replaces it in one write: a move that fails (disk full, a lost connection)
    leaves the old dataset as it was, and the new shards already moved are removed.
    """
    fs, tmp = filesystem(tmp_url)
    _, dest = filesystem(dest_url)
    fs.makedirs(dest, exist_ok=True)
    rewrite = fs.exists(f"{dest}/{MANIFEST}")
    moves = []
    for shard in manifest["shards"]:
        written = shard["file"]  # shard-NNNNN.parquet
        if rewrite:
            shard["file"] = f"shard-{write_id}-{written.removeprefix('shard-')}"
        moves.append((f"{tmp}/{written}", f"{dest}/{shard['file']}"))
    moved = []
    try:
        for source, target in moves:
            fs.mv(source, target)
            moved.append(target)
        write_bytes_atomic(join(dest_url, MANIFEST), json.dumps(manifest, indent=2).encode())
    except BaseException:
        for path in moved:
            fs.rm(path)
        raise
    keep = {s["file"] for s in manifest["shards"]}
    for path in fs.ls(dest, detail=False):
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("shard-") and name.endswith(".parquet") and name not in keep:
            fs.rm(path)


def prepare_split(args: argparse.Namespace, source_url: str, out_url: str, split: str) -> dict:
    """Write one split (or find it up to date); returns its summary for the JSON line."""
    source = build_source(args.dataset, source_url, split)
    class_names = [n.strip() for n in args.class_names.split(",") if n.strip()] or (
        source.class_names
    )
    options = {
        "version": PREPARE_VERSION,
        "shard_size": args.shard_size,
        "on_bad": args.on_bad,
        "class_names": class_names,
        "image_encoding": args.image_encoding,
    }
    source_fp = fingerprint(source, args.dataset)
    dest = join(out_url, split)
    existing = read_manifest(dest)
    if (
        existing is not None
        and existing.get("source_fingerprint") == source_fp
        and existing.get("options") == options
    ):
        log.info("%s: up to date at %s (same source fingerprint); nothing written", split, dest)
        return _summary(existing, "unchanged", dest)

    fs, out_root = filesystem(out_url)
    write_id = uuid.uuid4().hex[:12]
    tmp = join(out_url, f".tmp-{split}-{write_id}")
    skipped: list[dict] = []
    log.info("%s: writing %d images from %s to %s", split, len(source), source_url, dest)
    try:
        manifest = write_shards(
            records(source, args.on_bad, skipped),
            tmp,
            args.shard_size,
            class_names,
            image_encoding=args.image_encoding,
        )
        manifest.update(
            {
                "dataset": args.dataset,
                "split": split,
                "source": source_url,
                "source_fingerprint": source_fp,
                "options": options,
                "n_source": len(source),
                "n_skipped": len(skipped),
                "skipped": skipped,
            }
        )
        promote(tmp, dest, manifest, write_id)
    except DataError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"writing {split} to {dest} failed: {_first_line(exc)}") from None
    finally:
        _, tmp_path = filesystem(tmp)
        if fs.exists(tmp_path):
            fs.rm(tmp_path, recursive=True)
    return _summary(manifest, "written", dest)


def _summary(manifest: dict, status: str, url: str) -> dict:
    return {
        "status": status,
        "url": url,
        "n_images": manifest["n_images"],
        "n_labelled": manifest["n_labelled"],
        "n_skipped": manifest.get("n_skipped", 0),
        "n_shards": manifest["n_shards"],
        "n_classes": manifest.get("n_classes"),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    source_url = absolute(args.source)
    out_url = absolute(args.out)
    check_source(args.dataset, source_url)
    try:
        check_storage(out_url)
    except StorageError as exc:
        raise UserError(str(exc)) from None
    splits = {split: prepare_split(args, source_url, out_url, split) for split in args.splits}
    print_result({"out": out_url, "dataset": args.dataset, "splits": splits})


if __name__ == "__main__":
    run_main(main)
