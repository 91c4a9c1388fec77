"""The training loop that runs on every Ray Train worker, and the shared evaluation.

`train_loop` is the function `TorchTrainer` runs per worker; `pipelines/train.py`
and `pipelines/tune.py` both use it, so there is one copy of the training code.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from pipelines.common import progress
from san import storage
from san.config import Config, from_dict
from san.data import (
    DataError,
    PairLoader,
    SkipBad,
    StreamDataset,
    create_dataset,
    eval_sample_transform,
    record_consumed,
    resume_stream,
    stream_checkpoint,
    train_pair_transform,
)
from san.data.transforms import denormalize
from san.engine import Trainer, apply_memory_format, evaluate, probe_pixels, seed_everything
from san.metrics import (
    LinearProbe,
    fit_linear_probe,
    hungarian_match,
    probe_scores,
    random_assignment_scores,
    scalar_metrics,
    segmentation_scores,
)
from san.viz import confusion_plot, overlay_panel

log = logging.getLogger("san")

PROBE_PIXELS_PER_IMAGE = 64

# What each checkpoint reports to Ray (so what a sweep's metric may name), besides
# "iou/<class name>" per class; the probe's two only with run.probe_steps > 0.
REPORTED_METRICS = (
    "miou",
    "miou_one_to_one",
    "pixel_accuracy",
    "random_miou",
    "random_pixel_accuracy",
    "loss",
    "step",
    "val_bad_samples_skipped",
)
PROBE_METRICS = ("probe_miou", "probe_pixel_accuracy")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:07d}"


@dataclass
class Evaluation:
    metrics: dict[str, float] = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    pictures: dict[str, bytes] = field(default_factory=dict)


def eval_classes(cfg: Config, source) -> int:
    """How many classes evaluation scores: data.n_classes, else what the data declares."""
    n_classes = cfg.data.n_classes or source.n_classes
    if not n_classes:
        raise DataError(
            f"the {cfg.data.dataset!r} data at {cfg.data.root!r} declares no classes; "
            "set data.n_classes"
        )
    names = source.class_names
    if names and len(names) != n_classes:
        # The per-class scores are named from the list: one name per class or none.
        raise DataError(
            f"data.n_classes={n_classes}, but the {cfg.data.dataset!r} data at "
            f"{cfg.data.root!r} names {len(names)} classes; leave data.n_classes unset "
            "or give as many class names"
        )
    return n_classes


def eval_class_names(cfg: Config) -> list[str]:
    """The names evaluation reports per-class IoU under (iou/<name>): the val data's class
    names, else its class ids."""
    source = create_dataset(cfg.data, cfg.data.val_split)
    n_classes = eval_classes(cfg, source)
    return list(source.class_names) if source.class_names else [str(i) for i in range(n_classes)]


def eval_loader(cfg: Config, source, rank: int = 0, world_size: int = 1) -> DataLoader:
    """This rank's part of `source` in evaluation batches (uint8 images, labels), read in
    this process. A loader worker measured only about 5% faster (CamVid val, 32 px, 2-core
    CPU), would be forked at every evaluation, and would keep its skipped-sample count
    from `source.on_bad`, which run_evaluation reports."""
    stream = StreamDataset(
        source, eval_sample_transform(cfg.data), rank, world_size, loop=False, shuffle=False
    )
    return DataLoader(stream, batch_size=cfg.optim.batch_size, num_workers=0)


def checkpoint_staging(storage_url: str) -> Path:
    """This machine's folder for the checkpoints of the run at `storage_url` (run.storage
    joined with run.name) on their way there.

    Ray deletes each once uploaded. A run killed with uploads still queued leaves theirs
    behind, so `train_loop` empties the folder when the run (re)starts. Named by the run
    and a hash of its full URL: same-named runs on other storage are other runs.
    """
    digest = hashlib.sha256(storage_url.encode()).hexdigest()[:12]
    name = f"{os.path.basename(storage_url.rstrip('/'))}-{digest}"
    return Path(tempfile.gettempdir()) / "san-checkpoints" / name


def uploads_in_background(cfg: Config, sweep_trial: bool) -> bool:
    """run.checkpoint_upload, with "auto" resolved: async unless this is a sweep's trial."""
    if cfg.run.checkpoint_upload == "auto":
        return not sweep_trial
    return cfg.run.checkpoint_upload == "async"


