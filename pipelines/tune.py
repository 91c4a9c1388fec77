"""Sweep SAN hyperparameters with Ray Tune; one MLflow parent run, one child run per trial.

    python pipelines/tune.py --space tune_spaces/quick.yaml [--config FILE] [k=v ...]
        [--num-samples N] [--resume] [--num-cpus N]
    ray job submit --working-dir . -- python pipelines/tune.py --space tune_spaces/san_paper.yaml \
        run.use_gpu=true

Each trial runs the same `TorchTrainer` as `pipelines/train.py` (built by `build_trainer`)
inside a Tune function trainable; `SweepReportCallback` forwards every evaluation report
(Hungarian mIoU on the validation split) to Tune so ASHA can stop weak trials early.
The sweep lives under <run.storage>/<space>-<run.name> (local or s3://); `--resume`
continues it there, keeping finished trials. The last stdout line is one JSON object:
{"parent_run_id", "best_config", "metric", "best_metric", "checkpoint", ...}.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray.tune.integration.ray_train import TuneReportCallback  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, TrialScheduler  # noqa: E402

from pipelines.common import (  # noqa: E402
    CONFIG_DIR,
    ROOT,
    STOPPED_BY_SCHEDULER,
    UserError,
    check_local_gpus,
    check_services,
    init_ray,
    on_local_ray,
    one_line,
    print_result,
    resolve_local_paths,
    resolve_storage,
    run_main,
    setup_logging,
)
from pipelines.spaces import (  # noqa: E402
    Space,
    apply_values,
    check_against_config,
    check_class_metric,
    check_metric,
    check_models,
    load_space,
    trial_overrides,
)
from san.config import Config, apply_overrides, from_dict, load_config  # noqa: E402

log = logging.getLogger("san")

STOP_COMPLETED = "completed"
STOP_EARLY = STOPPED_BY_SCHEDULER
STOP_ERROR = "error"
STOP_UNFINISHED = "unfinished"


def sweep_config(space: Space, config_path: str | None, overrides: list[str]) -> Config:
    """Base config of every trial: config file, then the space's fixed config, then CLI."""
    path = config_path or (str(ROOT / space.base_config) if space.base_config else None)
    base = load_config(path or CONFIG_DIR / "default.yaml")
    values = apply_values(base.to_dict(), space.config)
    if not overrides:
        check_against_config(space, values)  # the space's own entries, one line on failure
    cfg = resolve_local_paths(from_dict(apply_overrides(values, overrides)))
    if overrides:  # they win over the space's config; trials sample the params on top
        check_against_config(space, cfg.to_dict(), overrides)
    check_metric(space, cfg)
    check_models(space, cfg)
    if space.metric in ("miou", "pixel_accuracy") and space.searches_cluster_count():
        log.warning(
            "the space searches model.n_clusters with metric %s, whose many-to-one matching "
            "(K > classes) scores more clusters higher; metric: miou_one_to_one compares K",
            space.metric,
        )
    return cfg


def sweep_name(space: Space, cfg: Config) -> str:
    # Deterministic (no timestamp) so `--resume` finds the same Tune experiment and MLflow run.
    return f"{space.name}-{cfg.run.name}"


def trial_config(base: dict, space: Space, sampled: dict, name: str, trial_id: str) -> Config:
    values = apply_values(base, trial_overrides(space, sampled))
    values["run"]["name"] = f"{name}-{trial_id}"
    return from_dict(values)


def trial_storage(storage: str, name: str) -> str:
    from san.storage import join

    return join(storage, name, "train")


