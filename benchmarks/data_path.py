"""Images/s the data path delivers to the training step: Parquet shards vs a JPEG folder.

    .venv/bin/python benchmarks/data_path.py [--quick] [--repeats N]

Sources (the same images each time, ../shared/data/camvid/train, or synthetic scenes
written as PNG when that folder is absent):
- folder: FolderDataset, one JPEG/PNG file per image;
- shards (local): ShardDataset over Parquet shards on local disk (write_shards), with
  the image files stored as they are (image_encoding="source") and as decoded pixels
  (image_encoding="raw", `prepare_data.py --image-encoding raw`);
- shards (S3): the same shards in a bucket of a real local S3 endpoint (moto server),
  raw ones also through `data.shard_cache` (a local copy of each shard, filled before
  timing: what every epoch after the first reads).

For each, the full training data path (StreamDataset + train_pair_transform +
DataLoader, as pipelines/loop.py builds it) is timed with 0 and 1 loader workers,
and the source alone (read + decode, no augmentation) shows where the time goes.
Then a training step with real data (local shards) is compared with a step on a
pre-made batch, alternating, with 0 and 1 loader workers: if the two match, the data
path is not the bottleneck. On a CPU with bf16 instructions (AMX or AVX512-BF16) that is
done for the bf16 + channels_last step too, the fastest this CPU trains.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import (
    CAMVID,
    ROOT,
    CpuMeter,
    build_trainer,
    config,
    machine,
    median,
    parse_args,
    repeat,
    table,
    timed_steps,
    train_loader,
    wait_until_quiet,
    write_results,
)

from san.config import from_dict
from san.data import (
    FolderDataset,
    ShardDataset,
    create_dataset,
    encode_png,
    train_pair_transform,
    unpack_pairs,
    write_shards,
)
from san.engine import cpu_has_native_bf16, finished_views
from san.storage import fetch_object

sys.path.insert(0, str(ROOT / "tests"))
from services import S3Server  # noqa: E402


def synthetic_folder(root: Path, n: int) -> Path:
    """Fallback when the shared CamVid copy is absent: synthetic scenes as PNG files."""
    from san.data import SyntheticScenes

    scenes = SyntheticScenes(n_images=n, image_size=180, n_classes=5, seed=0, split="train")
    images = root / "train" / "images"
    images.mkdir(parents=True)
    for i in range(n):
        sample = scenes[i]
        (images / f"{i:05d}.png").write_bytes(encode_png(sample["image"].permute(1, 2, 0)))
    return root


def subset_folder(src: Path, root: Path, n: int) -> Path:
    """The first n images of a folder dataset's train split, copied (for --quick)."""
    images = root / "train" / "images"
    images.mkdir(parents=True)
    for path in sorted((src / "train" / "images").iterdir())[:n]:
        shutil.copy(path, images / path.name)
    return root


def upscaled_folder(src: Path, root: Path, n: int) -> Path:
    """The first n CamVid train images at CamVid's original 480x360 (bicubic, JPEG q92):
    the decode cost of the dataset as published, which the shared copy halves."""
    from PIL import Image

    images = root / "train" / "images"
    images.mkdir(parents=True)
    for path in sorted((src / "train" / "images").iterdir())[:n]:
        with Image.open(path) as im:
            big = im.convert("RGB").resize((im.width * 2, im.height * 2), Image.BICUBIC)
        big.save(images / path.name, quality=92)
    return root


