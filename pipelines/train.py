"""Train SAN (or a baseline) with Ray Train, tracked in MLflow, checkpointed to storage.

    python pipelines/train.py [--config FILE] [section.key=value ...]
    ray job submit --working-dir . -- python pipelines/train.py --config FILE

With no cluster it starts a local Ray; with no MLFLOW_TRACKING_URI it tracks into
outputs/mlflow.db. Rerunning with the same run.name and run.storage resumes from
the last checkpoint. The last stdout line is one JSON object:
{"mlflow_run_id": ..., "checkpoint": "<uri>", "metrics": {...}}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.common import (  # noqa: E402
    RunError,
    UserError,
    add_config_args,
    check_local_gpus,
    check_services,
    config_from_args,
    init_ray,
    on_local_ray,
    one_line,
    print_result,
    resolve_storage,
    run_main,
)
from san.config import Config, flatten  # noqa: E402

log = logging.getLogger("san")

# Samples per split that the driver reads before any worker starts. A few spread over the
# set catch a wrong layout, a mis-sized or out-of-range label convention, an unreadable
# folder; a lone corrupt file deep in a large set is skipped during training (SkipBad).
PREFLIGHT_SAMPLES = 8

# Model fields that fix the weights' shapes: a checkpoint from other values cannot resume.
SHAPE_FIELDS = (
    "name",
    "encoder",
    "stride",
    "embed_dim",
    "vit",
    "vit_patch_size",
    "vit_depth",
    "n_clusters",
    "decoder_dim",
)


def preflight_data(cfg: Config) -> None:
    """Fail in one line, before Ray starts, when the data cannot feed this run.

    Builds both splits (missing or empty folders fail here) and decodes a few samples of
    each, checking label sizes and that class ids lie in 0..n_classes-1 or are 255: the
    val split's, and the train split's when the linear probe fits on them
    (run.probe_steps > 0), which then must have labels.
    """
    from pipelines.loop import eval_classes
    from san.data import DataError, create_dataset

    probe_fits_on_train = bool(cfg.run.probe_steps)
    try:
        splits = dict.fromkeys((cfg.data.train_split, cfg.data.val_split))
        sources = {split: create_dataset(cfg.data, split) for split in splits}
        n_classes = eval_classes(cfg, sources[cfg.data.val_split])
        _warn_if_splits_share_images(cfg, sources)
        for split, source in sources.items():
            if len(source) == 0:
                raise DataError(
                    f"{cfg.data.dataset} data at {cfg.data.root!r} split {split!r} is empty"
                )
            samples = list(_spread_samples(source, PREFLIGHT_SAMPLES))
            if split != cfg.data.val_split and not probe_fits_on_train:
                continue  # decoded for their sizes; their labels are never used
            labelled = [sample for sample in samples if sample.get("label") is not None]
            if not labelled and split != cfg.data.val_split:
                raise DataError(
                    f"the linear probe (run.probe_steps={cfg.run.probe_steps}) fits on "
                    f"labels of split {split!r}, but {cfg.data.dataset} data at "
                    f"{cfg.data.root!r} has none there; give that split labels or set "
                    "run.probe_steps=0"
                )
            for sample in labelled:
                ids = sample["label"].unique()
                bad = ids[(ids >= n_classes) & (ids != 255)]
                if len(bad):
                    raise DataError(
                        f"label {sample['id']!r} in split {split!r} has class id {int(bad[0])}; "
                        f"allowed 0..{n_classes - 1} (data.n_classes={n_classes}) or 255 to ignore"
                    )
    except DataError as exc:
        raise UserError(str(exc)) from None


def _warn_if_splits_share_images(cfg: Config, sources: dict) -> None:
    """The folder and shard layouts read <root> itself for a split that has no folder of its
    own: a data.root pointing into one split (camvid/train) then evaluates on the training
    images. Legitimate for a single unsplit set, so a warning, not an error."""
    from san.data import FolderDataset, ShardDataset

    def location(source) -> str | None:
        if isinstance(source, FolderDataset):
            return str(source.folder)
        return source.root if isinstance(source, ShardDataset) else None

    train, val = (sources[split] for split in (cfg.data.train_split, cfg.data.val_split))
    if train is not val and location(train) is not None and location(train) == location(val):
        log.warning(
            "splits %r and %r both read %s (it has no %s/ or %s/ folder): evaluation scores "
            "the training images; point data.root at the folder that holds both splits",
            cfg.data.train_split,
            cfg.data.val_split,
            location(train),
            cfg.data.train_split,
            cfg.data.val_split,
        )


def _spread_samples(source, n: int):
    """Up to n samples spread evenly over a source (random access when it has it)."""
    size = len(source)
    if hasattr(source, "__getitem__"):
        step = max(1, size // n)
        for index in range(0, size, step)[:n]:
            yield source[index]
        return
    for i, sample in enumerate(source.iter_partition(0, 1, 0, False, 0)):
        if i >= n:
            return
        yield sample


def newest_saved_checkpoint(cfg: Config, storage: str) -> tuple[str, dict] | None:
    """(URI, saved config) of the checkpoint a rerun of this run would resume from: the
    newest whose files are all written (`is_written_checkpoint`). None for a new run."""
    from san import storage as st

    run_dir = st.join(storage, cfg.run.name)
    try:
        names = st.checkpoint_names(st.list_dir(run_dir))
    except FileNotFoundError:
        return None
    for name in reversed(names):
        if not st.is_written_checkpoint(st.join(run_dir, name)):
            continue  # an unfinished upload: the workers skip it too
        return st.join(run_dir, name), json.loads(
            st.read_bytes(st.join(run_dir, name, st.CONFIG_FILE))
        )
    return None


# Ray Train's record of a run's checkpoints, in the run's folder (ray.train.v2 constants).
RAY_CHECKPOINT_RECORD = "checkpoint_manager_snapshot.json"


def check_ray_record(cfg: Config, storage: str, newest: tuple[str, dict] | None) -> None:
    """Ray refuses to resume a run whose record names a checkpoint that is gone (deleted to
    go back to an earlier one, or lost), in a traceback that says to delete the whole run
    folder. Say it in one line, with the fix that keeps the other checkpoints; the same for
    one whose files are damaged, when Ray deletes old checkpoints (run.keep_checkpoints)."""
    from san import storage as st

    run_dir = st.join(storage, cfg.run.name)
    record = st.join(run_dir, RAY_CHECKPOINT_RECORD)
    if not st.exists(record):
        return
    try:
        results = json.loads(st.read_bytes(record)).get("checkpoint_results", [])
        names = [r["checkpoint_dir_name"] for r in results]
    except (ValueError, KeyError, TypeError, AttributeError):
        return  # another Ray version's format: left to Ray
    left = f"from {newest[0]}" if newest else "from step 0: no complete checkpoint is left"
    gone = [name for name in names if not st.exists(st.join(run_dir, name))]
    if gone:
        raise UserError(
            f"run {cfg.run.name!r} cannot resume: Ray's record {record} names "
            f"{', '.join(gone)}, no longer in storage; put {'it' if len(gone) == 1 else 'them'} "
            f"back, or delete that record to resume {left}"
        )
    keep = cfg.run.keep_checkpoints
    damaged = (
        [] if keep == 0 else [n for n in names if not st.is_written_checkpoint(st.join(run_dir, n))]
    )
    if damaged:
        # The workers would go on from the complete checkpoint before it and save under its
        # name again: Ray's record would hold two entries for one folder, and evicting the
        # stale one deletes the folder the new checkpoint is in.
        them = "it" if len(damaged) == 1 else "them"
        raise UserError(
            f"run {cfg.run.name!r} cannot resume with run.keep_checkpoints={keep}: Ray's record "
            f"{record} names {', '.join(damaged)}, whose files are cut short or missing; delete "
            f"{them} and that record to resume {left}"
        )


def check_resume_compatible(cfg: Config, newest: tuple[str, dict] | None) -> None:
    """A rerun resumes from the run's last checkpoint; refuse one whose weights cannot fit.

    Checked on the driver so a changed K or D is one line, not a worker traceback per restart.
    """
    if newest is None:
        return
    uri, saved_config = newest
    saved = saved_config.get("model", {})
    changed = [
        f"model.{k}={saved.get(k)!r} there, {getattr(cfg.model, k)!r} here"
        for k in SHAPE_FIELDS
        if saved.get(k) != getattr(cfg.model, k)
    ]
    # The ViT's position embeddings have one row per patch of a data.image_size image.
    saved_size = saved_config.get("data", {}).get("image_size")
    if saved_size != cfg.data.image_size:
        changed.append(f"data.image_size={saved_size!r} there, {cfg.data.image_size!r} here")
    # SAN and k-means have a decoder only while L_rec is on.
    saved_w_rec = saved_config.get("loss", {}).get("w_rec", 0)
    if cfg.model.name in ("san", "kmeans") and (saved_w_rec > 0) != (cfg.loss.w_rec > 0):
        changed.append(
            f"loss.w_rec={saved_w_rec!r} there, {cfg.loss.w_rec!r} here ({cfg.model.name} has "
            "a decoder only with w_rec > 0)"
        )
    if changed:
        raise UserError(
            f"run {cfg.run.name!r} would resume from {uri}, written with "
            f"another model ({'; '.join(changed)}): use a new run.name or the same settings"
        )


# The run.* settings that change what a run trains or reports (the others name it, place
# it, or set how often it logs and saves).
RUN_SETTINGS_THAT_TRAIN = ("run.seed", "run.num_workers", "run.probe_steps")


def say_if_finished(cfg: Config, newest: tuple[str, dict] | None) -> None:
    """Rerunning a finished run trains nothing and prints its result again: say so, and
    name any setting given now that differs from the run's, as it did not produce that
    result."""
    if newest is None:
        return
    uri, saved_config = newest
    step = int(uri.rstrip("/").rsplit("_", 1)[1])
    if step < cfg.optim.max_steps:
        return
    saved = flatten(saved_config)
    differ = [
        f"{key}={saved[key]!r} there, {value!r} here"
        for key, value in cfg.flat().items()
        if key in saved
        and key != "optim.max_steps"
        and (not key.startswith("run.") or key in RUN_SETTINGS_THAT_TRAIN)
        and saved[key] != json.loads(json.dumps(value))
    ]
    log.warning(
        "run %r already finished at step %d (%s): nothing to train, its result follows%s; "
        "raise optim.max_steps to train it further, or set a new run.name",
        cfg.run.name,
        step,
        uri,
        f", and it was not trained with these settings ({'; '.join(differ)})" if differ else "",
    )


def failure_cause(exc: BaseException) -> str:
    """The root cause of a failed fit, in one line (the exception line of a worker traceback)."""
    failures = getattr(exc, "worker_failures", None) or {}
    inner = next(iter(failures.values()), None) or getattr(exc, "controller_failure", None) or exc
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return one_line(lines[-1] if lines else type(inner).__name__, 400)


def check_fits_local_ray(cfg: Config, have: dict[str, float]) -> None:
    """On a local Ray (no RAY_ADDRESS) with resources `have`, which cannot grow, a worker
    group that does not fit would wait forever, Ray Train retrying its start every 60 s:
    say so in one line. A cluster may autoscale, so it is left to Ray."""
    if not on_local_ray():
        return
    run = cfg.run
    need = run.num_workers * run.cpus_per_worker
    if need > have.get("CPU", 0):
        raise UserError(
            f"run.num_workers={run.num_workers} x run.cpus_per_worker={run.cpus_per_worker} "
            f"need {need} CPUs but the local Ray has {have.get('CPU', 0):g}; lower them"
        )
    check_local_gpus(run, have.get("GPU", 0))


def use_gpu(cfg: Config) -> bool:
    import ray

    if cfg.run.use_gpu == "auto":
        gpus = ray.cluster_resources().get("GPU", 0)
        # Said, because an autoscaling cluster's GPU nodes may be down right now.
        log.info("run.use_gpu=auto: the cluster has %g GPUs now: %s workers", gpus,
                 "GPU" if gpus else "CPU")  # fmt: skip
        return gpus > 0
    return cfg.run.use_gpu == "true"


def build_trainer(
    cfg: Config, storage: str, run_id: str | None, callbacks=None, sweep_trial: bool = False
):
    """The TorchTrainer for one training job (also what a Tune trial builds, with
    `sweep_trial`: its loop then checks at each checkpoint whether the sweep's scheduler
    stopped it)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.loop import train_loop
    from san.storage import join, pyarrow_filesystem

    filesystem, path = pyarrow_filesystem(storage)
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "config": cfg.to_dict(),
            "mlflow_run_id": run_id,
            "storage_url": join(storage, cfg.run.name),
            "sweep_trial": sweep_trial,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=use_gpu(cfg),
            resources_per_worker={"CPU": cfg.run.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints or None),
            callbacks=callbacks,
        ),
    )