def run_trial(sampled: dict, sweep: dict) -> None:
    """One Tune trial: a Ray Train run of pipelines/loop.py, nested under the sweep's run."""
    import ray.tune

    from pipelines import tracking
    from pipelines.train import build_trainer

    setup_logging()  # this runs in a Tune actor: its log lines reach the sweep's terminal
    space: Space = sweep["space"]
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(sweep["base"], space, sampled, sweep["name"], trial_id)
    storage = trial_storage(sweep["storage"], sweep["name"])
    finished = finished_trial_result(cfg, storage, space.metric)
    if finished is not None:
        # An earlier attempt of this trial finished, but the sweep was interrupted before
        # Tune recorded it: hand Tune that result instead of reopening the finished run.
        log.info("trial %s finished in an earlier attempt: reporting its result", trial_id)
        ray.tune.report(finished)
        return
    run_id, resumed = tracking.start_run(
        cfg, storage, parent_run_id=sweep["parent_run_id"], source=sweep["source"]
    )
    mlflow_client = tracking.client()
    mlflow_client.set_tag(run_id, "san.trial_id", trial_id)
    mlflow_client.set_tag(run_id, "san.sweep", sweep["name"])
    for key, value in sampled.items():  # group labels are not config params
        if "." not in key:
            mlflow_client.set_tag(run_id, f"san.group.{key}", str(value))
    trainer = build_trainer(
        cfg, storage, run_id, callbacks=[SweepReportCallback(space.metric)], sweep_trial=True
    )

    def stopped_early() -> bool:
        # The scheduler's callback (RecordingASHA) tagged the run and closed it as KILLED;
        # the trial then ends by its loop stopping or by Tune killing it, and must not
        # make that FAILED or FINISHED.
        return mlflow_client.get_run(run_id).data.tags.get("stop_reason") == STOP_EARLY

    try:
        trainer.fit()
    except BaseException:
        if not stopped_early():
            tracking.end_run(run_id, "FAILED")
        raise
    if stopped_early():
        return
    mlflow_client.set_tag(run_id, "stop_reason", STOP_COMPLETED)
    tracking.end_run(run_id, "FINISHED")


def finished_trial_result(cfg: Config, storage: str, metric: str) -> dict[str, Any] | None:
    """The final result of a trial whose MLflow run an earlier attempt closed as completed,
    with a complete checkpoint at its last step; None when the trial still has work to do.

    The metrics are those the checkpoint was reported with (older checkpoints: the run's
    latest in MLflow), with the sweep's `metric` as NaN where they lack it, as
    `SweepReportCallback` reports it."""
    from pipelines import tracking
    from pipelines.loop import checkpoint_name
    from san.storage import CheckpointError, join, load_checkpoint

    run_id = tracking.find_run(cfg, storage)
    if run_id is None:
        return None
    run = tracking.client().get_run(run_id)
    if run.info.status != "FINISHED" or run.data.tags.get("stop_reason") != STOP_COMPLETED:
        return None
    step = cfg.optim.max_steps
    checkpoint = join(storage, cfg.run.name, checkpoint_name(step))
    try:
        state, _ = load_checkpoint(checkpoint)
    except CheckpointError:
        return None
    reported = state.get("metrics") or run.data.metrics
    return {metric: float("nan"), **reported, "step": step, "checkpoint_path": checkpoint}


class SweepReportCallback(TuneReportCallback):
    """Forwards each evaluation report to Tune, with the sweep's metric as NaN where the
    report has none: an iou/<class> metric whose class is absent from the evaluated images
    (neither labelled nor predicted). Tune fails the whole sweep at a report without its
    metric; ASHA and the summary pass NaN over."""

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        filled = [{self.metric: float("nan"), **m} for m in metrics]
        super().after_report(run_context, filled, checkpoint)


