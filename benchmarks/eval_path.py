"""Evaluation throughput (img/s) and peak memory against the number of images evaluated.

    .venv/bin/python benchmarks/eval_path.py [--quick]

Runs san.engine.evaluate the way pipelines/loop.py does (StreamDataset + eval
transform + DataLoader, a streaming confusion matrix) over growing numbers of
synthetic validation images, twice each: confusion matrix only, and as rank 0 runs it
(plus overlay images and the linear probe scored on every labelled pixel into a
second confusion matrix). Peak memory is the resident set size sampled every 2 ms
during the call, minus the RSS just before it: it must not grow with the number of
images. It also times what the probe adds to each evaluation before the val pass: the
forward pass over run.probe_images train images and the fit (`pipelines.loop.fit_probe`).

With ../shared/data/camvid present it also evaluates the real CamVid val split end to
end, as its JPEG folder and as raw-pixel shards, against the same batches already in
memory: the difference is what reading, decoding and resizing cost evaluation.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import CAMVID, config, machine, median, parse_args, table, write_results

from pipelines.loop import eval_classes, eval_loader, fit_probe
from san.config import RunConfig, from_dict
from san.data import FolderDataset, create_dataset, write_shards
from san.engine import evaluate, seed_everything
from san.metrics import LinearProbe
from san.models import create_model

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples this process's RSS in a thread; `.peak` is the highest seen inside the block."""

    def __enter__(self):
        self.start = rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def run(model, cfg, n_images: int, rank0_extras: bool) -> dict:
    values = cfg.to_dict()
    values["data"]["synthetic_val_size"] = n_images
    cfg = from_dict(values)
    return run_source(model, cfg, create_dataset(cfg.data, cfg.data.val_split), rank0_extras)