def checkpoint_uri(storage: str, cfg: Config, checkpoint) -> str:
    from san.storage import join

    return join(storage, cfg.run.name, os.path.basename(checkpoint.path.rstrip("/")))


def finish_tracking(run_id: str, status: str, uri: str | None = None, kept=None) -> None:
    """Close the MLflow run; if MLflow is down now, warn and keep the summary locally.

    The checkpoints are already safe in storage and the result line still prints, so an
    outage at the very end must not turn a finished run into a failed command.
    """
    import json
    import tempfile
    from pathlib import Path

    from pipelines import tracking

    tracking.fail_fast_http()
    try:
        if uri:
            tracking.client().set_tag(run_id, "checkpoint_uri", uri)
            tracking.log_json(run_id, kept, "checkpoints.json")
        tracking.end_run(run_id, status)
    except Exception as exc:  # any outage: connection, 5xx, artifact store
        spill = Path(tempfile.gettempdir()) / "san-mlflow-spill" / f"mlflow-unsent-{run_id}.json"
        spill.parent.mkdir(parents=True, exist_ok=True)
        spill.write_text(json.dumps({"status": status, "checkpoint_uri": uri, "checkpoints": kept}))
        log.warning(
            "MLflow is unreachable at the end of the run (%s); run %s not closed, summary in %s",
            one_line(exc, 200),
            run_id,
            spill,
        )