class RecordingASHA(ASHAScheduler):
    """ASHA that records its stop decisions on the trial's MLflow run as they happen, and
    that a resumed sweep starts with the evaluations its trials made before the interrupt.

    A stopped trial's actor is killed, so nothing inside it can close its run; and a trial
    cut short by an interrupted sweep looks the same to Tune, so this tag is also how the
    summary (and a resumed sweep) tells an early stop from an interruption.

    Tune checkpoints trials and the searcher, not the scheduler: a resumed sweep gets this
    object as `build_tuner` made it, rungs empty. Its trials would then be compared with
    none of the results the sweep had (no loser stopped at a rung passed before the
    interrupt), and a resumed trial again at rungs it had passed. `on_trial_add` puts each
    restored trial's judged evaluations back (`restore_trial`).
    """

    def __init__(self, sweep: dict, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sweep = sweep

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        # Tune's own record of the trial: a new one has not reported; a restored one
        # (finished, stopped or cut short) keeps the last result Tune processed.
        reported = trial.run_metadata.last_result.get("step")
        if reported:
            self.restore_trial(trial, int(reported))

    def trial_config(self, trial) -> Config:
        space = self.sweep["space"]
        sampled = {p.key: trial.config.get(p.key) for p in space.params}
        return trial_config(self.sweep["base"], space, sampled, self.sweep["name"], trial.trial_id)

    def restore_trial(self, trial, reported_step: int) -> int:
        """Record in ASHA's rungs what `trial` reported up to `reported_step`, read back
        from its MLflow run: the sweep's metric at its evaluation steps (the ones it reports
        to Tune at); the last value logged at a step, as a re-evaluation after an earlier
        resume replaces the first. Returns how many evaluations."""
        from pipelines import tracking

        cfg = self.trial_config(trial)
        every, last = cfg.run.checkpoint_every, cfg.optim.max_steps
        try:
            run_id = tracking.find_run(
                cfg, trial_storage(self.sweep["storage"], self.sweep["name"])
            )
            history = tracking.client().get_metric_history(run_id, self._metric) if run_id else []
        except Exception as exc:  # tracking must never break the sweep
            log.warning(
                "ASHA: trial %s's earlier evaluations are unreadable (%s); it is judged on its "
                "new ones only",
                trial.trial_id,
                one_line(exc, 200),
            )
            return 0
        values = {}
        for point in sorted(history, key=lambda m: m.timestamp):
            if point.step <= reported_step and (point.step % every == 0 or point.step == last):
                values[point.step] = point.value
        bracket = self._trial_info[trial.trial_id]
        for step in sorted(values):
            bracket.on_result(trial, step, self._metric_op * values[step])
        log.info(
            "ASHA: trial %s's %d evaluations to step %d back in its rungs",
            trial.trial_id,
            len(values),
            reported_step,
        )
        return len(values)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision != TrialScheduler.STOP:
            return decision
        cfg = self.trial_config(trial)
        if result.get("step", 0) >= cfg.optim.max_steps:
            # Finished (ASHA says STOP at max_t): it ends by itself and closes its MLflow run
            # as completed. Stopped, Tune killed it first, and the run showed RUNNING until
            # the sweep ended.
            return TrialScheduler.CONTINUE
        self._record_stop(trial, cfg, result)
        return decision

    def _record_stop(self, trial, cfg: Config, result: dict) -> None:
        from pipelines import tracking

        try:
            run_id = tracking.find_run(
                cfg, trial_storage(self.sweep["storage"], self.sweep["name"])
            )
            if run_id:
                mlflow_client = tracking.client()
                mlflow_client.set_tag(run_id, "stop_reason", STOP_EARLY)
                mlflow_client.set_tag(run_id, "san.stopped_at_step", str(result.get("step")))
                tracking.end_run(run_id, "KILLED")
        except Exception as exc:  # tracking must never break the sweep
            log.warning("could not record the ASHA stop of trial %s: %s", trial.trial_id, exc)


def tune_param_space(space: Space) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for p in space.params:
        if p.kind == "choice":
            out[p.key] = tune.choice(p.values)
        elif p.kind == "grid":
            out[p.key] = tune.grid_search(p.values)
        elif p.kind == "uniform":
            out[p.key] = tune.uniform(p.low, p.high)
        elif p.kind == "loguniform":
            out[p.key] = tune.loguniform(p.low, p.high)
        else:  # randint: the file's bounds are inclusive, Tune's upper bound is not
            out[p.key] = tune.randint(int(p.low), int(p.high) + 1)
    return out


def build_scheduler(space: Space, cfg: Config, sweep: dict):
    """ASHA with its rungs in training steps; `grace_period` counts evaluations, one every
    `run.checkpoint_every` steps.

    Not in Tune's `training_iteration`: a trial that goes on from a checkpoint (after
    `--resume`) starts counting iterations at 1 again, and would be compared at the first
    rung with other trials' first evaluations."""
    from ray.tune.schedulers import FIFOScheduler

    if space.scheduler != "asha":
        return FIFOScheduler()
    grace_steps = space.grace_period * cfg.run.checkpoint_every
    return RecordingASHA(
        sweep,
        time_attr="step",
        max_t=max(cfg.optim.max_steps, grace_steps),
        grace_period=grace_steps,
        reduction_factor=space.reduction_factor,
    )


def build_tuner(space: Space, cfg: Config, storage: str, sweep: dict, num_samples: int):
    from ray import tune

    from san.storage import pyarrow_filesystem

    scheduler = build_scheduler(space, cfg, sweep)
    if space.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=space.seed)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores max_concurrent_trials for a generator instance: give it here.
        search_alg = BasicVariantGenerator(
            max_concurrent=space.max_concurrent, random_state=space.seed
        )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=sweep), {"cpu": space.trial_cpus}
    )
    filesystem, path = pyarrow_filesystem(storage)
    return tune.Tuner(
        trainable,
        param_space=tune_param_space(space),
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=num_samples,
            max_concurrent_trials=space.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=sweep["name"], storage_path=path, storage_filesystem=filesystem
        ),
    ), trainable


