"""Evaluate a SAN checkpoint from any storage URI and log the result to MLflow.

    python pipelines/evaluate.py --checkpoint URI [--register NAME [--alias A]] [data.key=value ...]

The metrics (Hungarian pixel accuracy and mIoU, per-class IoU, the random
floor, the linear probe) and pictures are logged against the training run that
wrote the checkpoint when it is known to the tracking server, else to a new run
tagged with the checkpoint URI. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.common import UserError, print_result, run_main  # noqa: E402
from san.config import Config, apply_overrides, from_dict  # noqa: E402
from san.storage import CheckpointError, load_checkpoint  # noqa: E402

log = logging.getLogger("san")


def load_model(uri: str, overrides: list[str]):
    """(model, cfg, state) from a checkpoint; a checkpoint that does not fit is one line."""
    import torch

    from san.models import create_model

    try:
        state, saved = load_checkpoint(uri)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    cfg = from_dict(apply_overrides(saved, overrides))
    model = create_model(cfg, vit_weights=False)  # the checkpoint holds them
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        # torch's first line only names the class ("Error(s) in loading state_dict for
        # SAN:"); the next says which tensor and which shapes.
        first = " ".join(line.strip() for line in str(exc).splitlines()[:2]) or type(exc).__name__
        raise UserError(
            f"checkpoint {uri} does not fit the config (model.n_clusters="
            f"{cfg.model.n_clusters}, model.embed_dim={cfg.model.embed_dim}): {first[:400]}"
        ) from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), cfg, state


def target_run(state: dict, uri: str, cfg: Config) -> str:
    """The training run that wrote the checkpoint, or a new evaluation run."""
    from pipelines import tracking

    mlflow_client = tracking.client()
    run_id = state.get("mlflow_run_id")
    if run_id:
        try:
            mlflow_client.get_run(run_id)
            return run_id
        except Exception:  # written against another tracking server
            log.info("training run %s is not on this tracking server; creating one", run_id)
    run = mlflow_client.create_run(
        tracking.experiment_id(cfg.run.experiment),
        run_name=f"eval-{cfg.run.name}",
        tags={"san.evaluated_checkpoint": uri},
    )
    mlflow_client.set_terminated(run.info.run_id)
    return run.info.run_id


def register(model, run_id: str, name: str, alias: str, tags: dict[str, str]) -> dict:
    """Log the model into the run and register it as a version with an alias, the version
    tagged with `tags` (which checkpoint, which step, what it scored)."""
    import mlflow
    import mlflow.pytorch

    from pipelines.common import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    mlflow_client = mlflow.MlflowClient(tracking_uri())
    status = mlflow_client.get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model.cpu(),
            name="model",
            serialization_format="pickle",  # the model class is importable from san
            pip_requirements=["torch", "timm", "san-platform"],
        )
    # Leaving start_run closes the run as FINISHED: a sweep's KILLED trial, a FAILED run
    # or one still training keeps the status it had.
    if mlflow_client.get_run(run_id).info.status != status:
        mlflow_client.update_run(run_id, status=status)
    version = mlflow.register_model(info.model_uri, name)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version.version, key, value)
    mlflow_client.set_registered_model_alias(name, alias, version.version)
    return {"name": name, "version": int(version.version), "alias": alias}


def check_registry_names(name: str, alias: str) -> None:
    """MLflow's rules for a registered model's name and a version alias, checked before the
    evaluation: the registry refused them only after it, leaving a new version without
    its alias behind at every try."""
    if not name.strip() or "/" in name or ":" in name or name == "." or name.startswith(".."):
        raise UserError(
            f"--register {name!r}: a model name must be non-empty, without '/' or ':', and "
            "neither '.' nor starting with '..'"
        )
    if (
        not re.fullmatch(r"[\w\-]{1,255}", alias)
        or alias.lower() == "latest"
        or re.fullmatch(r"[vV]\d+", alias)
    ):
        raise UserError(
            f"--alias {alias!r}: an alias is letters, digits, '_' and '-' (at most 255), and "
            "not 'latest' or v<number> (MLflow keeps those for versions)"
        )


def evaluate(checkpoint: str, overrides: list[str], register_as: str | None, alias: str) -> dict:
    from pipelines import tracking
    from pipelines.common import check_tracking
    from pipelines.loop import run_evaluation
    from san.data import DataError

    check_tracking()  # else the evaluation runs first, and its result is lost
    model, cfg, state = load_model(checkpoint, overrides)
    step = int(state.get("step", 0))
    try:  # the data the checkpoint names (data.root may be relative to where it trained)
        evaluation = run_evaluation(model, cfg, next(model.parameters()).device)
    except DataError as exc:
        raise UserError(
            f"{exc}; pass data.root=... (and data.dataset=...) to evaluate on other data"
        ) from None
    if not evaluation.metrics:
        raise UserError(f"no labelled pixels in {cfg.data.dataset} split {cfg.data.val_split!r}")
    run_id = target_run(state, checkpoint, cfg)
    logger = tracking.RunLogger(run_id)
    logger.metrics({f"eval/{k}": v for k, v in evaluation.metrics.items()}, step)
    for name, data in evaluation.pictures.items():
        logger.artifact(data, f"eval/step_{step:07d}_{name}")
    logger.tag("eval.checkpoint_uri", checkpoint)
    logger.close(
        os.path.join(tempfile.gettempdir(), "san-mlflow-spill")
    )  # spills if MLflow is down
    # One record per checkpoint, as the pictures: evaluating another keeps this one.
    scores = {"checkpoint": checkpoint, "step": step, **evaluation.scores}
    tracking.log_json(run_id, scores, f"eval/step_{step:07d}_scores.json")
    result = {"mlflow_run_id": run_id, "checkpoint": checkpoint, "metrics": evaluation.metrics}
    if register_as:
        tags = {"checkpoint_uri": checkpoint, "step": str(step)}
        tags |= {f"eval.{k}": f"{v:.6g}" for k, v in evaluation.metrics.items()}
        result["registered"] = register(model, run_id, register_as, alias, tags)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint URI (path or s3://...)")
    parser.add_argument("--register", metavar="NAME", help="register the model under NAME")
    parser.add_argument(
        "--alias", default=None, help="alias for the registered version (default: champion)"
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. data.max_val_images=50"
    )
    args = parser.parse_args()
    if args.alias is not None and not args.register:
        raise UserError(f"--alias {args.alias} names a registered version: add --register NAME")
    alias = args.alias or "champion"
    if args.register:
        check_registry_names(args.register, alias)
    print_result(evaluate(args.checkpoint, args.overrides, args.register, alias))


if __name__ == "__main__":
    run_main(main)
