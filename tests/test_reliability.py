"""Faults during a run, end to end on real components (Ray Train, MLflow server, moto S3).

- A training worker SIGKILLed mid-run: the worker group restarts from the last checkpoint,
  finishes at the right step, in the same MLflow run; every reported checkpoint is complete.
  The same run checks that known secret values leak nowhere (MLflow, storage, logs).
- The MLflow server stopped mid-run and the S3 endpoint restarted mid-run (one run, to keep
  the suite short): training goes on, the outage is a clear warning, buffered metrics
  arrive once MLflow is back, and no incomplete checkpoint is ever the result.
- The same run rerun after its newest checkpoint, which Ray registered, was damaged: it
  goes on from the complete one before, in the same MLflow run, and takes the very steps
  the first run took. A killed sweep is covered in tests/test_tune.py; a driver stopped
  mid-run and resubmitted, in tests/test_job_submit.py.

moto keeps objects in memory, so a restarted S3 endpoint comes back empty: the S3 test can
show that the run survives the outage and never reports an incomplete checkpoint, not that
objects written before the outage survive it (a real S3/MinIO keeps them).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from services import MlflowServer, S3Server, pipeline_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "configs" / "tiny.yaml"

pytestmark = pytest.mark.e2e


def start_train(args: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
    """train.py in its own process group, stdout/stderr to files the test can poll."""
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "pipelines" / "train.py"), *args],
        env=env,
        cwd=ROOT,
        stdout=open(logs / "stdout.txt", "w"),  # noqa: SIM115 - closed with the process
        stderr=open(logs / "stderr.txt", "w"),  # noqa: SIM115
        start_new_session=True,
    )


def wait_for(what: str, check, proc: subprocess.Popen, timeout: float = 300.0, logs=None):
    """Poll `check()` until it returns something truthy; fail if the run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            tail = (logs / "stderr.txt").read_text()[-3000:] if logs else ""
            pytest.fail(f"run ended (rc {proc.returncode}) before {what}:\n{tail}")
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def finish(proc: subprocess.Popen, logs: Path, timeout: float = 500.0) -> tuple[int, str, str]:
    """Wait for a `start_train` run (killed whole on a timeout): exit code, stdout, stderr."""
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, (logs / "stdout.txt").read_text(), (logs / "stderr.txt").read_text()


def s3_checkpoints(s3: S3Server, bucket: str, prefix: str) -> dict[int, set[str]]:
    """{step: file names} of the checkpoint objects under s3://bucket/prefix."""
    out: dict[int, set[str]] = {}
    try:
        pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                match = re.search(r"checkpoint_(\d+)/([^/]+)$", obj["Key"])
                if match:
                    out.setdefault(int(match.group(1)), set()).add(match.group(2))
    except Exception:  # endpoint down or bucket gone (moto restarted): nothing visible
        return {}
    return out


def complete_steps(s3: S3Server, bucket: str, prefix: str) -> list[int]:
    return sorted(
        s for s, names in s3_checkpoints(s3, bucket, prefix).items() if "MANIFEST.json" in names
    )


