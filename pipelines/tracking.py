"""MLflow wiring: one run per training job, resumed by run name; resilient logging.

Only the driver creates runs; only rank 0 of a training job logs into them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient

from pipelines.common import ROOT, STOPPED_BY_SCHEDULER, UserError, sqlite_database, tracking_uri
from pipelines.job_env import code_version, uncommitted_diff
from san.config import Config

log = logging.getLogger("san")

RUN_NAME_TAG = "san.run_name"
STORAGE_TAG = "san.storage"


def client() -> MlflowClient:
    return MlflowClient(tracking_uri())


def sqlite_artifact_root(uri: str) -> str | None:
    """`mlartifacts/` beside a SQLite tracking database, as a file URI; None otherwise
    (a server decides its own). MLflow's default would be ./mlruns of whichever
    directory the process runs in."""
    database = sqlite_database(uri)
    if database is None:
        return None
    return (Path(database).parent / "mlartifacts").resolve().as_uri()


def experiment_id(name: str) -> str:
    """The experiment's id, creating it (with a local artifact root for local SQLite)."""
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(
            name, artifact_location=sqlite_artifact_root(tracking_uri())
        )
    except mlflow.exceptions.MlflowException:  # created concurrently by another driver
        return mlflow_client.get_experiment_by_name(name).experiment_id


def _quoted(value: str) -> str:
    """`value` as a string in an MLflow search filter, in whichever quotes it does not
    hold (run.name holds neither: san.config; a storage path may hold an apostrophe)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UserError(f"{value!r} holds both kinds of quote, which MLflow cannot search for")


def find_run(cfg: Config, storage: str) -> str | None:
    """The run of an earlier job with the same name and storage (so a rerun resumes it)."""
    runs = client().search_runs(
        [experiment_id(cfg.run.experiment)],
        filter_string=f"tags.`{RUN_NAME_TAG}` = {_quoted(cfg.run.name)} "
        f"and tags.`{STORAGE_TAG}` = {_quoted(storage)}",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def system_tags() -> dict[str, str]:
    """The host and the versions of what computes a run's numbers."""
    from importlib.metadata import PackageNotFoundError, version

    import ray
    import torch

    packages = {}
    for name in ("numpy", "timm", "torchvision", "scipy", "pyarrow"):
        try:
            packages[f"sys.{name}"] = version(name)
        except PackageNotFoundError:
            packages[f"sys.{name}"] = "absent"
    return {
        "sys.python": platform.python_version(),
        "sys.torch": torch.__version__,
        **packages,
        "sys.ray": ray.__version__,
        "sys.mlflow": mlflow.__version__,
        "sys.host": platform.node(),
        "sys.platform": platform.platform(),
        "sys.cuda": str(torch.cuda.is_available()),
    }


MAX_DIFF_CHARS = 5_000_000


@dataclass(frozen=True)
class CodeSource:
    """What ran: the command line and the code's git state, recorded on each run so a
    number in the MLflow UI leads back to the code and command that produced it."""

    script: str  # relative to the project when it is in it
    command: str
    version: dict[str, str]  # pipelines.job_env.code_version()
    diff: str = ""  # uncommitted changes, logged as code/uncommitted.diff

    @classmethod
    def of_this_process(cls) -> CodeSource:
        script = Path(sys.argv[0]).resolve()
        if script.is_relative_to(ROOT):
            script = script.relative_to(ROOT)
        version = code_version()
        diff = uncommitted_diff() if version.get("dirty") == "true" else ""
        if len(diff) > MAX_DIFF_CHARS:  # say, a large tracked data file edited
            diff = diff[:MAX_DIFF_CHARS] + f"\n... (cut at {MAX_DIFF_CHARS} characters)\n"
        command = shlex.join(["python", str(script), *sys.argv[1:]])
        return cls(str(script), command, version, diff)

    def tags(self) -> dict[str, str]:
        """MLflow's own source tags (the UI shows the commit) and the full command."""
        tags = {
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": self.script,
            "san.command": self.command[:5000],
        }
        if "commit" in self.version:
            tags["mlflow.source.git.commit"] = self.version["commit"]
        if self.version.get("branch"):
            tags["mlflow.source.git.branch"] = self.version["branch"]
        if "dirty" in self.version:
            tags["san.git_dirty"] = self.version["dirty"]
        return tags


