"""Local MLflow tracking: artifacts go beside the SQLite database they belong to."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.job_env import code_version, uncommitted_diff
from san.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_artifact_root_is_beside_a_sqlite_database(tmp_path: Path) -> None:
    root = tracking.sqlite_artifact_root
    assert root(f"sqlite:///{tmp_path}/db/mlflow.db") == (tmp_path / "db/mlartifacts").as_uri()
    assert root("sqlite:///:memory:") is None
    assert root("http://127.0.0.1:5000") is None


def test_run_artifacts_land_beside_the_database(tmp_path: Path, monkeypatch) -> None:
    """Before, every local database's artifacts went to the project's outputs/mlartifacts."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (tmp_path / "runs").mkdir()
    cfg = load_config(ROOT / "pipelines" / "configs" / "tiny.yaml", ["run.experiment=beside"])
    run_id, _ = tracking.start_run(cfg, str(tmp_path / "ray"))
    tracking.log_json(run_id, {"a": 1}, "checks/a.json")
    tracking.end_run(run_id, "FINISHED")
    written = list((tmp_path / "runs" / "mlartifacts").rglob("a.json"))
    assert len(written) == 1 and written[0].read_text().strip().startswith("{")


def test_relative_sqlite_uri_is_made_absolute(tmp_path: Path, monkeypatch) -> None:
    """Workers get the driver's URI but run in Ray's session folder: a relative
    sqlite:///mlflow.db there was another database, which took every step's metrics."""
    from pipelines.common import tracking_uri, worker_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db")
    assert tracking_uri() == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert worker_env()["MLFLOW_TRACKING_URI"] == tracking_uri()
    for kept in ("sqlite:////abs/mlflow.db", "sqlite:///:memory:", "http://127.0.0.1:5000"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", kept)
        assert tracking_uri() == kept


def git(root: Path, *args: str) -> str:
    command = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def test_code_version_from_git_or_from_a_submitted_jobs_variables(tmp_path: Path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "exp")
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    git(repo, "commit", "-q", "-m", "a")
    commit = git(repo, "rev-parse", "HEAD")
    (repo / "notes.txt").write_text("untracked files do not make the code dirty")
    assert code_version(repo) == {"commit": commit, "branch": "exp", "dirty": "false"}
    assert uncommitted_diff(repo) == ""
    (repo / "a.py").write_text("x = 2\n")
    assert code_version(repo)["dirty"] == "true"
    assert "-x = 1\n+x = 2" in uncommitted_diff(repo)
    # A job's working dir is uploaded without .git: deploy/runtime_env.py passes these.
    copy = tmp_path / "job"
    copy.mkdir()
    assert code_version(copy) == {}
    monkeypatch.setenv("SAN_GIT_COMMIT", commit)
    monkeypatch.setenv("SAN_GIT_DIRTY", "true")
    assert code_version(copy) == {"commit": commit, "dirty": "true"}


def test_a_run_names_the_code_and_command_it_ran(tmp_path: Path, monkeypatch) -> None:
    """Tags MLflow's UI shows (source name, git commit), the command, the uncommitted
    diff as an artifact; a resume under other code says what changed."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load_config(ROOT / "pipelines" / "configs" / "tiny.yaml", ["run.experiment=code"])
    version = {"commit": "a" * 40, "branch": "main", "dirty": "true"}
    command = "python pipelines/train.py run.name=x 'data.root=/with space'"
    source = tracking.CodeSource("pipelines/train.py", command, version, "diff --git a/x b/x\n")
    run_id, resumed = tracking.start_run(cfg, str(tmp_path / "ray"), source=source)
    assert not resumed
    client = MlflowClient(uri)
    tags = client.get_run(run_id).data.tags
    assert tags["mlflow.source.name"] == "pipelines/train.py"
    assert tags["mlflow.source.git.commit"] == "a" * 40
    assert tags["mlflow.source.git.branch"] == "main"
    assert tags["san.git_dirty"] == "true" and tags["san.command"] == command
    import timm

    assert tags["sys.timm"] == timm.__version__ and tags["sys.numpy"]  # beside sys.torch
    diff = Path(client.download_artifacts(run_id, "code/uncommitted.diff", str(tmp_path)))
    assert diff.read_text() == "diff --git a/x b/x\n"

    clean = tracking.CodeSource(
        "pipelines/train.py", command, {**version, "commit": "b" * 40, "dirty": "false"}
    )
    again, resumed = tracking.start_run(cfg, str(tmp_path / "ray"), source=clean)
    assert again == run_id and resumed
    changed = json.loads(client.get_run(run_id).data.tags["san.resume_changed"])
    assert changed == {"mlflow.source.git.commit": "b" * 40, "san.git_dirty": "false"}
    # A later resume replaces the tag (changes are against the run's first start, like the
    # params); each one's changes stay under resumes/.
    time.sleep(1.1)  # the records are named by the second
    longer = load_config(ROOT / "pipelines" / "configs" / "tiny.yaml",
                         ["run.experiment=code", "optim.max_steps=9"])  # fmt: skip
    tracking.start_run(longer, str(tmp_path / "ray"), source=clean)
    assert json.loads(client.get_run(run_id).data.tags["san.resume_changed"]) == {
        "optim.max_steps": "9",
        **changed,
    }
    records = [a.path for a in client.list_artifacts(run_id, "resumes")]
    assert len(records) == 2
    kept = [json.loads(Path(client.download_artifacts(run_id, r, str(tmp_path))).read_text())
            for r in sorted(records)]  # fmt: skip
    assert kept == [changed, {"optim.max_steps": "9", **changed}]


def test_this_checkouts_version_is_what_git_says() -> None:
    source = tracking.CodeSource.of_this_process()
    assert source.version["commit"] == git(ROOT, "rev-parse", "HEAD")
    dirty = bool(git(ROOT, "status", "--porcelain", "--untracked-files=no"))
    assert source.version["dirty"] == str(dirty).lower()
    assert bool(source.diff) == dirty


def test_any_class_name_gives_metrics_mlflow_accepts(tmp_path: Path) -> None:
    """Per-class IoU is named after the data's classes. MLflow refuses a batch with one
    name it does not allow: a class called "road (paved)" made the run logger take it for
    an outage and hold back every later metric of the run."""
    import numpy as np

    from san.metrics import scalar_metrics, segmentation_scores

    names = ["road (paved)", "car,truck", "sign/symbol", "Straße", "sky"]
    matrix = np.diag([5, 4, 3, 2, 1])
    metrics = scalar_metrics(segmentation_scores(matrix, class_names=names))
    assert {"iou/road _paved_", "iou/car_truck", "iou/sign/symbol", "iou/Stra_e", "iou/sky"} <= set(
        metrics
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_client = MlflowClient(uri)
    run_id = mlflow_client.create_run(mlflow_client.create_experiment("names")).info.run_id
    logger = tracking.RunLogger(run_id, uri)
    logger.metrics(metrics, step=1)
    assert not logger.failing and not logger.pending_metrics
    assert mlflow_client.get_run(run_id).data.metrics == metrics


def test_a_run_is_found_again_under_storage_with_an_apostrophe(tmp_path: Path, monkeypatch):
    """find_run put the storage path in single quotes: /home/o'brien/runs broke the filter."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = load_config(None, ["run.name=resumable"])
    storage = str(tmp_path / "o'brien" / "runs")
    assert tracking.find_run(cfg, storage) is None
    run_id, resumed = tracking.start_run(cfg, storage)
    assert not resumed and tracking.find_run(cfg, storage) == run_id


def test_evaluating_and_registering_checkpoints_keeps_each_record(tmp_path: Path, monkeypatch):
    """evaluate.py --register used to close the training run as FINISHED (a sweep's KILLED
    trial, a run still training), to overwrite eval/scores.json with each checkpoint it
    evaluated, and to register versions that named no checkpoint."""

    from pipelines.evaluate import evaluate
    from san import storage
    from san.models import create_model

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = load_config(ROOT / "pipelines" / "configs" / "tiny.yaml", ["run.probe_steps=0"])
    mlflow_client = MlflowClient(tracking.tracking_uri())
    run_id = mlflow_client.create_run(tracking.experiment_id(cfg.run.experiment)).info.run_id
    mlflow_client.set_terminated(run_id, "KILLED")  # as ASHA leaves a stopped trial
    model = create_model(cfg)
    results = {}
    for step in (3, 6):
        uri = str(tmp_path / "run" / f"checkpoint_{step:07d}")
        state = {"model": model.state_dict(), "step": step, "mlflow_run_id": run_id}
        storage.save_checkpoint(uri, state, cfg.to_dict())
        results[step] = evaluate(uri, [], "san-tiny", "champion")
        assert results[step]["mlflow_run_id"] == run_id
        assert mlflow_client.get_run(run_id).info.status == "KILLED"

    records = {a.path for a in mlflow_client.list_artifacts(run_id, "eval")}
    assert {"eval/step_0000003_scores.json", "eval/step_0000006_scores.json"} <= records
    for step in (3, 6):
        registered = results[step]["registered"]
        version = mlflow_client.get_model_version("san-tiny", str(registered["version"]))
        assert version.tags["checkpoint_uri"].endswith(f"checkpoint_{step:07d}")
        assert version.tags["step"] == str(step)
        assert float(version.tags["eval.miou"]) == pytest.approx(
            results[step]["metrics"]["miou"], rel=1e-5
        )
    alias = mlflow_client.get_model_version_by_alias("san-tiny", "champion")
    assert int(alias.version) == results[6]["registered"]["version"]