def test_worker_killed_mid_run_resumes_same_run_and_leaks_no_secret(
    s3_server, mlflow_server, tmp_path, monkeypatch
):
    bucket = s3_server.make_bucket("san-reliability").removeprefix("s3://")
    secret_values = {
        "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
        "AWS_SECRET_ACCESS_KEY": "sk-" + secrets.token_hex(16),
        "MLFLOW_TRACKING_USERNAME": "user-" + secrets.token_hex(4),
        "MLFLOW_TRACKING_PASSWORD": "pw-" + secrets.token_hex(16),
    }
    env = pipeline_env(
        MLFLOW_TRACKING_URI=mlflow_server.uri,
        **{**s3_server.env, **secret_values},  # moto accepts any key pair by default
    )
    name, steps, every = "kill-worker", 30, 5
    args = [
        "--config", str(TINY),
        f"run.storage=s3://{bucket}/runs",
        f"run.name={name}",
        f"optim.max_steps={steps}",
        f"run.checkpoint_every={every}",
        "run.keep_checkpoints=0",
        "run.max_failures=1",
        "run.probe_steps=0",
        "run.log_every=5",
        "data.loader_workers=2",  # the rerun below checks they are read in the same turn
    ]  # fmt: skip
    for name_, value in s3_server.env.items():  # this process reads the checkpoints too
        monkeypatch.setenv(name_, value)
    from san.storage import is_complete_checkpoint

    def verified_steps() -> list[int]:
        # A manifest alone is not enough: Ray uploads the files in no particular order.
        found = complete_steps(s3_server, bucket, prefix)
        uri = f"s3://{bucket}/{prefix}checkpoint_"
        return [s for s in found if is_complete_checkpoint(f"{uri}{s:07d}")]

    logs = tmp_path / "logs"
    started = time.time()
    proc = start_train(args, env, logs)
    stderr = logs / "stderr.txt"
    prefix = f"runs/{name}/"
    try:
        pid = int(
            wait_for(
                "the worker's pid",
                lambda: (re.findall(r"worker rank 0 of 1: pid (\d+)", stderr.read_text()) or [0])[
                    0
                ],
                proc,
                logs=logs,
            )
        )
        first = wait_for("the first complete checkpoint", verified_steps, proc, logs=logs)
        assert max(first) < steps, "the run ended before the worker could be killed"
        os.kill(pid, signal.SIGKILL)
        rc, out, err = finish(proc, logs)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 0, err[-4000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["metrics"]["step"] == steps

    # The worker group came back with a new process and resumed from a saved step.
    pids = re.findall(r"worker rank 0 of 1: pid (\d+)", err)
    assert len(set(pids)) >= 2 and pids[0] == str(pid), pids
    resumed = int(err.split("resumed from step ")[1].split()[0])
    assert resumed >= max(first) and resumed % every == 0

    # One MLflow run, which shows the restart.
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("san").experiment_id],
        filter_string=f"tags.`san.run_name` = '{name}'",
    )
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["san.resumed_at_step"] == str(resumed)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "resumed_at_step")] == [
        resumed
    ]
    loss_steps = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    assert set(range(every, steps + 1, every)) <= loss_steps

    # Every reported checkpoint is in storage and complete (checksums verified).
    reported = list(range(every, steps + 1, every))
    assert complete_steps(s3_server, bucket, prefix) == reported
    for step in reported:
        assert is_complete_checkpoint(f"s3://{bucket}/{prefix}checkpoint_{step:07d}"), step
    # The killed worker left the local copies of its queued uploads; the restarted worker
    # cleared them, and Ray deleted each of its own once uploaded.
    from pipelines.loop import checkpoint_staging
    from san.storage import join

    staging = checkpoint_staging(join(f"s3://{bucket}/runs", name))
    assert staging.is_dir() and not list(staging.iterdir())

    # A rerun whose newest checkpoint is damaged goes on from the complete one before it,
    # and takes the very steps the first run took: same data (two loader workers, read in
    # turn), augmentation and optimiser, so it writes the same weights again.
    from san.storage import STATE_FILE, load_checkpoint

    last = f"{prefix}checkpoint_{steps:07d}"
    first_state, _ = load_checkpoint(f"s3://{bucket}/{last}")
    state_key = f"{last}/{STATE_FILE}"
    s3 = s3_server.client()
    body = s3.get_object(Bucket=bucket, Key=state_key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=state_key, Body=body[:1000])
    record_key = f"{prefix}checkpoint_manager_snapshot.json"
    ray_record = s3.get_object(Bucket=bucket, Key=record_key)["Body"].read()
    assert f"checkpoint_{steps:07d}".encode() in ray_record  # what the rerun is handed
    rerun_logs = tmp_path / "rerun"
    rc, rerun_out, rerun_err = finish(start_train(args, env, rerun_logs), rerun_logs, 400)
    assert rc == 0, rerun_err[-4000:]
    again = json.loads(rerun_out.strip().splitlines()[-1])
    assert again["mlflow_run_id"] == result["mlflow_run_id"]
    assert again["metrics"]["step"] == steps
    went_on_from = f"s3://{bucket}/{prefix}checkpoint_{steps - every:07d}"
    assert f"checkpoint s3://{bucket}/{last} is corrupt: " in rerun_err, rerun_err[-3000:]
    assert f"; resuming from {went_on_from} instead" in rerun_err
    assert f"resumed from step {steps - every}" in rerun_err
    assert f"data: the stream goes on where step {steps - every} left it" in rerun_err
    assert f"step 5/{steps} " not in rerun_err  # it did not start again at 0
    rerun_state, _ = load_checkpoint(f"s3://{bucket}/{last}")
    assert rerun_state["data"] == first_state["data"]
    for tensor_name, tensor in first_state["model"].items():
        assert torch.equal(rerun_state["model"][tensor_name], tensor), tensor_name
    run = client.get_run(run.info.run_id)
    assert run.data.tags["san.resumed_at_step"] == str(steps - every)
    out, err = out + rerun_out, err + rerun_err

    # No secret value anywhere: params, tags, metric names, artifacts, storage, logs.
    needles = [v.encode() for v in secret_values.values()]

    def leaks(blob: bytes) -> list[bytes]:
        return [n for n in needles if n in blob]

    text = json.dumps([run.data.params, run.data.tags, sorted(run.data.metrics)]).encode()
    assert not leaks(text), "secret in MLflow params/tags/metrics"
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "art")))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    assert files, "no artifacts downloaded"
    for path in files:
        assert not leaks(path.read_bytes()), f"secret in MLflow artifact {path}"
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            assert not leaks(body), f"secret in stored object {obj['Key']}"
    assert not leaks((out + err).encode()), "secret in the run's stdout/stderr"
    # Ray's own session logs of this run (a new session dir under /tmp/ray).
    for session in Path("/tmp/ray").glob("session_2*"):
        if session.is_dir() and session.stat().st_mtime >= started:
            for path in (session / "logs").rglob("*"):
                if path.is_file() and path.stat().st_size < 50_000_000:
                    assert not leaks(path.read_bytes()), f"secret in Ray log {path}"