def experiment_location(storage: str, name: str) -> tuple[Any, str]:
    from san.storage import join, pyarrow_filesystem

    return pyarrow_filesystem(join(storage, name))


def summarize(results, space: Space, sweep: dict, storage: str) -> list[dict[str, Any]]:
    """One row per trial: its sampled values, final metric, steps run, stop reason, run ids."""
    from pipelines import tracking
    from san.storage import join

    mlflow_client = tracking.client()
    rows = []
    # Trial status (finished, errored, or cut off by an interrupt) is only on the Trial objects.
    for trial in results._experiment_analysis.trials:
        metrics = trial.last_result or {}
        sampled = {p.key: trial.config.get(p.key) for p in space.params}
        cfg = trial_config(sweep["base"], space, sampled, sweep["name"], trial.trial_id)
        steps = int(metrics.get("step", 0) or 0)
        runs = trial_storage(storage, sweep["name"])
        child = tracking.find_run(cfg, runs) or ""
        tags = mlflow_client.get_run(child).data.tags if child else {}
        if trial.status == "ERROR":
            reason = STOP_ERROR
        elif trial.status == "TERMINATED" and steps >= cfg.optim.max_steps:
            reason = STOP_COMPLETED
        elif trial.status == "TERMINATED" and tags.get("stop_reason") == STOP_EARLY:
            reason = STOP_EARLY
        else:  # still pending or running, or cut short by an interrupt
            reason = STOP_UNFINISHED
        checkpoint = metrics.get("checkpoint_path")
        uri = join(runs, cfg.run.name, os.path.basename(checkpoint)) if checkpoint else ""
        rows.append(
            {
                "trial_id": trial.trial_id,
                "child_run_id": child,
                "stop_reason": reason,
                "steps": steps,
                "max_steps": cfg.optim.max_steps,
                "reports": int(metrics.get("training_iteration", 0) or 0),
                **sampled,
                space.metric: metrics.get(space.metric, float("nan")),
                "checkpoint_uri": uri,
            }
        )
    return rows


def finalize_children(rows: list[dict[str, Any]]) -> None:
    """Record each child's stop reason and checkpoint; close runs a stopped trial left open."""
    from pipelines import tracking

    mlflow_client = tracking.client()
    status = {STOP_COMPLETED: "FINISHED", STOP_EARLY: "KILLED", STOP_ERROR: "FAILED"}
    for row in rows:
        if not row["child_run_id"] or row["stop_reason"] == STOP_UNFINISHED:
            continue
        mlflow_client.set_tag(row["child_run_id"], "stop_reason", row["stop_reason"])
        if row["checkpoint_uri"]:
            mlflow_client.set_tag(row["child_run_id"], "checkpoint_uri", row["checkpoint_uri"])
        mlflow_client.set_tag(row["child_run_id"], "san.steps_run", str(row["steps"]))
        # Set only a status that is not already right, so a resumed sweep leaves kept trials'
        # runs untouched. It can be wrong: Tune kills a trial ASHA stops, and one killed as
        # it finished has closed its own run as FAILED.
        if mlflow_client.get_run(row["child_run_id"]).info.status != status[row["stop_reason"]]:
            tracking.end_run(row["child_run_id"], status[row["stop_reason"]])


