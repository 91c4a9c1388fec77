"""Datasets registry and the streaming dataset training reads from.

Every source (synthetic, folder, shards) implements one protocol:

- `len(source)`, `source.class_names: list[str] | None`, `source.n_classes: int | None`
- `source.iter_partition(part, n_parts, epoch, shuffle, seed, start=0)` yielding
  `{"id": str, "image": uint8 3xHxW, "label": uint8 HxW | None, "position": int}` from
  position `start` of the part's epoch order; the parts of one epoch are disjoint and
  cover every item exactly once.

`StreamDataset` maps (distributed rank, DataLoader worker) to a part, so a worker
only ever reads its own slice, and can start each part where a checkpoint left it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from san.config import DataConfig
from san.data.base import (
    DataError,
    SkipBad,
    decode_image,
    decode_label,
    decode_raw,
    encode_png,
)
from san.data.cityscapes import Cityscapes27
from san.data.cocostuff import CocoStuff27
from san.data.folder import FolderDataset
from san.data.potsdam import Potsdam, Potsdam3
from san.data.shards import ShardDataset, decode_stored, write_shards
from san.data.synthetic import SyntheticScenes
from san.data.transforms import PairTransform, eval_transform

__all__ = [
    "DATASETS",
    "INLINE_MAX_BYTES",
    "Cityscapes27",
    "CocoStuff27",
    "DataError",
    "FolderDataset",
    "PairLoader",
    "Potsdam",
    "Potsdam3",
    "ShardDataset",
    "SkipBad",
    "StreamDataset",
    "SyntheticScenes",
    "create_dataset",
    "decode_image",
    "decode_label",
    "decode_raw",
    "decode_stored",
    "encode_png",
    "eval_sample_transform",
    "pack_tensor",
    "record_consumed",
    "resume_stream",
    "sample_seed",
    "stream_checkpoint",
    "train_pair_transform",
    "unpack_pairs",
    "unpack_tensor",
    "write_shards",
]

# Split seeds of the synthetic generator: images differ by split name; the seed is fixed
# so every run (and every worker) sees the same scenes.
SYNTHETIC_SEED = 0


def _synthetic(cfg: DataConfig, split: str) -> SyntheticScenes:
    n = cfg.synthetic_train_size if split == cfg.train_split else cfg.synthetic_val_size
    return SyntheticScenes(
        n_images=n,
        image_size=round(cfg.image_size * 1.25),
        n_classes=cfg.synthetic_classes,
        seed=SYNTHETIC_SEED,
        split=split,
    )


def _folder(cfg: DataConfig, split: str) -> FolderDataset:
    return FolderDataset(cfg.root, split)


def _shards(cfg: DataConfig, split: str) -> ShardDataset:
    return ShardDataset(cfg.root, split, cfg.shard_cache)


def _cocostuff27(cfg: DataConfig, split: str) -> CocoStuff27:
    return CocoStuff27(cfg.root, split)


def _cityscapes27(cfg: DataConfig, split: str) -> Cityscapes27:
    return Cityscapes27(cfg.root, split)


def _potsdam(cfg: DataConfig, split: str) -> Potsdam:
    return Potsdam(cfg.root, split)


def _potsdam3(cfg: DataConfig, split: str) -> Potsdam3:
    return Potsdam3(cfg.root, split)


DATASETS: dict[str, Callable[[DataConfig, str], Any]] = {
    "synthetic": _synthetic,
    "folder": _folder,
    "shards": _shards,
    "cocostuff27": _cocostuff27,
    "cityscapes27": _cityscapes27,
    "potsdam": _potsdam,
    "potsdam3": _potsdam3,
}


def create_dataset(cfg: DataConfig, split: str) -> Any:
    """Build the configured source for `split` (a train or val split name)."""
    if cfg.dataset not in DATASETS:
        raise DataError(f"unknown dataset {cfg.dataset!r}; allowed: {sorted(DATASETS)}")
    return DATASETS[cfg.dataset](cfg, split)


def sample_seed(seed: int, epoch: int, sample_id: str) -> int:
    """A 63-bit seed from (seed, epoch, id): the same sample gets the same augmentation."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class StreamDataset(IterableDataset):
    """Streams a source's partition for this (rank, loader worker), transformed per sample.

    Every rank must be given the same `seed`: it fixes the epoch's shared order, which the
    parts slice, and each sample's augmentation (`sample_seed`).

    A resumed run passes `start` (part -> (epoch, position of its next sample), as the
    samples' "epoch" and "position" keys tell) and `first_worker`, the loader worker whose
    batch comes next (DataLoader takes batches from its workers in turn, starting at
    worker 0, so a run that consumed `step` batches from W workers had worker
    `step % W` next). Loader worker w then reads the part the uninterrupted run's worker
    (w + first_worker) % W read, from where it stopped, and the run sees the same batches
    it would have seen without the interruption.
    """

    def __init__(
        self,
        source: Any,
        transform: Callable[[dict, torch.Generator], dict],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        loop: bool = True,
        shuffle: bool = True,
        start: dict[int, tuple[int, int]] | None = None,
        first_worker: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.source = source
        self.transform = transform
        # A transform that drops labels (training) spares the source reading and decoding them.
        if not getattr(transform, "needs_labels", True) and hasattr(source, "load_labels"):
            source.load_labels = False
        # A source told that epochs follow one another can read the next one's start ahead.
        if loop and hasattr(source, "epochs_follow"):
            source.epochs_follow = True
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.loop = loop
        self.shuffle = shuffle
        self.start = dict(start or {})
        self.first_worker = first_worker

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        n_workers = info.num_workers if info is not None else 1
        worker_id = info.id if info is not None else 0
        part = self.rank * n_workers + (worker_id + self.first_worker) % n_workers
        n_parts = self.world_size * n_workers
        epoch, position = self.start.get(part, (0, 0))
        while True:
            count = 0
            samples = self.source.iter_partition(
                part, n_parts, epoch, self.shuffle, self.seed, position
            )
            for sample in samples:
                generator = torch.Generator().manual_seed(
                    sample_seed(self.seed, epoch, sample["id"])
                )
                count += 1
                out = self.transform(sample, generator)
                # Which reader produced the sample, and how many bad samples that reader has
                # skipped so far: the training loop sums these into a logged metric, since
                # loader workers are other processes whose counters it cannot read. Where
                # the sample lies in its part's stream goes into checkpoints, for resuming.
                out["reader"] = part
                out["bad_skipped"] = getattr(self.source.on_bad, "count", 0)
                out["epoch"] = epoch
                out["position"] = sample["position"]
                yield out
            if not self.loop:
                return
            if count == 0 and position == 0:
                raise DataError(
                    f"data part {part} of {n_parts} is empty: {len(self.source)} items cannot "
                    f"feed {self.world_size} workers x {n_workers} loader workers"
                )
            epoch, position = epoch + 1, 0


def record_consumed(next_samples: dict[int, tuple[int, int]], batch: dict) -> None:
    """Note in `next_samples` (part -> (epoch, position of its next sample)) that the
    training step consumed `batch`: its reader's next sample is the one after its last."""
    next_samples[int(batch["reader"][-1])] = (
        int(batch["epoch"][-1]),
        int(batch["position"][-1]) + 1,
    )


def stream_checkpoint(
    seed: int,
    n_parts: int,
    next_samples: dict[int, tuple[int, int]],
    next_reader: int,
    layout: int = 1,
) -> dict:
    """What a checkpoint keeps of the training stream: its seed, how many parts it had, each
    part's (epoch, position of its next sample), which of a rank's loader workers gives
    the next batch (they take turns: `(first_worker + batches read) % loader workers` for a
    stream started with `first_worker`), and how the source split itself into parts (its
    `partition_layout`), as `resume_stream` reads it back."""
    return {
        "seed": seed,
        "n_parts": n_parts,
        "parts": dict(sorted(next_samples.items())),
        "next_reader": next_reader,
        "layout": layout,
    }


def resume_stream(
    saved: dict | None,
    step: int,
    seed: int,
    world_size: int,
    loader_workers: int,
    layout: int = 1,
) -> tuple[dict, str]:
    """`StreamDataset` arguments (seed, start, first_worker) for a run resuming at `step`
    from a checkpoint's `stream_checkpoint` entry, and a line saying how its data goes on.

    With as many parts as the checkpoint's stream had (world size x loader workers), split
    the same way (the source's `layout`; one part is the whole data in any layout), the run
    reads on exactly where it stopped. Otherwise (the parts changed, or a checkpoint from
    before streams were saved) no sample position carries over: the run starts a new
    stream, seeded by `seed + step` so that it is reproducible yet not the data of steps
    1.. again.
    """
    readers = max(1, loader_workers)
    n_parts = world_size * readers
    same_split = n_parts == 1 or (saved or {}).get("layout", 1) == layout
    if saved is not None and saved["n_parts"] == n_parts and same_split:
        start = {int(p): (int(e), int(i)) for p, (e, i) in saved["parts"].items()}
        # Checkpoints from before "next_reader" was kept: right for a stream begun at step 0.
        first_worker = int(saved.get("next_reader", step % readers))
        args = {"seed": int(saved["seed"]), "start": start, "first_worker": first_worker}
        return args, f"data: the stream goes on where step {step} left it"
    if saved is None:
        why = "the checkpoint has no stream position"
    elif saved["n_parts"] != n_parts:
        why = (
            f"the checkpoint's stream had {saved['n_parts']} parts, now {n_parts} "
            f"({world_size} workers x {readers} loader workers)"
        )
    else:
        why = f"the checkpoint's stream split the data into its {n_parts} parts another way"
    return {"seed": seed + step}, f"data: a new stream, seeded {seed + step}: {why}"


class TrainPairTransform:
    """sample -> PairTransform's per-image stage + "id"; `collate` packs a batch of them.

    Labels are dropped (training is unsupervised), so sources are told not to read them.
    """

    needs_labels = False

    def __init__(self, cfg: DataConfig) -> None:
        self.pair = PairTransform(cfg.image_size, cfg.crop_min_scale, cfg.jitter)

    def __call__(self, sample: dict, generator: torch.Generator) -> dict:
        """sample -> {"views": both uint8 views, "params": both rows of 9 numbers (lists,
        as `PairTransform.views` gives them; `collate` makes the batch's tensors), "id"}."""
        views, params = self.pair.views(sample["image"], generator)
        return {"views": views, "params": params, "id": sample["id"]}

    def collate(self, samples: list[dict]) -> dict:
        """Samples -> {"views": uint8 B x 2 x 3 x S x S (not yet jittered or normalised),
        "params": float32 B x 2 x 9 (per view: crop box in [0, 1] coordinates, 1.0 if
        flipped, the four colour-jitter numbers), "id", "reader", "bad_skipped"}.

        Runs in the loader worker. Colour jitter and normalisation wait for the training
        device (`san.engine.Trainer.step` calls `finish_views`), so the batch crosses as
        uint8, a quarter of float32's bytes. In a loader worker the two tensors cross
        inline (`pack_tensor`).
        """
        views = torch.stack([view for s in samples for view in s["views"]])
        views = views.view(len(samples), 2, *views.shape[1:])
        params = torch.tensor([s["params"] for s in samples], dtype=torch.float32)
        batch = {
            "views": views,
            "params": params,
            "id": [s.get("id") for s in samples],
            "reader": [int(s.get("reader", 0)) for s in samples],
            "bad_skipped": [int(s.get("bad_skipped", 0)) for s in samples],
            "epoch": [int(s.get("epoch", 0)) for s in samples],
            "position": [int(s.get("position", 0)) for s in samples],
        }
        if get_worker_info() is not None:
            batch["views"], batch["params"] = pack_tensor(views), pack_tensor(params)
        return batch


# A tensor a loader worker returns crosses in its own shared-memory segment, whose file
# descriptor the training process then fetches over a socket: about 0.4 ms of the worker's
# time per tensor on a 2-core host, more than a batch of small views takes to copy through
# the result pipe. Timed with the loader worker as the bottleneck: a 49 KiB uint8 batch
# (8 images, 32 px views) cost the worker 0.3 ms as bytes and 1.15 ms as tensors, and up to
# 1.5 MiB bytes were never slower. Bigger batches keep shared memory (no double copy).
INLINE_MAX_BYTES = 1 << 20


def pack_tensor(tensor: torch.Tensor) -> torch.Tensor | tuple:
    """A small tensor -> (bytes, dtype, shape), which pickles inline; a big one unchanged."""
    if tensor.numel() * tensor.element_size() > INLINE_MAX_BYTES:
        return tensor
    return tensor.contiguous().numpy().tobytes(), tensor.dtype, tuple(tensor.shape)


def unpack_tensor(value: torch.Tensor | tuple) -> torch.Tensor:
    """The inverse of `pack_tensor`: a fresh, writable tensor (or the tensor as it came)."""
    if isinstance(value, torch.Tensor):
        return value
    data, dtype, shape = value
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)


