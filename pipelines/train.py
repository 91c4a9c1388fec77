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
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.common import (  # noqa: E402
    add_config_args,
    check_services,
    config_from_args,
    init_ray,
    print_result,
    resolve_storage,
    run_main,
)
from san.config import Config  # noqa: E402

log = logging.getLogger("san")


def use_gpu(cfg: Config) -> bool:
    import ray

    if cfg.run.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return cfg.run.use_gpu == "true"


def build_trainer(cfg: Config, storage: str, run_id: str | None, callbacks=None):
    """The TorchTrainer for one training job (also what a Tune trial builds)."""
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


def train(cfg: Config) -> dict:
    """Wire storage, Ray, MLflow and the per-worker loop; return the result summary."""
    from pipelines import tracking

    storage = resolve_storage(cfg.run.storage)
    check_services(cfg)
    init_ray()
    run_id, resumed = tracking.start_run(cfg, storage)
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
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    if result.checkpoint is None:
        tracking.end_run(run_id, "FAILED")
        raise RuntimeError(f"run {cfg.run.name} finished without a checkpoint")
    uri = checkpoint_uri(storage, cfg, result.checkpoint)
    kept = sorted(checkpoint_uri(storage, cfg, c) for c, _ in result.best_checkpoints)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    mlflow_client = tracking.client()
    mlflow_client.set_tag(run_id, "checkpoint_uri", uri)
    tracking.log_json(run_id, {"latest": uri, "kept": kept}, "checkpoints.json")
    tracking.end_run(run_id, "FINISHED")
    return {"mlflow_run_id": run_id, "checkpoint": uri, "metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    cfg = config_from_args(parser.parse_args())
    print_result(train(cfg))


if __name__ == "__main__":
    run_main(main)
