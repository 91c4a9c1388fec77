"""Local MLflow tracking: artifacts go beside the SQLite database they belong to."""

from __future__ import annotations

from pathlib import Path

from pipelines import tracking
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