def compare_sources(
    base, sources: dict, repeats: int, n_images: int, workers_list, endpoint_pid: int = 0
) -> tuple[dict, dict]:
    """({(source, how): [img/s per repeat]}, {(source, how): [endpoint cores busy]}):
    every source delivered through the training DataLoader per loader setting, and read
    + decode alone; order alternates by repeat. For sources in the S3 bucket, the second
    dict holds the cores the S3 endpoint process kept busy while each was timed."""
    rates: dict[tuple[str, str], list[float]] = {}
    endpoint_cores: dict[tuple[str, str], list[float]] = {}

    def measure(key: tuple[str, str], remote: bool, run: Callable, cfg) -> None:
        # The measurement before may leave work running: its loader worker exiting, the
        # endpoint serving a shard fetched ahead.
        wait_until_quiet()
        meter = CpuMeter(endpoint_pid if remote else 0)
        rates.setdefault(key, []).append(run(cfg, n_images, meter))
        if meter.busy is not None:
            endpoint_cores.setdefault(key, []).append(meter.busy)

    for r in range(repeats):
        order = list(sources) if r % 2 == 0 else list(reversed(sources))
        for name in order:
            dataset, root, *cache = sources[name]
            remote = bool(endpoint_pid) and root.startswith("s3://")
            for workers in workers_list:
                cfg = with_data(base, dataset, root, workers, *cache)
                key = (name, f"loader_workers={workers}")
                measure(key, remote, delivered, cfg)
            cfg = with_data(base, dataset, root, 0, *cache)
            measure((name, "read + decode only"), remote, source_only, cfg)
            print(f"repeat {r} {name}: done", flush=True)
    return rates, endpoint_cores


RESULT_COLUMNS = ["source", "how", "img/s (median)", "x folder (same how)", "range over repeats"]


def ratio_rows(rates: dict, folder: str) -> list[list]:
    """Table rows: source, how, median img/s, median of per-repeat ratios to the folder,
    and their range (on a shared VM the spread between repeats is part of the result)."""
    rows = []
    for (name, how), values in rates.items():
        same_how = rates.get((folder, how)) or values
        ratios = [a / b for a, b in zip(values, same_how, strict=True)]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        rows.append([name, how, median(values), median(ratios), spread])
    rows.sort(key=lambda row: (row[1], row[0]))
    return rows


def with_data(cfg, dataset: str, root: str, workers: int, shard_cache: str = ""):
    values = cfg.to_dict()
    values["data"].update(
        dataset=dataset, root=root, loader_workers=workers, shard_cache=shard_cache
    )
    return from_dict(values)


def delivered(cfg, n_images: int, meter: CpuMeter | None = None) -> float:
    """img/s pulled from the training DataLoader and finished as `Trainer.step` finishes
    them (colour jitter, normalisation: `finished_views`), first batch (start-up) excluded;
    `meter` runs over the same window."""
    meter = meter or CpuMeter()
    loader = train_loader(cfg)
    batches = iter(loader)
    next(batches)
    colour = cfg.data.jitter > 0
    meter.start()
    seen, start = 0, time.perf_counter()
    while seen < n_images:
        seen += finished_views(next(batches), colour).shape[0] // 2
    rate = seen / (time.perf_counter() - start)
    meter.stop()
    del batches, loader
    return rate


def source_only(cfg, n_images: int, meter: CpuMeter | None = None) -> float:
    """img/s of read + decode alone (no augmentation, no DataLoader), images only, as
    training reads them (labels are not read); `meter` runs over the same window."""
    meter = meter or CpuMeter()
    source = create_dataset(cfg.data, cfg.data.train_split)
    source.load_labels = False
    if hasattr(source, "epochs_follow"):
        source.epochs_follow = True  # epoch after epoch, as StreamDataset tells it in training
    meter.start()
    seen, start = 0, time.perf_counter()
    while seen < n_images:
        for _ in source.iter_partition(0, 1, seen, True, 0):
            seen += 1
            if seen >= n_images:
                break
    rate = seen / (time.perf_counter() - start)
    meter.stop()
    return rate


def fetch_costs(url: str, endpoint_pid: int, rounds: int) -> dict[str, dict[str, float]]:
    """Each shard of the train split under `url` fetched whole, one at a time, `rounds`
    times, by each client: {client: MiB/s, and CPU ms per MiB in this process (the client)
    and in the S3 endpoint's}. Clients: s3fs `cat_file` (botocore checks its response checksum),
    `fetch_object` (pyarrow's S3 client), and `ShardDataset.download` (that plus the
    manifest sha256 check: how a reader without a cache fetches)."""
    dataset = ShardDataset(url, "train")
    fs = dataset.fs
    files = [(shard, f"{dataset.root}/{shard['file']}") for shard in dataset.shards]
    clients: dict[str, Callable[[dict, str], bytes]] = {
        "s3fs cat_file": lambda shard, path: fs.cat_file(path),
        "pyarrow S3 client": lambda shard, path: fetch_object(fs, path),
        "pyarrow S3 client + sha256 check": lambda shard, path: dataset.download(shard),
    }
    costs = {}
    for name, fetch in clients.items():
        meter = CpuMeter(endpoint_pid)
        fetched, client_cpu = 0, time.process_time()
        meter.start()
        start = time.perf_counter()
        for _ in range(rounds):
            fetched += sum(len(fetch(shard, path)) for shard, path in files)
        wall = time.perf_counter() - start
        meter.stop()
        mib = fetched / 2**20
        costs[name] = {
            "MiB/s": mib / wall,
            "client": 1000 * (time.process_time() - client_cpu) / mib,
            "endpoint": 1000 * (meter.used_s or 0) / mib,
        }
    return costs