def report_checkpoint(
    metrics: dict, state: dict | None, cfg: Config, storage_url: str, name: str, background: bool
) -> None:
    """Report this step to Ray Train with the checkpoint `state` (rank 0) or none (other
    ranks; every rank reports, as Ray requires), uploaded to run.storage under `name`.

    The checkpoint is written to local disk first (`checkpoint_staging`), and Ray deletes
    that copy once it is uploaded. In the `background` (`uploads_in_background`) Ray
    uploads in its own thread, so this returns as soon as the checkpoint is written;
    otherwise it returns after the upload.
    """
    import ray.train

    upload = ray.train.CheckpointUploadMode
    mode = upload.ASYNC if background else upload.SYNC
    if state is None:
        ray.train.report(metrics, checkpoint_dir_name=name, checkpoint_upload_mode=mode)
        return
    staging = checkpoint_staging(storage_url)
    staging.mkdir(parents=True, exist_ok=True)
    directory = tempfile.mkdtemp(prefix=f"{name}-", dir=staging)
    try:
        storage.save_checkpoint(directory, state, cfg.to_dict())
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=name,
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=True,
        )
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def report_stored_checkpoint(metrics: dict, name: str, with_checkpoint: bool) -> None:
    """Report `metrics` with the checkpoint already in run.storage under `name` (rank 0:
    `with_checkpoint`) or none: Ray records it where it is, without copying it over
    itself (a copy cut short would leave the run's only final checkpoint damaged)."""
    import ray.train

    checkpoint = None
    if with_checkpoint:
        # get_storage is Ray's DeveloperAPI: the run folder's filesystem, as Ray uploads to.
        where = ray.train.get_context().get_storage()
        checkpoint = ray.train.Checkpoint(
            path=where.build_checkpoint_path_from_name(name), filesystem=where.storage_filesystem
        )
    ray.train.report(
        metrics,
        checkpoint=checkpoint,
        checkpoint_dir_name=name,
        checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
    )


def fit_probe(
    model: torch.nn.Module, cfg: Config, n_classes: int, device: torch.device, rank: int = 0
) -> LinearProbe | None:
    """The linear probe for this evaluation (None with run.probe_steps=0), on every rank.

    Rank 0 fits it on run.probe_images images of the train split (a fixed sample: the
    split's epoch-0 order for run.seed) and gives it to the other ranks, which score it on
    their part of val.
    """
    if not cfg.run.probe_steps:
        return None
    probe = None
    if rank == 0:
        source = create_dataset(cfg.data, cfg.data.train_split)
        source.on_bad = SkipBad(cfg.data.max_bad_samples)
        stream = StreamDataset(
            source, eval_sample_transform(cfg.data), seed=cfg.run.seed, loop=False
        )
        feats, labels = probe_pixels(
            model,
            DataLoader(stream, batch_size=cfg.optim.batch_size, num_workers=0),
            device,
            precision=cfg.optim.precision,
            per_image=PROBE_PIXELS_PER_IMAGE,
            max_images=cfg.run.probe_images,
            seed=cfg.run.seed,
        )
        if labels.numel() == 0:
            raise DataError(
                f"the linear probe (run.probe_steps={cfg.run.probe_steps}) fits on labelled "
                f"pixels of split {cfg.data.train_split!r}, but its first "
                f"{cfg.run.probe_images} images have none; give that split labels or set "
                "run.probe_steps=0"
            )
        try:
            probe = fit_linear_probe(feats, labels, n_classes, steps=cfg.run.probe_steps)
        except ValueError as exc:  # a train label outside the val split's classes
            raise DataError(f"linear probe on split {cfg.data.train_split!r}: {exc}") from None
    return _broadcast(probe.to("cpu") if probe is not None else None, rank)