def unpack_pairs(batch: dict) -> dict:
    """A `TrainPairTransform.collate` batch -> the Trainer's keys: view1/view2 (uint8
    B x 3 x S x S, finished by `Trainer.step`), box1/box2 (B x 4, [0, 1] coordinates),
    flip1/flip2 (B, bool), jitter1/jitter2 (B x 4), id, reader, bad_skipped, epoch,
    position."""
    views, params = unpack_tensor(batch["views"]), unpack_tensor(batch["params"])
    return {
        "view1": views[:, 0],
        "view2": views[:, 1],
        "box1": params[:, 0, :4],
        "box2": params[:, 1, :4],
        "flip1": params[:, 0, 4] > 0.5,
        "flip2": params[:, 1, 4] > 0.5,
        "jitter1": params[:, 0, 5:],
        "jitter2": params[:, 1, 5:],
        "id": batch["id"],
        "reader": torch.tensor(batch["reader"]),
        "bad_skipped": torch.tensor(batch["bad_skipped"]),
        "epoch": torch.tensor(batch["epoch"]),
        "position": torch.tensor(batch["position"]),
    }


class EndWithParent:
    """A DataLoader ``worker_init_fn``: the loader worker is killed when the process that
    started it dies (Linux; elsewhere it does nothing). Strictly, when the thread that
    started it ends: a loader is iterated from one thread.

    torch's loader workers notice a dead parent, but their exit then waits on a queue pipe
    that the sibling workers still hold open, so they live on. A training worker killed
    (the OOM killer, a crash, kill -9) thus left its loader workers holding its sockets,
    and Ray took the dead worker for a slow one: its restart waited over 7 minutes.
    """

    def __init__(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid

    def __call__(self, worker_id: int) -> None:
        if not sys.platform.startswith("linux"):
            return
        pr_set_pdeathsig = 1  # <linux/prctl.h>; a refused call (seccomp) leaves torch's way
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, ctypes.c_ulong(signal.SIGKILL))
        if os.getppid() != self.parent_pid:  # the parent died before the line above
            os._exit(1)  # not sys.exit: its exit handlers would wait on the dead queue