def test_mlflow_down_and_s3_restart_mid_run(s3_server, tmp_path, monkeypatch):
    # A dedicated MLflow server (artifacts in the session S3) and a dedicated S3 endpoint
    # for the checkpoints, so stopping either leaves the other tests' services alone.
    mlflow = MlflowServer(tmp_path / "mlflow", s3_server)
    storage_s3 = S3Server(tmp_path / "s3")
    storage_s3.start()
    try:
        mlflow.start(timeout=400)  # a loaded 2-core machine needs minutes
        _mlflow_down_and_s3_restart(mlflow, storage_s3, tmp_path, monkeypatch)
    finally:
        mlflow.stop()
        storage_s3.stop()


def _mlflow_down_and_s3_restart(mlflow, storage_s3, tmp_path, monkeypatch):
    bucket = storage_s3.make_bucket("san-outage").removeprefix("s3://")
    env = pipeline_env(MLFLOW_TRACKING_URI=mlflow.uri, **storage_s3.env)
    name, steps, every = "outage", 40, 10
    args = [
        "--config", str(TINY),
        f"run.storage=s3://{bucket}/runs",
        f"run.name={name}",
        f"optim.max_steps={steps}",
        f"run.checkpoint_every={every}",
        "run.keep_checkpoints=0",
        "run.probe_steps=0",
        "run.log_every=2",
    ]  # fmt: skip
    logs = tmp_path / "logs"
    proc = start_train(args, env, logs)
    stderr = logs / "stderr.txt"
    prefix = f"runs/{name}/"
    client = MlflowClient(mlflow.uri)
    try:
        run_id = wait_for(
            "the MLflow run",
            lambda: (re.findall(r"MLflow run ([0-9a-f]{32})", stderr.read_text()) or [None])[0],
            proc,
            logs=logs,
        )
        wait_for(
            "the first logged loss",
            lambda: client.get_metric_history(run_id, "loss"),
            proc,
            logs=logs,
        )
        mlflow.stop()  # MLflow down from here until after the S3 outage
        wait_for("the outage warning", lambda: "MLflow is unreachable" in stderr.read_text(), proc)
        wait_for(
            "a checkpoint during the MLflow outage",
            lambda: complete_steps(storage_s3, bucket, prefix),
            proc,
            logs=logs,
        )
        storage_s3.stop()  # S3 down for a few seconds, between or during uploads
        time.sleep(4)
        storage_s3.start()  # moto comes back empty; the bucket is made again
        mlflow.start(timeout=400)
        rc, out, err = finish(proc, logs)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "MLflow is unreachable" in err and "training continues" in err
    if rc != 0:
        # Allowed outcome: a clear one-line error, and nothing incomplete presented as a result.
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert rc == 1 and errors[-1].startswith("error: run outage failed"), err[-4000:]
        assert err.strip().splitlines()[-1] == errors[-1]  # the last line names the cause
    else:
        result = json.loads(out.strip().splitlines()[-1])
        assert result["metrics"]["step"] == steps
        assert result["checkpoint"] == f"s3://{bucket}/{prefix}checkpoint_{steps:07d}"
    # Whatever the outcome, every checkpoint with a manifest in storage is complete.
    for name_, value in storage_s3.env.items():
        monkeypatch.setenv(name_, value)
    from san.storage import is_complete_checkpoint

    for step in complete_steps(storage_s3, bucket, prefix):
        assert is_complete_checkpoint(f"s3://{bucket}/{prefix}checkpoint_{step:07d}"), step

    # Nothing logged during the MLflow outage is lost: it arrived after the restart, or it
    # was spilled to a local JSONL file if MLflow was still down at the end.
    trained = max(int(n) for n in re.findall(rf"step (\d+)/{steps} ", err))  # logged steps
    spill = Path("/tmp/san-mlflow-spill") / f"mlflow-unsent-{run_id}.jsonl"
    if "MLflow stayed unreachable" in err:
        assert spill.is_file()
        spilled = {json.loads(line).get("step") for line in spill.read_text().splitlines()}
        arrived = {m.step for m in client.get_metric_history(run_id, "loss")}
        assert set(range(2, trained + 1, 2)) <= arrived | spilled
    elif rc == 0:
        assert "MLflow is reachable again" in err
        arrived = {m.step for m in client.get_metric_history(run_id, "loss")}
        assert set(range(2, trained + 1, 2)) <= arrived