def start_run(
    cfg: Config,
    storage: str,
    parent_run_id: str | None = None,
    source: CodeSource | None = None,
) -> tuple[str, bool]:
    """Create the job's run, or reopen the one with the same name; returns (run_id, resumed).

    `source` (what ran) is tagged on a new run; a resume under other code or another
    command adds what differs to the `san.resume_changed` tag, beside changed params.
    """
    mlflow_client = client()
    run_id = find_run(cfg, storage)
    params = {k: "null" if v is None else str(v) for k, v in cfg.flat().items()}
    code_tags = source.tags() if source else {}
    if run_id is not None:
        mlflow_client.update_run(run_id, status="RUNNING")
        old_run = mlflow_client.get_run(run_id).data
        old = old_run.params
        changed = {k: v for k, v in params.items() if k in old and old[k] != v}
        for key in ("mlflow.source.git.commit", "san.git_dirty", "san.command"):
            if key in code_tags and old_run.tags.get(key, "") != code_tags[key]:
                changed[key] = code_tags[key]
        fresh = [mlflow.entities.Param(k, v) for k, v in params.items() if k not in old]
        if fresh:
            mlflow_client.log_batch(run_id, params=fresh)
        if changed:
            # Params (and the code tags) stay as the run first started, as MLflow's params
            # cannot change: the tag holds what differs from them at the latest resume, and
            # each resume's differences stay in an artifact of their own.
            mlflow_client.set_tag(run_id, "san.resume_changed", json.dumps(changed)[:4900])
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            record = json.dumps(changed, indent=1).encode()
            _log_bytes(mlflow_client, run_id, record, f"resumes/{stamp}.json")
        return run_id, True
    tags = {RUN_NAME_TAG: cfg.run.name, STORAGE_TAG: storage, **system_tags(), **code_tags}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(
        experiment_id(cfg.run.experiment), run_name=cfg.run.name, tags=tags
    )
    items = [mlflow.entities.Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 90):
        mlflow_client.log_batch(run.info.run_id, params=items[i : i + 90])
    if source and source.diff:
        _log_bytes(mlflow_client, run.info.run_id, source.diff.encode(), "code/uncommitted.diff")
    return run.info.run_id, False


def fail_fast_http() -> None:
    """Make MLflow HTTP calls in this process give up in seconds, not minutes.

    MLflow's defaults retry a refused connection for minutes, which would freeze training
    during an outage; callers here buffer and retry later instead. Values the user set win.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def end_run(run_id: str, status: str) -> None:
    # With an MLflow server, set_terminated writes the run's URL to stdout. Pipelines keep
    # stdout for their one-line JSON result, and Ray forwards a worker's stdout to the
    # driver late: a trial's URL line landed after a sweep's JSON (seen in CI). The run id
    # is in the result and the logs anyway. A value the user set wins.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    client().set_terminated(run_id, status=status)


class RunLogger:
    """Logs metrics and artifacts to one run; never lets an MLflow outage stop training.

    Failed calls are kept in memory and retried on a later call (at most every
    `RETRY_INTERVAL_S` during an outage, so training does not wait on timeouts); a clear
    warning is printed once per outage; what is still unsent at `close()` is written as
    JSON lines to a local spill file so nothing is lost.
    """

    RETRY_INTERVAL_S = 10.0

    def __init__(self, run_id: str, uri: str | None = None) -> None:
        fail_fast_http()
        self.run_id = run_id
        self.client = MlflowClient(uri or tracking_uri())
        self.pending_metrics: list[Metric] = []
        self.pending_artifacts: list[tuple[bytes, str]] = []
        self.pending_tags: dict[str, str] = {}
        self.failing = False
        self.last_failure = 0.0

    def metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending_metrics += [Metric(k, float(v), now, step) for k, v in values.items()]
        self.flush()

    def artifact(self, data: bytes, path: str) -> None:
        self.pending_artifacts.append((data, path))
        self.flush()

    def tag(self, key: str, value: str) -> None:
        """Tags are kept as the latest value; one lost during an outage is re-sent on flush."""
        self.pending_tags[key] = value
        self.flush()

    def stopped_by_scheduler(self) -> bool:
        """True once a sweep's scheduler has stopped this run (it tags `stop_reason`).

        Tune kills a stopped trial some seconds after its decision; checked at each
        checkpoint, this lets the trial stop at once instead of training (and logging) on
        until then. False while MLflow is failing: an outage must not stop training.
        """
        if self.failing:
            return False
        try:
            tags = self.client.get_run(self.run_id).data.tags
        except Exception:
            return False
        return tags.get("stop_reason") == STOPPED_BY_SCHEDULER

    def flush(self, force: bool = False) -> bool:
        if self.failing and not force:
            if time.monotonic() - self.last_failure < self.RETRY_INTERVAL_S:
                return False

        def send() -> None:
            while self.pending_tags:
                key = next(iter(self.pending_tags))
                self.client.set_tag(self.run_id, key, self.pending_tags[key])
                del self.pending_tags[key]
            while self.pending_metrics:
                batch = self.pending_metrics[:500]
                self.client.log_batch(self.run_id, metrics=batch)
                del self.pending_metrics[: len(batch)]
            while self.pending_artifacts:
                data, path = self.pending_artifacts[0]
                _log_bytes(self.client, self.run_id, data, path)
                self.pending_artifacts.pop(0)

        return self._call(send)

    def _call(self, fn) -> bool:
        try:
            fn()
        except Exception as exc:  # any outage: connection, 5xx, storage
            if not self.failing:
                log.warning(
                    "MLflow is unreachable (%s); training continues and results are buffered",
                    str(exc).splitlines()[0][:200],
                )
            self.failing = True
            self.last_failure = time.monotonic()
            return False
        if self.failing:
            log.warning("MLflow is reachable again; buffered results were sent")
        self.failing = False
        return True

    def close(self, spill_dir: str | Path) -> Path | None:
        """Final flush; if MLflow is still down, spill what is left to a JSONL file."""
        if self.flush(force=True):
            return None
        spill = Path(spill_dir) / f"mlflow-unsent-{self.run_id}.jsonl"
        spill.parent.mkdir(parents=True, exist_ok=True)
        with spill.open("a") as handle:
            for m in self.pending_metrics:
                handle.write(json.dumps({"key": m.key, "value": m.value, "step": m.step}) + "\n")
            for key, value in self.pending_tags.items():
                handle.write(json.dumps({"tag": key, "value": value}) + "\n")
        for data, path in self.pending_artifacts:
            target = spill.parent / "mlflow-unsent-artifacts" / self.run_id / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        log.warning("MLflow stayed unreachable; unsent results were written to %s", spill)
        return spill


def _log_bytes(mlflow_client: MlflowClient, run_id: str, data: bytes, path: str) -> None:
    directory, name = os.path.split(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name
        local.write_bytes(data)
        mlflow_client.log_artifact(run_id, str(local), artifact_path=directory or None)


def log_json(run_id: str, data: Any, path: str) -> None:
    buffer = io.StringIO()
    json.dump(data, buffer, indent=2, default=str)
    _log_bytes(client(), run_id, buffer.getvalue().encode(), path)


__all__ = [
    "CodeSource",
    "RunLogger",
    "start_run",
    "end_run",
    "find_run",
    "experiment_id",
    "RunStatus",
]