def drop_checkpoints_after_stop(rows: list[dict[str, Any]]) -> list[str]:
    """Delete what early-stopped trials saved after the checkpoint their result names;
    return the deleted URIs.

    ASHA decides on a trial's result while the trial trains on. It may save (and upload)
    the next checkpoint before Tune kills it, and before Ray Train records that checkpoint.
    Ray therefore never applies run.keep_checkpoints to it, and nothing names it: not
    Tune's result, not the MLflow run's checkpoint_uri tag, and not trials.csv. Deleting it,
    and any half-uploaded folder, leaves the trial with the checkpoints Ray recorded.
    """
    from san import storage

    deleted = []
    for row in rows:
        if row["stop_reason"] != STOP_EARLY or not row["checkpoint_uri"]:
            continue
        run_dir, kept = os.path.split(row["checkpoint_uri"].rstrip("/"))
        try:
            names = storage.list_dir(run_dir)
        except FileNotFoundError:
            continue
        for name in storage.checkpoint_names(names):
            if storage.checkpoint_step(name) > storage.checkpoint_step(kept):
                storage.remove(storage.join(run_dir, name), recursive=True)
                deleted.append(storage.join(run_dir, name))
    return deleted


def results_csv(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def metric_plot(rows: list[dict[str, Any]], space: Space) -> bytes:
    """Final metric against each searched parameter; early-stopped trials drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(space.params)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2), squeeze=False)
    for ax, param in zip(axes[0], space.params, strict=True):
        categorical = param.kind in ("choice", "grid")
        labels = [str(v) for v in param.values] if categorical else []
        for row in rows:
            value = row.get(param.key)
            y = row.get(space.metric)
            if value is None or y is None or (isinstance(y, float) and math.isnan(y)):
                continue
            x = labels.index(str(value)) if categorical and str(value) in labels else value
            full = row["stop_reason"] == STOP_COMPLETED
            ax.scatter([x], [y], s=40, c="C0" if full else "none", edgecolors="C0")
        if categorical:
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        if param.kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(param.key)
        ax.set_ylabel(space.metric)
        ax.grid(alpha=0.3)
    fig.suptitle("filled: ran to the end; hollow: stopped early", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def best_row(rows: list[dict[str, Any]], space: Space) -> dict[str, Any] | None:
    scored = [
        r
        for r in rows
        if isinstance(r.get(space.metric), int | float) and not math.isnan(r[space.metric])
    ]
    if not scored:
        return None
    pick = max if space.mode == "max" else min
    return pick(scored, key=lambda r: r[space.metric])


def concurrency_that_fits(space: Space, cfg: Config, have: dict[str, float]) -> int:
    """How many trials a local Ray with resources `have` can run at once without a deadlock.

    Tune reserves only a trial's driver (resources.trial_cpus); its training workers ask
    for their CPUs later. When the drivers of search.max_concurrent trials take every CPU,
    no worker group can start and every trial waits forever. On a local Ray the CPU count
    is fixed, so cap the concurrency at what fits (a cluster may autoscale; left alone).
    A trial asking for GPUs the local Ray lacks would wait forever too: one line.
    """
    run = cfg.run
    check_local_gpus(run, have.get("GPU", 0))
    cluster_cpus = have.get("CPU", 0.0)
    need = space.trial_cpus + run.num_workers * run.cpus_per_worker
    if need > cluster_cpus:
        raise UserError(
            f"one trial needs {need:g} CPUs (resources.trial_cpus={space.trial_cpus:g} + "
            f"run.num_workers={run.num_workers} x run.cpus_per_worker={run.cpus_per_worker}) "
            f"but the local Ray has {cluster_cpus:g}; lower them or pass --num-cpus"
        )
    fits = int(cluster_cpus // need)  # need > 0: spaces refuse resources.trial_cpus <= 0
    if fits < space.max_concurrent:
        log.warning(
            "search.max_concurrent=%d trials need %g CPUs but the local Ray has %g: "
            "running %d at a time",
            space.max_concurrent,
            space.max_concurrent * need,
            cluster_cpus,
            fits,
        )
        return fits
    return space.max_concurrent


def sweep_num_samples(
    space: Space, parent_cfg: Config, storage: str, asked: int | None, resume: bool
) -> int:
    """--num-samples, else the space's; on --resume, what the sweep started with.

    Tune restores a sweep with its original sample count whatever is asked: a different
    count made the sweep compare its trials with a number it could never reach, and end
    KILLED ("rerun with --resume") on every resume.
    """
    from pipelines import tracking

    if not resume:
        return asked or space.num_samples
    run_id = tracking.find_run(parent_cfg, storage)
    params = tracking.client().get_run(run_id).data.params if run_id else {}
    started = params.get("sweep.num_samples")
    if started is None:  # its MLflow run is elsewhere: Tune alone knows
        return asked or space.num_samples
    if asked is not None and asked != int(started):
        raise UserError(
            f"sweep {parent_cfg.run.name!r} was started with --num-samples {started}; "
            f"resume it with that (or without --num-samples), not {asked}"
        )
    return int(started)


def run_sweep(
    space: Space, cfg: Config, num_samples: int | None, resume: bool, num_cpus: int | None
):
    """Create or resume the sweep, run it, record it in MLflow; return the result summary.
    `num_samples`: --num-samples (None: the space's, or on resume the sweep's own)."""
    from pyarrow import fs as pafs
    from ray import tune

    from pipelines import tracking
    from pipelines.loop import eval_class_names
    from pipelines.train import preflight_data

    started = time.perf_counter()
    storage = resolve_storage(cfg.run.storage)
    name = sweep_name(space, cfg)
    preflight_data(cfg)  # else a missing folder fails in every trial, after Ray's restarts
    check_class_metric(space, eval_class_names(cfg))
    check_services(cfg)
    filesystem, exp_path = experiment_location(storage, name)
    exists = filesystem.get_file_info(exp_path).type != pafs.FileType.NotFound
    if exists and not resume:
        raise UserError(
            f"sweep {name!r} already exists under {storage}; pass --resume to continue it "
            "or set run.name=... for a new sweep"
        )
    if resume and not exists:
        raise UserError(f"no sweep {name!r} under {storage} to resume")
    parent_cfg = from_dict({**cfg.to_dict(), "run": {**cfg.to_dict()["run"], "name": name}})
    num_samples = sweep_num_samples(space, parent_cfg, storage, num_samples, resume)
    init_ray(num_cpus)
    if on_local_ray():
        import ray

        fits = concurrency_that_fits(space, cfg, ray.cluster_resources())
        space = dataclasses.replace(space, max_concurrent=fits)
    source = tracking.CodeSource.of_this_process()
    parent_run_id, reopened = tracking.start_run(parent_cfg, storage, source=source)
    mlflow_client = tracking.client()
    if not reopened:
        summary = {**space.summary(), "sweep.num_samples": str(num_samples)}
        items = [tracking.mlflow.entities.Param(k, v) for k, v in summary.items()]
        for i in range(0, len(items), 90):
            mlflow_client.log_batch(parent_run_id, params=items[i : i + 90])
        mlflow_client.set_tag(parent_run_id, "san.kind", "sweep")
        tracking.log_json(
            parent_run_id, {p.key: p.describe() for p in space.params}, "search_space.json"
        )
    log.info(
        "%s sweep %s (MLflow run %s)", "resuming" if resume else "starting", name, parent_run_id
    )
    sweep = {
        "space": space,
        "base": cfg.to_dict(),
        "name": name,
        "storage": storage,
        "parent_run_id": parent_run_id,
        "source": dataclasses.replace(source, diff=""),  # the diff is on the sweep's run
    }
    tuner, trainable = build_tuner(space, cfg, storage, sweep, num_samples)
    if resume:
        tuner = tune.Tuner.restore(
            exp_path, trainable, resume_errored=True, storage_filesystem=filesystem
        )
    try:
        results = tuner.fit()
    except BaseException:
        tracking.end_run(parent_run_id, "FAILED")
        raise
    rows = summarize(results, space, sweep, storage)
    finalize_children(rows)
    for uri in drop_checkpoints_after_stop(rows):
        log.info("deleted %s: saved after ASHA stopped its trial, and recorded nowhere", uri)
    unfinished = [r for r in rows if r["stop_reason"] == STOP_UNFINISHED]
    if unfinished or len(rows) < num_samples_total(space, num_samples):
        tracking.end_run(parent_run_id, "KILLED")
        raise UserError(
            f"sweep {name!r} was interrupted with {len(unfinished)} unfinished trials; "
            "rerun with --resume to continue it"
        )
    steps_run = sum(r["steps"] for r in rows)
    steps_full = sum(r["max_steps"] for r in rows)
    best = best_row(rows, space)
    wall = time.perf_counter() - started
    metrics = {
        "n_trials": len(rows),
        "n_completed": sum(r["stop_reason"] == STOP_COMPLETED for r in rows),
        "n_early_stopped": sum(r["stop_reason"] == STOP_EARLY for r in rows),
        "n_errored": sum(r["stop_reason"] == STOP_ERROR for r in rows),
        "trial_steps_run": steps_run,
        "trial_steps_full": steps_full,
        "compute_ratio": steps_run / max(steps_full, 1),
        "wall_time_s": wall,
    }
    best_config = {p.key: best[p.key] for p in space.params} if best else {}
    if best:
        metrics[f"best_{space.metric}"] = best[space.metric]
        mlflow_client.set_tag(parent_run_id, "best_trial_id", best["trial_id"])
        mlflow_client.set_tag(parent_run_id, "best_child_run_id", best["child_run_id"])
        mlflow_client.set_tag(parent_run_id, "best_checkpoint_uri", best["checkpoint_uri"])
        mlflow_client.set_tag(parent_run_id, "best_config", json.dumps(best_config)[:4900])
    for key, value in metrics.items():
        mlflow_client.log_metric(parent_run_id, key, float(value))
    from pipelines.tracking import _log_bytes

    _log_bytes(mlflow_client, parent_run_id, results_csv(rows), "results/trials.csv")
    _log_bytes(mlflow_client, parent_run_id, metric_plot(rows, space), "plots/metric_vs_params.png")
    tracking.end_run(parent_run_id, "FINISHED" if best else "FAILED")
    if best is None:
        raise UserError(f"sweep {name!r} finished without any trial reporting {space.metric!r}")
    log.info(
        "best %s %.4f (trial %s); ran %d of %d trial-steps (%.0f%%) in %.0fs",
        space.metric,
        best[space.metric],
        best["trial_id"],
        steps_run,
        steps_full,
        100 * metrics["compute_ratio"],
        wall,
    )
    return {
        "parent_run_id": parent_run_id,
        "sweep": name,
        "best_trial_id": best["trial_id"],
        "best_child_run_id": best["child_run_id"],
        "best_config": best_config,
        "metric": space.metric,
        "best_metric": best[space.metric],
        "checkpoint": best["checkpoint_uri"],
        **{k: metrics[k] for k in ("n_trials", "n_early_stopped", "compute_ratio")},
        "trial_steps_run": steps_run,
        "trial_steps_full": steps_full,
        "wall_time_s": round(wall, 1),
    }


def num_samples_total(space: Space, num_samples: int) -> int:
    """How many trials a complete sweep has: grid points times samples."""
    total = num_samples
    for param in space.params:
        if param.kind == "grid":
            total *= len(param.values)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", required=True, help="search space, e.g. tune_spaces/quick.yaml")
    parser.add_argument("--config", default=None, help="base config (default: the space's)")
    parser.add_argument("--num-samples", type=int, default=None, help="override search.num_samples")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="logical CPUs of a local Ray (no cluster)"
    )
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optim.lr=3e-4")
    args = parser.parse_args()
    space = load_space(args.space)
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples={args.num_samples} must be >= 1")
    cfg = sweep_config(space, args.config, args.overrides)
    print_result(run_sweep(space, cfg, args.num_samples, args.resume, args.num_cpus))


if __name__ == "__main__":
    run_main(main)
