"""Batch prediction: segment every image under a URL with Ray Data, one mask PNG per image.

    python pipelines/predict.py --checkpoint URI --input URL --output URL [--overlay]
    ray job submit --working-dir . -- python pipelines/predict.py --checkpoint s3://... ...

The input is a folder of images (.jpg/.jpeg/.png/.bmp/.webp/.tif/.tiff, directly under URL
or under URL/images/) or a set of Parquet shards (a manifest.json under URL or URL/<split>/),
local or ``s3://``. Each image gets ``<output>/masks/<id>.png`` (uint8 cluster ids at the
image's own size) and, with ``--overlay``, ``<output>/overlays/<id>.png``. The mask is written
last and atomically, so an existing mask means that image is finished: re-running skips it
(idempotent, resumable).

The model runs in a pool of Ray Data actors (`Predictor`), each loading the checkpoint once.
The last stdout line is one JSON object: {"total", "skipped", "written", "bad", "output"};
an image that cannot be read or decoded is logged with its id and counted as bad, and the
others are predicted all the same.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.common import UserError, init_ray, on_local_ray, print_result, run_main  # noqa: E402
from san import storage  # noqa: E402
from san.data import DataError  # noqa: E402
from san.data.folder import IMAGE_SUFFIXES  # noqa: E402
from san.data.shards import check_shard_manifest, is_shard_manifest  # noqa: E402

log = logging.getLogger("san")

SHARD_MANIFEST = "manifest.json"
MASK_DIR = "masks"
OVERLAY_DIR = "overlays"


@dataclass
class InputPlan:
    """What to read: image file URLs (folder input) or shard file URLs (Parquet input)."""

    kind: str  # "folder" or "shards"
    images: dict[str, str]  # id -> file URL (folder input only)
    shards: list[str]  # shard file URLs (shard input only)
    image_encoding: str = "source"  # shards: image files as they are, or "raw" pixels


def _is_file(url: str) -> bool:
    fs, path = storage.filesystem(url)
    return bool(fs.isfile(path))


def plan_input(url: str, split: str) -> InputPlan:
    """Find the images under ``url``: shards (this project's manifest.json) first, else
    image files. A manifest.json of another kind in an image folder is not shards."""
    import json

    if _is_file(url):
        raise UserError(f"--input {url} is a file: give the folder (or shards root) holding it")
    for root in (url, storage.join(url, split)):
        manifest = storage.join(root, SHARD_MANIFEST)
        if _is_file(manifest):
            try:
                content = json.loads(storage.read_bytes(manifest))
            except ValueError:
                raise UserError(f"{manifest} is not JSON") from None
            if not is_shard_manifest(content):
                continue
            try:
                check_shard_manifest(content, manifest)
            except DataError as exc:
                raise UserError(str(exc)) from None
            files = [storage.join(root, s["file"]) for s in content["shards"]]
            return InputPlan("shards", {}, files, content.get("image_encoding", "source"))
    for folder in (url, storage.join(url, "images"), storage.join(url, split, "images")):
        try:
            names = storage.list_dir(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue
        files = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")]
        images = {os.path.splitext(n)[0]: storage.join(folder, n) for n in files}
        if len(images) < len(files):  # a.jpg and a.png: one mask name for two images
            stems = [os.path.splitext(n)[0] for n in files]
            dupes = sorted({stem for stem in stems if stems.count(stem) > 1})
            raise UserError(
                f"{folder} has images sharing an id (file name without its extension): "
                f"{dupes[:5]}; each image needs its own, as masks are named by id"
            )
        if images:
            return InputPlan("folder", images, [])
    raise UserError(
        f"no images under {url}: expected {'/'.join(IMAGE_SUFFIXES)} files in it or in its images/ "
        f"folder, or Parquet shards with a {SHARD_MANIFEST}"
    )


def finished_ids(output: str, overlay: bool = False) -> set[str]:
    """Ids whose mask already exists, and with `overlay` their overlay too (one listing per
    folder, not one request per image): a rerun that adds --overlay redoes the rest. An id
    with folders in it (``seq01/0001``, from shards) has its mask at ``masks/seq01/0001.png``.
    """

    def ids(folder: str) -> set[str]:
        names = storage.list_files(storage.join(output, folder))
        return {n[: -len(".png")] for n in names if n.endswith(".png")}

    return ids(MASK_DIR) & ids(OVERLAY_DIR) if overlay else ids(MASK_DIR)


def is_safe_id(sample_id: str) -> bool:
    """Whether `sample_id` names a file under the output's masks/: folders in it ("/") are
    kept as folders, but no part may be empty, "." or ".." (which would write beside or
    outside the output), and no "\\" (a folder on one system, a name on another)."""
    return "\\" not in sample_id and all(
        part not in ("", ".", "..") for part in sample_id.split("/")
    )


class Predictor:
    """Ray Data callable class: loads the checkpoint once per actor, segments a batch, writes.

    A batch holds ``id`` plus either ``url`` (image files) or ``image``, ``height`` and
    ``width`` (shard rows: encoded bytes, or raw pixels with ``image_encoding="raw"``).
    Images are resized whole to the model's square input size, and the logits are resized
    back to each image's own size, so a mask covers its image pixel for pixel.
    Returns one row per input: ``id`` and ``status`` ("written", "skipped", or "bad": an
    image that cannot be read or decoded, logged with its id and left without a mask).
    """

    def __init__(
        self,
        checkpoint: str,
        output: str,
        overlay: bool,
        skip: frozenset[str] = frozenset(),
        image_encoding: str = "source",
    ) -> None:
        import torch

        from san.config import from_dict
        from san.models import create_model

        state, config = storage.load_checkpoint(checkpoint)
        self.cfg = from_dict(config)
        self.model = create_model(self.cfg, vit_weights=False)  # the checkpoint holds them
        self.model.load_state_dict(state["model"])
        self.model.eval()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.output = output
        self.overlay = overlay
        self.skip = skip
        self.image_encoding = image_encoding

    def _segment(self, image):
        """uint8 3xHxW -> (uint8 HxW cluster ids, float 3xHxW image in [0, 1])."""
        import torch
        import torch.nn.functional as F

        from san.data.transforms import normalize

        size = self.cfg.data.image_size
        height, width = image.shape[-2:]
        rgb = image.float().unsqueeze(0) / 255.0
        x = F.interpolate(rgb, size=(size, size), mode="bilinear", antialias=True)
        x = normalize(x[0].clamp(0, 1)).unsqueeze(0).to(self.device)
        with torch.no_grad():
            logits = self.model(x)["logits"]
            logits = F.interpolate(logits, size=(height, width), mode="bilinear")
        mask = logits.argmax(dim=1)[0].to("cpu", torch.uint8)
        return mask, rgb[0]

    def _image(self, batch: dict[str, np.ndarray], index: int, sample_id: str):
        """The uint8 3xHxW image of row `index`; DataError naming the id if it is bad."""
        from san.data import decode_image, decode_stored

        if "image" in batch:
            return decode_stored(
                bytes(batch["image"][index]),
                self.image_encoding,
                int(batch["height"][index]),
                int(batch["width"][index]),
                sample_id,
            )
        url = str(batch["url"][index])
        try:
            data = storage.read_bytes(url)
        except OSError as exc:
            raise DataError(f"image {sample_id!r} cannot be read from {url}: {exc}") from None
        return decode_image(data, sample_id)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from san.data import encode_png
        from san.viz import overlay_panel

        ids = [str(i) for i in batch["id"]]
        statuses = []
        for index, sample_id in enumerate(ids):
            if sample_id in self.skip:
                statuses.append("skipped")
                continue
            if not is_safe_id(sample_id):
                log.warning(
                    "image id %r cannot name a mask file (an empty, '.' or '..' part, a "
                    "leading '/' or a '\\'), no mask written",
                    sample_id,
                )
                statuses.append("bad")
                continue
            try:
                image = self._image(batch, index, sample_id)
            except DataError as exc:  # one bad file must not end the job for the rest
                log.warning("bad image %s, no mask written: %s", sample_id, exc)
                statuses.append("bad")
                continue
            mask, rgb = self._segment(image)
            if self.overlay:
                panel = overlay_panel(rgb.unsqueeze(0), mask.unsqueeze(0).long())
                overlay_url = storage.join(self.output, OVERLAY_DIR, f"{sample_id}.png")
                storage.write_bytes_atomic(overlay_url, panel)
            mask_url = storage.join(self.output, MASK_DIR, f"{sample_id}.png")
            storage.write_bytes_atomic(mask_url, encode_png(mask))  # last: marks the id done
            statuses.append("written")
        return {"id": np.array(ids, dtype=object), "status": np.array(statuses, dtype=object)}


def build_dataset(plan: InputPlan, done: set[str]):
    """The Ray Data dataset of work: folder images not yet done, or every shard row."""
    import ray.data

    if plan.kind == "folder":
        items = [{"id": i, "url": u} for i, u in sorted(plan.images.items()) if i not in done]
        if not items:
            return None
        return ray.data.from_items(items)
    filesystem, _ = storage.pyarrow_filesystem(plan.shards[0])
    paths = [storage.pyarrow_filesystem(s)[1] for s in plan.shards]
    columns = ["id", "image", "height", "width"]
    return ray.data.read_parquet(paths, filesystem=filesystem, columns=columns)


def check_local_actor_gpus(num_actors: int, num_gpus: float, have: float) -> None:
    """On a local Ray (which cannot grow) with `have` GPUs, actors asking for more would
    wait forever: say so in one line."""
    if on_local_ray() and num_gpus * num_actors > have:
        raise UserError(
            f"--num-actors {num_actors} x --num-gpus {num_gpus:g} need "
            f"{num_actors * num_gpus:g} GPUs but the local Ray has {have:g}; lower them "
            "(--num-gpus 0 predicts on CPUs)"
        )


def predict(
    checkpoint: str,
    input_url: str,
    output: str,
    overlay: bool = False,
    split: str = "val",
    batch_size: int = 8,
    num_actors: int = 1,
    num_gpus: float = 0.0,
) -> dict[str, Any]:
    """Segment every unfinished image under ``input_url``; returns counts for the summary."""
    for flag, value, least in [
        ("--batch-size", batch_size, 1),
        ("--num-actors", num_actors, 1),
        ("--num-gpus", num_gpus, 0),
    ]:
        if not value >= least:  # also refuses nan
            raise UserError(f"{flag} {value:g} is out of range; allowed: >= {least}")
    try:
        _, saved_config = storage.load_checkpoint(checkpoint)  # one line, not in an actor
        if input_url.startswith("s3://"):  # else missing credentials read as "no images"
            storage.check_storage(input_url, write=False)
        storage.check_storage(output)
    except storage.CheckpointError as exc:  # a StorageError is one line from run_main
        raise UserError(str(exc)) from None
    n_clusters = saved_config.get("model", {}).get("n_clusters", 0)
    if n_clusters > 256:
        raise UserError(
            f"masks are 8-bit PNGs: the checkpoint's model.n_clusters={n_clusters} has ids "
            "past 255; predict with a model of at most 256 clusters"
        )
    plan = plan_input(input_url, split)
    done = finished_ids(output, overlay)
    total = len(plan.images) if plan.kind == "folder" else None
    log.info("input %s: %s; %d images already have masks", input_url, plan.kind, len(done))
    if plan.kind == "shards" or set(plan.images) - done:  # nothing to do: no Ray start
        init_ray()
        import ray

        check_local_actor_gpus(num_actors, num_gpus, ray.cluster_resources().get("GPU", 0))
    dataset = build_dataset(plan, done)
    written = skipped = bad = 0
    if dataset is not None:
        results = dataset.map_batches(
            Predictor,
            fn_constructor_kwargs={
                "checkpoint": checkpoint,
                "output": output,
                "overlay": overlay,
                "skip": frozenset(done) if plan.kind == "shards" else frozenset(),
                "image_encoding": plan.image_encoding,
            },
            batch_size=batch_size,
            concurrency=num_actors,
            num_cpus=1,
            num_gpus=num_gpus,
        )
        for row in results.iter_rows():
            if row["status"] == "written":
                written += 1
                if written % 20 == 0:
                    log.info("predicted %d images", written)
            elif row["status"] == "bad":
                bad += 1
            else:
                skipped += 1
    if plan.kind == "folder":
        skipped = total - written - bad
    else:
        total = written + skipped + bad
    log.info("done: %d written, %d skipped, %d bad, masks under %s", written, skipped, bad, output)
    return {"total": total, "written": written, "skipped": skipped, "bad": bad, "output": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="SAN checkpoint URI (local or s3://)")
    parser.add_argument("--input", required=True, help="folder or shards URL (local or s3://)")
    parser.add_argument("--output", required=True, help="output URL: masks/ and overlays/")
    parser.add_argument("--overlay", action="store_true", help="also write overlay PNGs")
    parser.add_argument("--split", default="val", help="split folder to look in (default val)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-actors", type=int, default=1, help="model replicas (actors)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor")
    args = parser.parse_args()
    print_result(
        predict(
            args.checkpoint,
            args.input,
            args.output,
            overlay=args.overlay,
            split=args.split,
            batch_size=args.batch_size,
            num_actors=args.num_actors,
            num_gpus=args.num_gpus,
        )
    )


if __name__ == "__main__":
    run_main(main)