def run_evaluation(
    model: torch.nn.Module,
    cfg: Config,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    pictures: bool = True,
) -> Evaluation:
    """Evaluate on the val split: each rank streams its part, confusion matrices are summed.

    Scores, the random-assignment floor and pictures come from rank 0. The linear probe
    (`fit_probe`, fitted on train-split labels) is scored on every rank's part of val.
    """
    source = create_dataset(cfg.data, cfg.data.val_split)
    source.on_bad = SkipBad(cfg.data.max_bad_samples)
    n_classes = eval_classes(cfg, source)
    probe = fit_probe(model, cfg, n_classes, device, rank)
    loader = eval_loader(cfg, source, rank, world_size)
    is_main = rank == 0
    max_images = math.ceil(cfg.data.max_val_images / world_size) if cfg.data.max_val_images else 0
    result = evaluate(
        model,
        loader,
        n_classes,
        device,
        precision=cfg.optim.precision,
        n_viz=cfg.run.n_viz_images if is_main and pictures else 0,
        max_images=max_images,
        probe=probe,
    )
    matrix = result.confusion.matrix
    val_skipped = _sum_over_ranks(source.on_bad.count, device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(matrix)
        if result.probe_confusion is not None:
            dist.all_reduce(result.probe_confusion.matrix)
    if not is_main or int(matrix.sum()) == 0:
        return Evaluation()
    scores = segmentation_scores(matrix, class_names=source.class_names)
    metrics = scalar_metrics(scores)
    # The protocol's many-to-one matching (K > classes) scores higher the more clusters
    # there are, so its miou cannot compare runs of different K; one-to-one can (clusters
    # left unmatched count as misses). Equal to miou when K <= classes.
    one_to_one = segmentation_scores(matrix, mapping=hungarian_match(matrix))
    metrics["miou_one_to_one"] = one_to_one["miou"]
    floor = random_assignment_scores(matrix, model.n_clusters, seed=cfg.run.seed)
    metrics["random_miou"] = floor["miou"]
    metrics["random_pixel_accuracy"] = floor["pixel_accuracy"]
    metrics["val_bad_samples_skipped"] = val_skipped
    if result.probe_confusion is not None:
        metrics.update(probe_scores(result.probe_confusion))
    evaluation = Evaluation(metrics=metrics, scores=scores)
    if result.viz_images:
        evaluation.pictures["overlay.png"] = overlay_panel(
            denormalize(torch.stack(result.viz_images)),
            torch.stack(result.viz_preds),
            torch.stack(result.viz_labels),
            mapping=scores["mapping"],
        )
        evaluation.pictures["confusion.png"] = confusion_plot(
            matrix.cpu().numpy(), source.class_names, scores["mapping"]
        )
    return evaluation


def _sum_over_ranks(value: int, device: torch.device) -> int:
    """A count summed over all training processes (every rank must call it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def capture_rng() -> dict:
    # Only torch's generator drives training randomness (data augmentation is seeded
    # per sample), and a tensor keeps the checkpoint loadable with weights_only=True.
    return {"torch": torch.get_rng_state()}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])


def sync_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics, running centres).

    DDP broadcasts buffers before each forward, but the forward then updates them
    locally, so without this each rank would evaluate a slightly different model
    from the one rank 0 checkpoints.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def prepare_ddp_model(model: torch.nn.Module) -> torch.nn.Module:
    """Ray Train's `prepare_model` (to the worker's device; DDP-wrapped with 2+ workers),
    with DDP's gradients kept as views into its all-reduce buckets: one copy of the
    gradients less in memory and no copy into the buckets each step (2 CPU workers:
    peak RSS 1205 -> 1184 MiB per worker, the gradients' 22 MiB; step time unchanged)."""
    import ray.train.torch

    return ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"gradient_as_bucket_view": True}
    )