def rank0_extras(model, cfg, n_classes: int) -> dict:
    """What rank 0 adds to evaluate(): pictures, and a probe to score (the scoring costs
    the same whatever its weights, so a random one of the right shape stands in)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(n_classes, cfg.model.embed_dim, generator=generator)
    return {"n_viz": cfg.run.n_viz_images, "probe": LinearProbe(weight, torch.zeros(n_classes))}


def run_source(model, cfg, source, extras: bool) -> dict:
    """Evaluate `source` as run_evaluation does; img/s end to end and peak memory."""
    loader = eval_loader(cfg, source)
    n_classes = eval_classes(cfg, source)
    kwargs = rank0_extras(model, cfg, n_classes) if extras else {}
    start = time.perf_counter()
    with PeakRSS() as memory:
        result = evaluate(model, loader, n_classes, torch.device("cpu"), **kwargs)
    elapsed = time.perf_counter() - start
    n_images = len(source)
    assert result.n_images == n_images
    kept = sum(t.numel() * t.element_size() for t in result.viz_images)
    return {
        "img_s": n_images / elapsed,
        "peak_mib": (memory.peak - memory.start) / 2**20,
        "kept_mib": kept / 2**20,
    }


def probe_fit_seconds(model, cfg, repeats: int) -> float:
    """Median seconds `fit_probe` adds to an evaluation (train forward + fit), at
    cfg.run.probe_images synthetic train images."""
    values = cfg.to_dict()
    values["data"]["synthetic_train_size"] = cfg.run.probe_images
    values["run"]["probe_steps"] = RunConfig.probe_steps  # the default, not tiny.yaml's
    cfg = from_dict(values)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fit_probe(model, cfg, cfg.data.synthetic_classes, torch.device("cpu"))
        times.append(time.perf_counter() - start)
    return median(times)


def forward_only(model, cfg, n: int) -> float:
    """img/s of the model's eval forward alone on a pre-made batch (the compute ceiling)."""
    images = torch.randn(cfg.optim.batch_size, 3, cfg.data.image_size, cfg.data.image_size)
    times = []
    with torch.no_grad():
        for _ in range(max(2, n // cfg.optim.batch_size)):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    return cfg.optim.batch_size / median(times)


def camvid_rows(model, cfg, repeats: int, work: Path) -> list[list]:
    """CamVid val end to end vs the same batches already in memory: as the JPEG folder,
    and as local raw shards (`prepare_data.py --image-encoding raw`, written to `work`)."""
    records = list(FolderDataset(str(CAMVID), "val").iter_records())
    write_shards(records, str(work / "raw" / "val"), shard_size=256, image_encoding="raw")
    rows = []
    for dataset, root, what in (("folder", CAMVID, "JPEG"), ("shards", work / "raw", "raw")):
        values = cfg.to_dict()
        values["data"].update(dataset=dataset, root=str(root), n_classes=11)
        real = from_dict(values)
        source = create_dataset(real.data, "val")
        loaded = list(eval_loader(real, source))
        n_classes = eval_classes(real, source)
        extras = rank0_extras(model, real, n_classes)
        end_to_end, in_memory = [], []
        for _ in range(repeats):
            end_to_end.append(run_source(model, real, source, extras=True)["img_s"])
            start = time.perf_counter()
            evaluate(model, loaded, n_classes, torch.device("cpu"), **extras)
            in_memory.append(len(source) / (time.perf_counter() - start))
        ratios = [e / m for e, m in zip(end_to_end, in_memory, strict=True)]
        name = f"CamVid val, {len(source)} images, {what} ({dataset}), {cfg.data.image_size}px"
        rows.append([name, median(end_to_end), median(in_memory), median(ratios)])
    return rows


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    sizes = [8, 32] if args.quick else [64, 256, 1024]
    facts = machine()
    cfg = config(args.quick)
    seed_everything(0)
    model = create_model(cfg)
    model.train()
    with torch.no_grad():  # one training forward sets the running centres used at eval
        model(torch.randn(4, 3, cfg.data.image_size, cfg.data.image_size))
    model.eval()
    run(model, cfg, sizes[0], True)  # warm-up: allocator, thread pools, first-call costs
    rows = []
    for n in sizes:
        for extras in (False, True):
            res = run(model, cfg, n, extras)
            rows.append(
                [
                    n,
                    "confusion + viz + probe (rank 0)" if extras else "confusion matrix only",
                    res["img_s"],
                    res["peak_mib"],
                    res["kept_mib"],
                ]
            )
            print(rows[-1], flush=True)
    ceiling = forward_only(model, cfg, 64)
    probe_repeats = 1 if args.quick else 3
    fit_s = probe_fit_seconds(model, cfg, probe_repeats)
    header = [
        "images",
        "what is kept",
        "img/s (end to end)",
        "peak RSS growth MiB",
        "kept tensors MiB",
    ]
    setup = (
        f"Model {cfg.model.encoder} + {cfg.model.vit} depth {cfg.model.vit_depth}, "
        f"{cfg.data.image_size}px, eval batch {cfg.optim.batch_size}, synthetic val images "
        f"generated on the fly (generation is part of the end-to-end rate), loader_workers 0 "
        f"as in run_evaluation. Forward alone on a pre-made batch: {ceiling:.0f} img/s. "
        f"The probe's fit before each evaluation (forward over run.probe_images="
        f"{cfg.run.probe_images} train images, at most {RunConfig.probe_steps} L-BFGS "
        f"iterations): "
        f"{fit_s:.2f} s (median of {probe_repeats})."
    )
    sections = [("Setup", setup)]
    if CAMVID.is_dir():
        with tempfile.TemporaryDirectory(prefix="san-bench-eval-") as work:
            real = camvid_rows(model, cfg, 1 if args.quick else 5, Path(work))
        header_real = ["data", "img/s end to end", "img/s, batches in memory", "ratio (median)"]
        sections.append(("Real data", REAL_NOTES + "\n" + table(header_real, real)))
    write_results(
        "eval_path",
        "Evaluation path: throughput and peak memory vs number of images",
        args.out,
        facts,
        table(header, rows),
        notes=NOTES,
        sections=sections,
    )


REAL_NOTES = """The real CamVid val split through run_evaluation's loader (`eval_loader`;
confusion matrix, pictures and the probe's confusion matrix, as rank 0 evaluates): as
its JPEG folder, and as local raw-pixel shards (what `prepare_data.py --image-encoding
raw` writes),
against evaluate() on the same batches already in memory, in the same repeat. The ratio
is the share of evaluation left once reading, decoding and resizing are counted (1 =
they cost nothing). Images stay uint8 until evaluate() normalises them on its device.
"""

NOTES = """
Peak RSS growth is measured in this process around each evaluate() call (sampled
every 2 ms), relative to the RSS just before it; it includes the DataLoader and
the batch being processed, which do not depend on the number of images. The linear
probe adds a second confusion matrix, and its fit holds run.probe_images x 64 pixel
embeddings, whatever the size of either split.
"""


if __name__ == "__main__":
    main()
