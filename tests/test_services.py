"""The test services are real: S3 answers boto3 and san.storage, MLflow stores artifacts in
S3 through its proxy (Ray's head, which accepts jobs only with the token, is tested where
the jobs run: test_job_submit.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from services import MlflowServer, S3Server, free_port, wait_http

from san import storage


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_wait_http_times_out_on_closed_port() -> None:
    with pytest.raises(TimeoutError):
        wait_http(f"http://127.0.0.1:{free_port()}/", timeout=1)


def test_s3_put_get_boto3_and_storage(s3_env: S3Server) -> None:
    s3_env.make_bucket("svc-bucket")
    client = s3_env.client()
    client.put_object(Bucket="svc-bucket", Key="a/b.txt", Body=b"via boto3")
    assert storage.read_bytes("s3://svc-bucket/a/b.txt") == b"via boto3"
    storage.write_bytes_atomic("s3://svc-bucket/a/c.txt", b"via storage")
    body = client.get_object(Bucket="svc-bucket", Key="a/c.txt")["Body"].read()
    assert body == b"via storage"


def test_s3_server_restarts_on_same_port(s3_env: S3Server) -> None:
    s3_env.make_bucket("restart-bucket")
    endpoint = s3_env.endpoint
    s3_env.stop()
    with pytest.raises(storage.StorageError, match="unreachable"):
        storage.check_storage("s3://restart-bucket/x")
    s3_env.start()
    assert s3_env.endpoint == endpoint
    # moto is in-memory: objects are gone, but remembered buckets are made again.
    storage.check_storage("s3://restart-bucket/x")


@pytest.mark.e2e
def test_mlflow_server_proxies_artifacts_to_s3(
    mlflow_server: MlflowServer, s3_server: S3Server, tmp_path: Path, monkeypatch
) -> None:
    import mlflow

    # Proxied artifacts: the client needs no S3 settings at all.
    for name in list(os.environ):
        if name.startswith(("AWS_", "MLFLOW_")):
            monkeypatch.delenv(name)
    client = mlflow.MlflowClient(mlflow_server.uri)
    exp_id = client.create_experiment(f"services-{free_port()}")
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "loss", 0.5, step=1)
    note = tmp_path / "note.txt"
    note.write_text("hello artifact")
    client.log_artifact(run.info.run_id, str(note))
    client.set_terminated(run.info.run_id)

    got = client.get_run(run.info.run_id)
    assert got.data.metrics["loss"] == 0.5
    assert got.info.artifact_uri.startswith("mlflow-artifacts:")
    path = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "dl"))
    assert Path(path).read_text() == "hello artifact"

    listed = s3_server.client().list_objects_v2(Bucket=MlflowServer.ARTIFACT_BUCKET)
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys
