"""What every pipeline shares: CLI parsing, Ray start-up, MLflow and storage wiring.

This is the only layer where Ray and MLflow meet the `san` library.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python pipelines/x.py` puts pipelines/, not the root, on the path
    sys.path.insert(0, str(ROOT))

from pipelines.job_env import FORWARDED_ENV, SECRET_ENV  # noqa: E402
from san.config import Config, ConfigError, load_config  # noqa: E402
from san.storage import StorageError, check_storage, pyarrow_filesystem  # noqa: E402

log = logging.getLogger("san")

DEFAULT_TRACKING_DIR = ROOT / "outputs"
# The `stop_reason` a sweep's ASHA scheduler tags on a trial's MLflow run when it stops
# the trial (pipelines/tune.py); the trial's training loop watches for it.
STOPPED_BY_SCHEDULER = "early_stopped_asha"
CONFIG_DIR = ROOT / "pipelines" / "configs"


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


class RunError(Exception):
    """A run that started but failed for good (restarts used up); one line, exit code 1.

    The full traceback is in the log above it; this line names the root cause.
    """


def one_line(text: object, limit: int | None = None) -> str:
    """Collapse a message to one line (errors from Ray workers span many)."""
    return " ".join(str(text).split())[:limit]


def progress(done: int, total: int, seconds_per_item: float, width: int = 20) -> str:
    """`[########------------] 40% eta 0:01:32`, for the end of a log line.

    A bar redrawn in place (carriage return) would print a line per redraw once Ray
    streams a worker's output, or in a job's logs, so the bar is part of each line.
    """
    fraction = min(max(done / total, 0.0), 1.0) if total > 0 else 1.0
    filled = round(fraction * width)
    eta = round(max(total - done, 0) * max(seconds_per_item, 0.0))
    clock = f"{eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}"
    return f"[{'#' * filled}{'-' * (width - filled)}] {fraction:4.0%} eta {clock}"


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=str(CONFIG_DIR / "default.yaml"),
        help="YAML config file (default: pipelines/configs/default.yaml)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. model.n_clusters=27 optim.lr=3e-4; a relative data.root, "
        "data.shard_cache or run.storage is relative to the project root, wherever the "
        "command runs (workers "
        "run elsewhere), while --config is relative to the current directory",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return resolve_local_paths(load_config(args.config, args.overrides))


def resolve_local_paths(cfg: Config) -> Config:
    """Relative data.root and data.shard_cache -> under the project root (`resolve_storage`):
    workers run in another directory (Ray's session folder), where a relative cache would
    be a new, empty one for every job."""
    if cfg.data.root:
        cfg.data.root = resolve_storage(cfg.data.root)
    if cfg.data.shard_cache:
        cfg.data.shard_cache = resolve_storage(cfg.data.shard_cache)
    return cfg


def sqlite_database(uri: str) -> str | None:
    """The file of a sqlite:/// tracking URI (sqlite:////abs/db -> /abs/db); None for any
    other URI or an in-memory database."""
    database = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
    return database if database and database != ":memory:" else None


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the embedded default: a local SQLite database."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        database = sqlite_database(uri)
        if database and not os.path.isabs(database):
            # Absolute, as the workers get it: they run in Ray's session folder, where a
            # relative sqlite:///mlflow.db is another database.
            return f"sqlite:///{Path(database).resolve()}"
        return uri
    DEFAULT_TRACKING_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_TRACKING_DIR / 'mlflow.db'}"


def resolve_storage(url: str) -> str:
    """Relative local storage paths are relative to the project root, as absolute paths;
    ~ is the user's home (an override like run.storage=~/runs reaches us unexpanded). One
    place has one spelling, without a trailing "/": MLflow runs are found by it."""
    if "://" in url:
        scheme, path = url.split("://", 1)
        return f"{scheme}://{path.rstrip('/')}" if path.strip("/") else url
    path = Path(url).expanduser()
    return str(path if path.is_absolute() else (ROOT / path).resolve())


def worker_env() -> dict[str, str]:
    """Service endpoints (by name) for Ray workers' runtime env; secrets go by inheritance."""
    env = {
        name: os.environ[name]
        for name in FORWARDED_ENV
        if os.environ.get(name) and name not in SECRET_ENV
    }
    env["MLFLOW_TRACKING_URI"] = tracking_uri()
    env["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    # Ray Train's controller sees a worker group start, finish or fail at its next poll,
    # every 2 s by default: each run and each Tune trial ended up to 2 s late (4-5 s of a
    # 50 s tiny run here). A poll is a few RPCs; four a second cost nothing measurable.
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = os.environ.get(
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"
    )
    return env


def on_local_ray() -> bool:
    """Whether this process runs its own Ray (no RAY_ADDRESS, no `ray job submit`). Its CPUs
    and GPUs are fixed, so what does not fit waits forever; a cluster may autoscale."""
    return not os.environ.get("RAY_ADDRESS")


def check_local_gpus(run: Any, gpus: float) -> None:
    """run.use_gpu=true asks a GPU per worker: on a local Ray without them, one line
    instead of a worker group that waits forever."""
    if run.use_gpu == "true" and gpus < run.num_workers:
        raise UserError(
            f"run.use_gpu=true with run.num_workers={run.num_workers} needs a GPU per worker "
            f"but the local Ray has {gpus:g}; use run.use_gpu=auto"
        )


PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster when there is one (RAY_ADDRESS, `ray job submit`), else start locally."""
    import ray

    if ray.is_initialized():
        return
    env_vars = worker_env()
    runtime_env = {"env_vars": env_vars}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # Under `ray job submit` the job's runtime env (working_dir, env_vars) is merged with
        # this one; both carry the same variables, which Ray rejects as a conflict unless told
        # to let the driver's values win (they are the job's own values, read from os.environ).
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    # Ray's state API (which Train V2's placement-group cleaner uses to notice a finished or
    # killed run) looks for "the" local cluster and fails when a machine runs several; point
    # it at this one's dashboard, on a port chosen here so workers can know it up front.
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dashboard_port = probe.getsockname()[1]
    env_vars["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    # Nothing drains (preempts) the node of a local Ray, so Train's preemption watcher, an
    # actor per worker group, only costs a process start per run (1-2 s on a 2-core laptop)
    # and an error line from Ray about its constructor arguments.
    env_vars[PREEMPTION_WATCHER] = os.environ.get(PREEMPTION_WATCHER, "0")
    ray.init(num_cpus=num_cpus, runtime_env=runtime_env, dashboard_port=dashboard_port)


def check_services(cfg: Config) -> None:
    """Fail fast, before any worker starts, when storage or MLflow is unreachable."""
    storage = resolve_storage(cfg.run.storage)
    pyarrow_filesystem(storage)  # a scheme Ray can write to; StorageError is one line
    check_storage(storage)
    check_tracking()


def check_tracking() -> None:
    """Fail fast, before any work, when the MLflow server is unreachable: MLflow's own
    client retries for minutes, then raises a traceback."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"MLflow server {uri} is unreachable: {reason}") from None


def print_result(result: dict[str, Any]) -> None:
    """The last stdout line is one JSON object, for scripts and tests: a NaN or infinite
    number is null there (JSON has none; json.dumps wrote NaN, which strict parsers and
    jq refuse)."""
    sys.stdout.flush()
    print(json.dumps(_finite(result), default=float), flush=True)


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float (in dicts and lists) replaced by None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_main(main) -> None:
    """Run a pipeline's main with one-line errors for what the user can fix."""
    setup_logging()
    try:
        main()
    except (ConfigError, UserError, StorageError) as exc:  # StorageError: url, reach, rights
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except RunError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(1)


def timer() -> float:
    return time.perf_counter()