def augment_only(cfg, n_images: int) -> tuple[float, float]:
    """img/s of each stage of train_pair_transform on already decoded images: the
    loader's (per-image crop, resize and flip, and `collate`) and the training step's
    (colour jitter and normalisation of the batch, `finished_views`)."""
    source = create_dataset(cfg.data, cfg.data.train_split)
    samples = [s for _, s in zip(range(16), source.iter_partition(0, 1, 0, False, 0), strict=False)]
    transform = train_pair_transform(cfg.data)
    batch_size = cfg.optim.batch_size
    loader_s = step_s = 0.0
    for first in range(0, n_images, batch_size):
        start = time.perf_counter()
        batch = [
            transform(samples[i % len(samples)], torch.Generator().manual_seed(i))
            for i in range(first, min(first + batch_size, n_images))
        ]
        packed = transform.collate(batch)
        middle = time.perf_counter()
        finished_views(unpack_pairs(packed), cfg.data.jitter > 0)
        loader_s += middle - start
        step_s += time.perf_counter() - middle
    return n_images / loader_s, n_images / step_s


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0], lambda p: p.add_argument("--repeats", type=int, default=None)
    )
    repeats = args.repeats or (1 if args.quick else 3)
    # Long enough (0.4-0.9 s a measurement) that scheduling stalls of a few tens of ms
    # do not move a ratio: with 192 images, one 30 ms stall cost a third of a rate, and
    # with 576 the same configuration's ratio still ranged 1.55-2.38 over five repeats.
    n_images = 32 if args.quick else 1728
    steps = 3 if args.quick else 12
    facts = machine()
    base = config(args.quick)
    work = Path(tempfile.mkdtemp(prefix="san-bench-data-"))
    s3 = S3Server(work)
    try:
        if CAMVID.is_dir() and args.quick:
            folder_root, origin = subset_folder(CAMVID, work / "folder", 32), "32 CamVid JPEGs"
        elif CAMVID.is_dir():
            folder_root, origin = CAMVID, f"{CAMVID} (CamVid train, 367 JPEG 240x180)"
        else:
            folder_root, origin = synthetic_folder(work / "folder", 64), "synthetic PNG 180x180"
        records = list(FolderDataset(str(folder_root), "train").iter_records())
        s3.start()
        os.environ.update(s3.env)
        bucket = s3.make_bucket("bench")
        cache = work / "shard-cache"
        for encoding in ("source", "raw"):
            for root in (str(work / encoding), f"{bucket}/{encoding}"):
                write_shards(records, f"{root}/train", shard_size=64, image_encoding=encoding)
        sizes = {
            encoding: sum(p.stat().st_size for p in (work / encoding / "train").iterdir())
            for encoding in ("source", "raw")
        }
        sources = {
            "folder (JPEG/PNG files)": ("folder", str(folder_root)),
            "shards (local Parquet)": ("shards", str(work / "source")),
            "shards (S3 endpoint)": ("shards", f"{bucket}/source"),
            "raw shards (local Parquet)": ("shards", str(work / "raw")),
            "raw shards (S3 endpoint)": ("shards", f"{bucket}/raw"),
            "raw shards (S3 endpoint, local cache)": ("shards", f"{bucket}/raw", str(cache)),
        }
        # The cache is filled before timing: its rows are what epochs after the first see.
        warm = create_dataset(
            with_data(base, "shards", f"{bucket}/raw", 0, str(cache)).data, "train"
        )
        assert sum(1 for _ in warm.iter_partition(0, 1, 0, False, 0)) == len(records)
        rates, endpoint_cores = compare_sources(
            base, sources, repeats, n_images, (0, 1), endpoint_pid=s3.proc.pid
        )
        large_rows = []
        if CAMVID.is_dir() and not args.quick:
            large = upscaled_folder(CAMVID, work / "large", 128)
            large_records = list(FolderDataset(str(large), "train").iter_records())
            write_shards(large_records, f"{work}/large-raw/train", 64, image_encoding="raw")
            large_sources = {
                "folder, 480x360 JPEG": ("folder", str(large)),
                "raw shards, 480x360 (local Parquet)": ("shards", str(work / "large-raw")),
            }
            large_rates, _ = compare_sources(base, large_sources, repeats, n_images, (0, 1))
            large_rows = ratio_rows(large_rates, "folder, 480x360 JPEG")
        fetch = fetch_costs(f"{bucket}/raw", s3.proc.pid, rounds=repeats)
        aug_loader, aug_step = augment_only(
            with_data(base, "shards", str(work / "raw"), 0), n_images
        )

        # Step time with real data (local shards as prepare_data writes them by default)
        # vs pre-made tensors, alternating: loading in the training process (tiny.yaml)
        # and in one loader worker (default.yaml), where it can overlap the step.
        # Also with the fastest CPU step (bf16 + channels_last) where it is fast: the
        # faster the step, the larger the data path's share.
        step_configs = {"float32": base}
        if cpu_has_native_bf16():
            step_configs["bf16 + channels_last"] = config(
                args.quick, ["optim.precision=bf16", "optim.channels_last=true"]
            )
        steps_by_loader: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
        for precision, step_cfg in step_configs.items():
            trainer = build_trainer(step_cfg)
            for workers in (0, 1):
                real, premade = steps_by_loader[precision, workers] = [], []
                source = with_data(step_cfg, "shards", str(work / "source"), workers)
                batches = iter(train_loader(source))
                fixed = next(batches)
                timed_steps(trainer, repeat(fixed), 0, warmup=2)
                for _ in range(repeats):
                    real.append(timed_steps(trainer, batches, steps, warmup=1)["step_s_median"])
                    premade.append(
                        timed_steps(trainer, repeat(fixed), steps, warmup=0)["step_s_median"]
                    )
                del batches
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)

    folder_key = ("folder (JPEG/PNG files)", "loader_workers=1")
    rows = ratio_rows(rates, "folder (JPEG/PNG files)")
    step_rows = [
        [
            precision,
            f"loader_workers={workers}",
            median(real) * 1000,
            median(premade) * 1000,
            median([a / b for a, b in zip(real, premade, strict=True)]),
        ]
        for (precision, workers), (real, premade) in steps_by_loader.items()
    ]
    needed = base.optim.batch_size / min(median(p) for _, p in steps_by_loader.values())
    best_shards = median(rates[("raw shards (local Parquet)", "loader_workers=1")])
    sections = [
        (
            "Setup",
            f"Images: {origin}; {len(records)} images; views {base.data.image_size}px; "
            f"batch {base.optim.batch_size}; {n_images} images timed per measurement; "
            f"{repeats} alternating repeats. Augmentation alone (train_pair_transform on "
            f"decoded images): {aug_loader:.0f} img/s for the loader's stage, "
            f"{aug_step:.0f} img/s for the step's. Model for the step: {base.model.encoder} + "
            f"{base.model.vit} depth {base.model.vit_depth}. Shard bytes on disk: "
            f"{sizes['source'] / 2**20:.1f} MiB as source files, "
            f"{sizes['raw'] / 2**20:.1f} MiB as raw pixels.",
        ),
        (
            "Training step: real data vs pre-made tensors",
            table(
                [
                    "step",
                    "loader",
                    "step ms, real data (local shards)",
                    "step ms, pre-made batch (no data path)",
                    "ratio real / pre-made",
                ],
                step_rows,
            )
            + f"\n\nThe fastest step consumes {needed:.0f} img/s; local raw shards deliver "
            f"{best_shards:.0f} img/s with 1 loader worker.",
        ),
    ]
    folder_ms = 1000 / median(rates[("folder (JPEG/PNG files)", "read + decode only")])
    raw_ms = 1000 / median(rates[("raw shards (local Parquet)", "read + decode only")])
    loader_ms, step_ms = 1000 / aug_loader, 1000 / aug_step
    measured = {row[1]: row[3] for row in rows if row[0] == "raw shards (local Parquet)"}
    sections.append(
        (
            "Where the time goes",
            f"Per image: read + decode {folder_ms:.2f} ms from the folder and {raw_ms:.2f} ms "
            f"from local raw shards. The two-view augmentation, which every source pays: "
            f"{loader_ms:.3f} ms in the loader (crop, resize, flip, collate; uint8 views) and "
            f"{step_ms:.3f} ms in the training step (colour jitter and normalisation, on the "
            "training device). Adding these parts up, raw shards would deliver "
            f"{(folder_ms + loader_ms) / (raw_ms + loader_ms):.2f}x the folder's images/s "
            "through a loader worker (where the worker's share is the bottleneck) and "
            f"{(folder_ms + loader_ms + step_ms) / (raw_ms + loader_ms + step_ms):.2f}x in "
            f"the training process; read + decode alone is {folder_ms / raw_ms:.2f}x. "
            f"Measured (Result): {measured['loader_workers=1']:.2f}x and "
            f"{measured['loader_workers=0']:.2f}x.",
        )
    )
    if endpoint_cores:
        cores = os.cpu_count() or 1
        mib_per_image = sizes["raw"] / len(records) / 2**20
        reader = fetch["pyarrow S3 client + sha256 check"]["client"]
        endpoint = fetch["pyarrow S3 client + sha256 check"]["endpoint"]
        arrow_vs_s3fs = fetch["pyarrow S3 client"]["client"] / fetch["s3fs cat_file"]["client"]
        sections.append(
            (
                "Where a cold S3 read's time goes",
                "Fetching the raw shards alone (whole files, one at a time) by each client; "
                "CPU in the reader's process (all its threads) and in the S3 endpoint's:\n\n"
                + table(
                    ["client", "MiB/s", "reader CPU ms per MiB", "endpoint CPU ms per MiB"],
                    [[name, c["MiB/s"], c["client"], c["endpoint"]] for name, c in fetch.items()],
                )
                + "\n\nA reader without a cache fetches through pyarrow's S3 client "
                f"({arrow_vs_s3fs:.2f}x s3fs's reader CPU per MiB, and none of it holding the "
                "GIL) and checks each shard's sha256. "
                f"Per raw image ({mib_per_image:.3f} MiB) that is {reader * mib_per_image:.3f} "
                f"ms in the reader and {endpoint * mib_per_image:.3f} ms in the endpoint, "
                f"next to the {raw_ms + loader_ms + step_ms:.3f} ms a local raw shard's image "
                "costs from read to finished views. The endpoint (moto's server, a Python "
                f"process) runs on the same {cores} CPUs as the reader and the training step; "
                "a real S3 endpoint spends its share on its own machines. Cores it kept busy "
                "over each timed window (10 ms ticks), median over repeats:\n\n"
                + table(
                    ["source", "how", f"endpoint cores busy (of {cores})", "img/s (median)"],
                    [
                        [name, how, median(busy), median(rates[(name, how)])]
                        for (name, how), busy in sorted(endpoint_cores.items())
                    ],
                ),
            )
        )
    if large_rows:
        sections.append(
            (
                "The same, at CamVid's published size",
                "The first 128 CamVid train images upscaled 2x to 480x360 (bicubic, JPEG "
                "q92), the size of the dataset as published (the shared copy is halved). "
                "Decode cost grows with the pixel count, and so does the crop-and-resize "
                "to the view size (an antialiased resize reads every pixel of the crop); "
                "the colour jitter and collation do not.\n\n" + table(RESULT_COLUMNS, large_rows),
            )
        )
    write_results(
        "data_path",
        "Data path: images/s delivered to the training step",
        args.out,
        facts,
        table(RESULT_COLUMNS, rows),
        notes=NOTES + f"\nFolder reference row: {folder_key}.",
        sections=sections,
    )


NOTES = """
"x folder" is the median over repeats of the source's rate over the folder loader's
rate in the same repeat and the same loader setting. Targets: shards >= 2x the
folder loader; the data path not the bottleneck (real-data step ~= pre-made step).
"""


if __name__ == "__main__":
    main()