def train(cfg: Config) -> dict:
    """Wire storage, Ray, MLflow and the per-worker loop; return the result summary."""
    from pipelines import tracking

    # Imports timm (1.7 s): a model name timm does not know then fails here in one line,
    # not in every worker after run.max_failures restarts (a minute of Ray, then a traceback).
    from san.models import check_model_config

    storage = resolve_storage(cfg.run.storage)
    # Local workers share this machine's files (model.vit_weights); a cluster's have their own.
    check_model_config(cfg, read_weights=on_local_ray())
    preflight_data(cfg)
    check_services(cfg)
    newest = newest_saved_checkpoint(cfg, storage)
    check_ray_record(cfg, storage, newest)
    check_resume_compatible(cfg, newest)
    say_if_finished(cfg, newest)
    init_ray()
    import ray

    check_fits_local_ray(cfg, ray.cluster_resources())
    run_id, resumed = tracking.start_run(cfg, storage, source=tracking.CodeSource.of_this_process())
    log.info(
        "%s MLflow run %s; checkpoints under %s/%s",
        "resuming" if resumed else "started",
        run_id,
        storage,
        cfg.run.name,
    )
    trainer = build_trainer(cfg, storage, run_id)
    try:
        result = trainer.fit()
    except Exception as exc:
        finish_tracking(run_id, "FAILED")
        log.exception("training failed")
        import ray

        ray.shutdown()  # stops the workers' log stream, so the error below is the last line
        raise RunError(
            f"run {cfg.run.name} failed after {cfg.run.max_failures} restart(s); its last "
            f"reported checkpoint under {storage}/{cfg.run.name} is kept: {failure_cause(exc)}"
        ) from None
    except BaseException:
        finish_tracking(run_id, "FAILED")
        raise
    if result.checkpoint is None:
        finish_tracking(run_id, "FAILED")
        raise RuntimeError(f"run {cfg.run.name} finished without a checkpoint")
    uri = checkpoint_uri(storage, cfg, result.checkpoint)
    kept = sorted(checkpoint_uri(storage, cfg, c) for c, _ in result.best_checkpoints)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    finish_tracking(run_id, "FINISHED", uri, {"latest": uri, "kept": kept})
    return {"mlflow_run_id": run_id, "checkpoint": uri, "metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    cfg = config_from_args(parser.parse_args())
    print_result(train(cfg))


if __name__ == "__main__":
    run_main(main)
