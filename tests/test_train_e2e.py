"""The main job end to end on real components: Ray Train, an MLflow server, an S3 endpoint."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from sample_data import write_folder
from services import pipeline_env

from san import storage

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
    result, proc = run_pipeline(
        "train.py",
        [
            "--config",
            str(TINY),
            "data.dataset=folder",
            f"data.root={data}",
            "run.num_workers=2",
            "run.cpus_per_worker=1",
            "optim.grad_allreduce=bf16",
            f"run.storage=s3://{bucket}/runs",
            "run.name=e2e-s3",
        ],
        env,
    )
    assert "step 6/6" in proc.stderr  # progress lines reach the terminal
    assert "| [####################] 100% eta 0:00:00" in proc.stderr  # with their bar
    assert proc.stderr.count("DDP all-reduces gradients in bf16") == 1  # rank 0 says so
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


def latest_complete_checkpoint(run_dir: Path) -> int:
    """The newest step whose checkpoint is complete (a manifest alone is not enough: Ray
    copies a checkpoint's files in no set order, and a kill can land between them)."""
    found = storage.latest_complete_checkpoint(str(run_dir))
    return found[1]["step"] if found else 0


def running(pid: int) -> bool:
    """Whether process `pid` is still running (a zombie has stopped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_interrupted_run_resumes_and_steps_as_if_never_stopped(tmp_path):
    """A run killed after a checkpoint and rerun goes on in the same MLflow run from a saved
    step, and takes the very steps the killed run took: same data (two loader workers,
    read in turn), augmentation and optimiser, so the same weights. To compare, the newest
    checkpoint is damaged before the rerun, which then goes on from the newest complete
    one before it, and writes the damaged one again."""
    steps = 30  # the kill lands at step 10 or 15: enough left to see the resume
    env = pipeline_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = [
        "--config",
        str(TINY),
        f"run.storage={tmp_path / 'ray'}",
        "run.name=resume-me",
        f"optim.max_steps={steps}",
        "run.checkpoint_every=5",
        "run.keep_checkpoints=0",
        "run.probe_steps=0",
        "data.loader_workers=2",
    ]
    run_dir = tmp_path / "ray" / "resume-me"
    first_log = tmp_path / "first.txt"
    # The first run waits for each upload, the rerun uploads in the background (the
    # default): either resumes from the other's checkpoints.
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "pipelines" / "train.py"), *args, "run.checkpoint_upload=sync"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=first_log.open("w"),
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while latest_complete_checkpoint(run_dir) < 10 and time.time() < deadline:
            assert first.poll() is None, "the first run ended before it could be interrupted"
            time.sleep(0.5)
        # The training worker first: Ray's worker processes are not in the driver's process
        # group, and one would go on writing checkpoints for a while.
        worker = int(re.findall(r"worker rank 0 of 1: pid (\d+)", first_log.read_text())[0])
        os.kill(worker, signal.SIGKILL)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started
        first.wait()
    while running(worker) and time.time() < deadline:
        time.sleep(0.1)
    saved = latest_complete_checkpoint(run_dir)
    assert 10 <= saved < steps, f"interrupt came too late or too early (step {saved})"
    newest = run_dir / f"checkpoint_{saved:07d}"
    killed_run_state, _ = storage.load_checkpoint(str(newest))
    with open(newest / storage.STATE_FILE, "r+b") as state_file:
        state_file.truncate(1000)
    ray_record = run_dir / "checkpoint_manager_snapshot.json"  # none if killed before Ray wrote it
    registered = ray_record.exists() and newest.name in ray_record.read_text()

    result, proc = run_pipeline("train.py", args, env)
    resumed_at = int(proc.stderr.split("resumed from step ")[1].split()[0])
    assert resumed_at == saved - 5, proc.stderr[-2000:]
    if registered:  # Ray resumed from it: the loop went past it with a warning
        went_on_from = run_dir / f"checkpoint_{resumed_at:07d}"
        assert f"checkpoint {newest} is corrupt: " in proc.stderr
        assert f"; resuming from {went_on_from} instead" in proc.stderr
    assert f"data: the stream goes on where step {resumed_at} left it" in proc.stderr
    rerun_state, _ = storage.load_checkpoint(str(newest))
    assert rerun_state["data"] == killed_run_state["data"]
    for name, tensor in killed_run_state["model"].items():
        assert torch.equal(rerun_state["model"][name], tensor), name
    next_logged = (resumed_at // 2 + 1) * 2  # tiny.yaml logs every 2 steps; saves every 5
    assert f"step {next_logged}/{steps}" in proc.stderr or next_logged > steps
    assert f"step 2/{steps} " not in proc.stderr  # it did not start again at 0
    assert result["metrics"]["step"] == steps

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(
        [client.get_experiment_by_name("san").experiment_id],
        filter_string="tags.`san.run_name` = 'resume-me'",
    )
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]  # the same run, resumed
    assert runs[0].data.tags["san.resumed_at_step"] == str(resumed_at)
