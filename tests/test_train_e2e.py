"""The main job end to end on real components: Ray Train, an MLflow server, an S3 endpoint."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from sample_data import write_folder
from services import pipeline_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "configs" / "tiny.yaml"

pytestmark = pytest.mark.e2e


def run_pipeline(script: str, args: list[str], env: dict[str, str], timeout: float = 400):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / script), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def test_train_on_s3_with_mlflow_server_then_evaluate(s3_server, mlflow_server, tmp_path):
    """Two DDP workers (gradients all-reduced in bf16) on a folder dataset holding one
    corrupt image, checkpoints to S3."""
    bucket = s3_server.make_bucket("san-e2e").removeprefix("s3://")
    env = pipeline_env(MLFLOW_TRACKING_URI=mlflow_server.uri, **s3_server.env)
    data = write_folder(tmp_path / "data", n=20)
    # The pre-flight samples every 2nd image from the first, so this one is first met by
    # training, as a bad file deep in a large dataset would be: skipped and counted.
    (data / "train" / "images" / "img1.png").write_bytes(b"\x89PNG truncated")
    train_args = [
        "--config",
        str(TINY),
        "data.dataset=folder",
        f"data.root={data}",
        "run.num_workers=2",
        "run.cpus_per_worker=1",
        "optim.grad_allreduce=bf16",
        f"run.storage=s3://{bucket}/runs",
        "run.name=e2e-s3",
    ]
    result, proc = run_pipeline("train.py", train_args, env)
    assert "step 6/6" in proc.stderr  # progress lines reach the terminal
    assert "| [####################] 100% eta 0:00:00" in proc.stderr  # with their bar
    assert proc.stderr.count("DDP all-reduces gradients in bf16") == 1  # rank 0 says so
    assert "PreemptionWatcher" not in proc.stderr  # a local Ray runs no preemption watcher
    assert "skipped bad sample 1 of at most 100: image 'img1' could not be decoded" in proc.stderr
    checkpoint = result["checkpoint"]
    assert checkpoint == f"s3://{bucket}/runs/e2e-s3/checkpoint_0000006"
    keys = {obj["Key"] for obj in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    for step in ("0000003", "0000006"):
        for name in ("MANIFEST.json", "state.pt", "config.json"):
            assert f"runs/e2e-s3/checkpoint_{step}/{name}" in keys

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.n_clusters"] == "4"
    assert run.data.params["run.num_workers"] == "2"
    assert run.data.tags["checkpoint_uri"] == checkpoint
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == [2, 4, 6]  # log steps only, each once
    # Each pass over the corrupt file skips it once; the count sums both workers' readers.
    skipped = client.get_metric_history(run.info.run_id, "bad_samples_skipped")
    assert skipped and skipped[-1].value >= 1 and proc.stderr.count("skipped bad sample") >= 1
    assert [m.value for m in skipped] == sorted(m.value for m in skipped)
    assert run.data.metrics["val_bad_samples_skipped"] == 0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "miou")] == [3, 6]
    # The rate each logged step trained at (it was the next step's: 0 at the last step):
    # warm-up to optim.lr over 2 steps, then cosine decay to 0 at step 6.
    lr = float(run.data.params["optim.lr"])
    logged_lr = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    assert logged_lr[2] == pytest.approx(lr)  # step 2 ran at warm-up's factor 2/2
    assert logged_lr[6] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    # The loop's wait per checkpoint (the upload is not in it: "auto" is async here).
    waits = client.get_metric_history(run.info.run_id, "checkpoint_wait_s")
    assert [m.step for m in waits] == [3, 6] and all(m.value > 0 for m in waits)
    pictures = [a.path for a in client.list_artifacts(run.info.run_id, "pictures")]
    assert "pictures/step_0000006_overlay.png" in pictures
    assert "pictures/step_0000006_confusion.png" in pictures
    # Artifacts were proxied by the server into the S3 bucket.
    artifact_keys = [
        obj["Key"]
        for obj in s3_server.client().list_objects_v2(Bucket="mlflow-artifacts")["Contents"]
    ]
    assert any(k.endswith("step_0000006_overlay.png") for k in artifact_keys)

    # With the workers' thread count (1 CPU each): other counts sum in other orders, which
    # moved the probe's L-BFGS fit, and its mIoU by 7e-5, in the last digits of its floats.
    one_thread = {**env, "OMP_NUM_THREADS": "1"}
    evaluated, _ = run_pipeline("evaluate.py", ["--checkpoint", checkpoint], one_thread)
    assert evaluated["mlflow_run_id"] == run.info.run_id
    for name in ("miou", "pixel_accuracy", "probe_miou"):
        assert 0.0 <= evaluated["metrics"][name] <= 1.0, name
    logged = client.get_metric_history(run.info.run_id, "eval/miou")
    assert [m.step for m in logged] == [6]
    assert logged[0].value == pytest.approx(evaluated["metrics"]["miou"])
    # Evaluating the same weights on the same data reproduces the training-time number.
    assert evaluated["metrics"]["miou"] == pytest.approx(result["metrics"]["miou"], abs=1e-6)
    # So does the probe, which rank 0 fitted and both ranks scored on their part of val.
    probe = evaluated["metrics"]["probe_miou"]
    assert probe == pytest.approx(result["metrics"]["probe_miou"], abs=1e-6)

    # Ray's record lost its final checkpoint (the run ended between the upload and the
    # record; here, the record deleted): a rerun trains nothing, reports that checkpoint
    # again and gives the same result. It was a traceback that marked the run FAILED.
    s3 = s3_server.client()
    s3.delete_object(Bucket=bucket, Key="runs/e2e-s3/checkpoint_manager_snapshot.json")
    files = s3.list_objects_v2(Bucket=bucket, Prefix="runs/e2e-s3/checkpoint_0000006/")
    written = {o["Key"]: o["LastModified"] for o in files["Contents"]}
    again, rerun = run_pipeline("train.py", train_args, env)
    assert "already finished at step 6" in rerun.stderr
    assert f"{checkpoint} is complete but not in Ray's record: reporting it again" in rerun.stderr
    assert again == {**result, "metrics": again["metrics"]}
    assert again["metrics"] == result["metrics"]  # as reported with it: loss and all
    files = s3.list_objects_v2(Bucket=bucket, Prefix="runs/e2e-s3/checkpoint_0000006/")
    assert {o["Key"]: o["LastModified"] for o in files["Contents"]} == written  # not copied
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    record = s3.get_object(Bucket=bucket, Key="runs/e2e-s3/checkpoint_manager_snapshot.json")
    assert b"checkpoint_0000006" in record["Body"].read()
