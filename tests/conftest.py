"""Shared pytest fixtures: real local services (S3, MLflow, Ray) on 127.0.0.1, free ports.

Every fixture stops what it started at teardown; nothing is left running after the session.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `import san` without installing the project

from services import MlflowServer, RayHead, S3Server  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 endpoint for the whole session (in-memory: a restart loses objects)."""
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point this test's process (AWS/MLflow S3 variables) at the session S3 endpoint."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return s3_server


@pytest.fixture(scope="session")
def mlflow_server(
    s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """An MLflow tracking server (SQLite) proxying artifacts to s3://mlflow-artifacts/."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), s3_server)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """A token-authenticated single-node Ray head (2 CPUs) with dashboard and job API.

    Its `ray start` environment holds S3 credentials unique to it (`cluster_env`), as a real
    cluster's does: jobs must get them by inheritance, and tests can search for the values.
    """
    head = RayHead(
        num_cpus=2,
        cluster_env={
            "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
            "AWS_SECRET_ACCESS_KEY": "sk-" + secrets.token_hex(16),
        },
    )
    head.start()
    try:
        yield head
    finally:
        head.stop()