def _merged_over_ranks(mine: dict) -> dict:
    """The union of every rank's dict (every rank must call it; their keys are disjoint)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return dict(mine)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {key: value for theirs in everyone for key, value in theirs.items()}


def _broadcast(obj, rank: int):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def train_loop(loop_config: dict) -> None:
    """Per-worker training: resume, stream this rank's data, step, evaluate, checkpoint."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(loop_config["config"])
    run_id: str | None = loop_config.get("mlflow_run_id")
    storage_url: str = loop_config["storage_url"]
    sweep_trial: bool = loop_config.get("sweep_trial", False)
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # The pid lets an operator (or a fault-injection test) find this worker's process.
    log.info("worker rank %d of %d: pid %d on %s", rank, world_size, os.getpid(), device)
    torch.set_num_threads(max(1, cfg.run.cpus_per_worker))
    seed_everything(cfg.run.seed)  # same init on every rank; DDP also broadcasts rank 0's

    # Imported here, not at the top: timm costs drivers (train.py, tune.py, each Tune trial)
    # about 4 s of start-up, and only workers build a model.
    from san.models import create_model

    model = create_model(cfg)
    background = uploads_in_background(cfg, sweep_trial)
    if rank == 0:  # the only rank that writes checkpoints
        # What an earlier attempt of this run left there reached storage already, or went
        # with that attempt, which never registered it.
        shutil.rmtree(checkpoint_staging(storage_url), ignore_errors=True)
    state = None
    registered = ray.train.get_checkpoint()
    # A newer complete checkpoint than Ray registered may be in storage: the run was killed
    # after an upload and before Ray recorded it. Resuming from it loses no finished work.
    # Looked for first, so Ray's older one is downloaded only when it is the one used.
    newer_than = os.path.basename(registered.path.rstrip("/")) if registered else ""
    # (uri, state, config) of a checkpoint Ray has no record of.
    unrecorded = storage.latest_complete_checkpoint(storage_url, newer_than=newer_than)
    if unrecorded is not None:
        state = unrecorded[1]
        if rank == 0:
            uri = unrecorded[0]
            log.info("using %s from storage: newer than any checkpoint Ray registered", uri)
    elif registered is not None:
        # Read in place, as the search above does, not through Ray's as_directory: that
        # copies it to local disk first, and leaves a folder in /tmp when the copy fails.
        uri = storage.join(storage_url, newer_than)
        try:
            state, _ = storage.load_checkpoint(uri)
        except storage.CheckpointError as exc:
            # Deleted or damaged since Ray registered it (say, a user removed a checkpoint
            # to go back to the one before): go on from the newest complete one left.
            fallback = storage.latest_complete_checkpoint(storage_url)
            state = fallback[1] if fallback else None
            if rank == 0:
                instead = f"resuming from {fallback[0]}" if fallback else "starting from step 0"
                log.warning("%s; %s instead", exc, instead)
    if state is not None:
        model.load_state_dict(state["model"])
    start_step = state["step"] if state else 0
    core = apply_memory_format(model, cfg.optim)  # before DDP sizes its gradient buckets
    model = prepare_ddp_model(core)
    trainer = Trainer(model, cfg, device)
    if state:
        trainer.load_state_dict(state["trainer"])
        if rank == 0:
            log.info("resumed from step %d", start_step)

    source = create_dataset(cfg.data, cfg.data.train_split)
    source.on_bad = SkipBad(cfg.data.max_bad_samples)  # a corrupt file must not end a long run
    layout = getattr(source, "partition_layout", 1)  # how a stream position maps to rows
    stream_args = {"seed": cfg.run.seed}
    if state is not None:
        stream_args, how = resume_stream(
            state.get("data"),
            start_step,
            cfg.run.seed,
            world_size,
            cfg.data.loader_workers,
            layout=layout,
        )
        if rank == 0:
            log.info(how)
    stream = StreamDataset(source, train_pair_transform(cfg.data), rank, world_size, **stream_args)
    # This rank's parts -> (epoch, position of the part's next sample), for checkpoints.
    readers = max(1, cfg.data.loader_workers)
    mine = range(rank * readers, (rank + 1) * readers)
    next_samples = {part: at for part, at in stream.start.items() if part in mine}
    loader = PairLoader(
        stream,
        batch_size=cfg.optim.batch_size,
        num_workers=cfg.data.loader_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.loader_workers > 0,
        prefetch_factor=4 if cfg.data.loader_workers > 0 else None,
    )
    logger = None
    if rank == 0 and run_id:
        # Only rank 0 logs: the other ranks never import mlflow (1.5 s CPU, 80 MB each).
        from pipelines.tracking import RunLogger

        logger = RunLogger(run_id)
    if logger and state:
        # A restart (worker lost, or the driver rerun) shows in the same run: the tag holds
        # the latest resume, the metric's history every one of them.
        logger.tag("san.resumed_at_step", str(start_step))
        logger.metrics({"resumed_at_step": start_step}, start_step)
    try:
        batches = iter(loader)
        if state:  # after iter(loader): starting loader workers draws from torch's generator
            restore_rng(state["rng"])
        images_seen, window_start = 0, time.perf_counter()
        loop_start = window_start  # the ETA counts evaluations and checkpoints too
        bad_skipped: dict[int, int] = {}  # reader (loader worker) -> its running count
        step = start_step
        if unrecorded is not None and step >= cfg.optim.max_steps:
            # A final checkpoint that Ray never recorded (the run ended between its upload
            # and the record): nothing is left to train, so report it again, or the run's
            # result would be an older checkpoint, or none (a traceback, the run FAILED).
            metrics = state.get("metrics")  # every rank loaded the same state
            if metrics is None:  # checkpoints from before they kept their metrics
                evaluation = run_evaluation(core, cfg, device, rank, world_size)
                metrics = {"step": step, "loss": float("nan"), **evaluation.metrics}
                metrics = _broadcast(metrics, rank)
            uri = unrecorded[0]
            if rank == 0:
                log.info("%s is complete but not in Ray's record: reporting it again", uri)
            name = os.path.basename(uri.rstrip("/"))  # the folder found, whatever its step
            report_stored_checkpoint(metrics, name, with_checkpoint=rank == 0)
        while step < cfg.optim.max_steps:
            batch = next(batches)
            record_consumed(next_samples, batch)
            bad_skipped[int(batch["reader"][0])] = int(batch["bad_skipped"].max())
            lr = trainer.optimizer.param_groups[0]["lr"]  # the step's; it moves on after
            losses = trainer.step(batch)
            step += 1
            images_seen += batch["view1"].shape[0] * world_size
            logs_now = step % cfg.run.log_every == 0 or step == cfg.optim.max_steps
            saves_now = step % cfg.run.checkpoint_every == 0 or step == cfg.optim.max_steps
            # A sweep's scheduler may have stopped this trial. Asked wherever it would log
            # or save, so that it neither trains on to its next checkpoint nor logs long
            # past the step the decision was made at. Plain runs skip the MLflow read.
            if sweep_trial and (logs_now or saves_now):
                stopped = bool(logger and logger.stopped_by_scheduler())
                if _sum_over_ranks(int(stopped), device):
                    if rank == 0:
                        log.info("stopped by the sweep's scheduler; ending at step %d", step)
                    break
            if logs_now:
                elapsed = time.perf_counter() - window_start
                throughput = images_seen / max(elapsed, 1e-9)
                losses["img_per_s"] = throughput
                losses["lr"] = lr
                losses["bad_samples_skipped"] = _sum_over_ranks(sum(bad_skipped.values()), device)
                if rank == 0:
                    terms = " ".join(
                        f"{k[5:]} {v:.4f}" for k, v in losses.items() if k[:5] == "loss_"
                    )
                    per_step = (time.perf_counter() - loop_start) / (step - start_step)
                    log.info(
                        "step %d/%d loss %.4f (%s) | %.1f img/s | lr %.2e | %s",
                        step,
                        cfg.optim.max_steps,
                        losses["loss"],
                        terms,
                        throughput,
                        losses["lr"],
                        progress(step, cfg.optim.max_steps, per_step),
                    )
                    if logger:
                        logger.metrics(losses, step)
                images_seen, window_start = 0, time.perf_counter()
            if saves_now:
                sync_buffers(core)
                evaluation = run_evaluation(core, cfg, device, rank, world_size)
                metrics = {"step": step, "loss": losses["loss"], **evaluation.metrics}
                metrics = _broadcast(metrics, rank)
                stream_at = stream_checkpoint(
                    stream.seed,
                    world_size * readers,
                    _merged_over_ranks(next_samples),
                    next_reader=(stream.first_worker + step - start_step) % readers,
                    layout=layout,
                )
                name = checkpoint_name(step)
                uri = storage.join(storage_url, name)
                if rank == 0:
                    log.info(
                        "eval step %d: mIoU %.4f pixel acc %.4f (random floor mIoU %.4f) -> %s",
                        step,
                        metrics.get("miou", float("nan")),
                        metrics.get("pixel_accuracy", float("nan")),
                        metrics.get("random_miou", float("nan")),
                        uri,
                    )
                    if logger:
                        # "loss" is logged at log steps; again here it would put a second
                        # point at each checkpoint step that is one, and uneven ones between.
                        evaluated = {k: v for k, v in metrics.items() if k not in ("step", "loss")}
                        logger.metrics(evaluated, step)
                        for picture, data in evaluation.pictures.items():
                            logger.artifact(data, f"pictures/step_{step:07d}_{picture}")
                        logger.tag("checkpoint_uri", uri)
                    waited_from = time.perf_counter()
                    state = {
                        "model": core.state_dict(),
                        "trainer": trainer.state_dict(),
                        "step": step,
                        "rng": capture_rng(),
                        "data": stream_at,
                        "mlflow_run_id": run_id,
                        # Reported again if Ray never records this checkpoint; plain numbers,
                        # as weights_only loading takes no numpy scalars.
                        "metrics": {
                            k: v if type(v) is int else float(v) for k, v in metrics.items()
                        },
                    }
                    report_checkpoint(metrics, state, cfg, storage_url, name, background)
                    if logger:
                        waited = time.perf_counter() - waited_from
                        logger.metrics({"checkpoint_wait_s": waited}, step)
                else:
                    report_checkpoint(metrics, None, cfg, storage_url, name, background)
    finally:
        # Also on an error (storage down, bad data): buffered results go to a spill file.
        if logger:
            logger.close(os.path.join(tempfile.gettempdir(), "san-mlflow-spill"))