class PairLoader(DataLoader):
    """The training DataLoader: the transform's `collate` in the loader, `unpack_pairs` on
    delivery, and loader workers that end with the training worker (`EndWithParent`).

    Takes DataLoader's arguments except `collate_fn` and `worker_init_fn`; a batch crosses
    from loader workers as two (inlined) tensors and arrives with the keys `Trainer.step`
    reads. Iterate it from one thread.
    """

    def __init__(self, dataset: StreamDataset, **kwargs: Any) -> None:
        if "worker_init_fn" in kwargs:
            raise TypeError("PairLoader sets worker_init_fn itself (EndWithParent)")
        super().__init__(dataset, collate_fn=dataset.transform.collate, **kwargs)

    def _get_iterator(self):  # where torch starts the workers, in the iterating process
        context = self.multiprocessing_context or torch.multiprocessing
        # Under forkserver the workers' parent is the fork server: nothing to end with.
        started_here = context.get_start_method() in ("fork", "spawn")
        if self.num_workers > 0 and started_here:
            self.worker_init_fn = EndWithParent(os.getpid())
        return super()._get_iterator()

    def __iter__(self) -> Iterator[dict]:
        return map(unpack_pairs, super().__iter__())


class EvalSampleTransform:
    """sample -> {"image": uint8 3xSxS, "label": uint8 SxS (255 if missing), "id"}.

    Both stay uint8 until `san.engine.evaluate` normalises the batch on its device."""

    def __init__(self, cfg: DataConfig) -> None:
        self.image_size = cfg.image_size

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        image, label = eval_transform(sample["image"], sample.get("label"), self.image_size)
        if label is None:
            label = torch.full((self.image_size, self.image_size), 255, dtype=torch.uint8)
        return {"image": image, "label": label, "id": sample["id"]}


def train_pair_transform(cfg: DataConfig) -> TrainPairTransform:
    return TrainPairTransform(cfg)


def eval_sample_transform(cfg: DataConfig) -> EvalSampleTransform:
    return EvalSampleTransform(cfg)
