"""`ray job submit` against a real token-authenticated head (`ray start --head`), end to end.

One module-scoped head serves every test here (a head start costs ~20 s). The main test
submits a long tiny run, stops it with `ray job stop` once a checkpoint is in S3, loads that
checkpoint, then resubmits the tiny config under the same name: it resumes from the stopped
run's checkpoint and must reach SUCCEEDED, with progress lines in `ray job logs`, a FINISHED
MLflow run on the MLflow server and a loadable final checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploy.runtime_env import runtime_env
from pipelines.job_env import SECRET_ENV, code_version
from san import storage

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def ray_cli(head, args: list[str], env: dict[str, str] | None = None, timeout: float = 300):
    """Run the `ray` CLI from the project root as a client of ``head`` (token and address)."""
    env = env if env is not None else {**head.base_env(), **head.env}
    return subprocess.run(
        [str(Path(head.base_env()["PATH"].split(os.pathsep)[0]) / "ray"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit(head, services_env: dict[str, str], job_id: str, entrypoint: list[str]) -> None:
    """`ray job submit --no-wait` with the working dir and the forwarded service variables."""
    proc = ray_cli(
        head,
        [
            "job", "submit", "--no-wait",
            "--submission-id", job_id,
            "--working-dir", ".",
            "--runtime-env-json", json.dumps(runtime_env(services_env)),
            "--", *entrypoint,
        ],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def api(head, path: str) -> dict:
    """GET the job REST API with the head's token (faster than a `ray` CLI call per poll)."""
    token = head.token_path.read_text().strip()
    request = urllib.request.Request(
        f"{head.dashboard_url}/api/jobs/{path}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def status(head, job_id: str) -> str:
    return str(api(head, job_id)["status"])


def logs(head, job_id: str) -> str:
    return str(api(head, f"{job_id}/logs")["logs"])


def wait_status(head, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        state = status(head, job_id)
        if state in TERMINAL:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {state} after {timeout:.0f}s:\n{logs(head, job_id)}")


def complete_checkpoints(url: str) -> list[str]:
    """Complete SAN checkpoints directly under ``url``, oldest first."""
    try:
        names = storage.list_dir(url)
    except FileNotFoundError:
        return []
    found = [storage.join(url, n) for n in names if n.startswith("checkpoint_")]
    return [c for c in found if storage.is_complete_checkpoint(c)]


def test_submit_without_token_is_refused(ray_head, tmp_path: Path) -> None:
    """No token (no RAY_AUTH_* variables, a HOME without ~/.ray/auth_token), or a wrong
    one: refused, by the CLI and by the REST API."""
    env = ray_head.base_env()
    env["HOME"] = str(tmp_path)
    env["RAY_ADDRESS"] = ray_head.dashboard_url
    proc = ray_cli(ray_head, ["job", "submit", "--no-wait", "--", "echo", "hi"], env=env)
    assert proc.returncode != 0, proc.stdout
    assert "auth" in (proc.stdout + proc.stderr).lower()
    wrong_token = tmp_path / "wrong_token"
    wrong_token.write_text("0" * 64)
    wrong = {**ray_head.base_env(), **ray_head.env, "RAY_AUTH_TOKEN_PATH": str(wrong_token)}
    wrong["HOME"] = str(tmp_path)
    proc = ray_cli(ray_head, ["job", "submit", "--no-wait", "--", "echo", "hi"], env=wrong)
    assert proc.returncode != 0, proc.stdout
    assert "auth" in (proc.stdout + proc.stderr).lower()
    request = urllib.request.Request(
        f"{ray_head.dashboard_url}/api/jobs/",
        data=json.dumps({"entrypoint": "echo hi"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code in (401, 403)


def test_train_job_stop_then_resume_to_success(ray_head, mlflow_server, s3_env, tmp_path) -> None:
    """Submit, stop after the first checkpoint, load it; resubmit: resumes, SUCCEEDED, tracked."""
    bucket = s3_env.make_bucket("jobs")
    # Endpoints only: the S3 keys are the cluster's own (ray_head.cluster_env), inherited by
    # the job, as on a real cluster; secrets never ride in a job's runtime env.
    services = {k: v for k, v in s3_env.env.items() if k not in SECRET_ENV}
    services["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    name = "job-e2e"
    run_dir = f"{bucket}/ray/{name}"
    train = ["python", "pipelines/train.py", "--config", "pipelines/configs/tiny.yaml"]
    overrides = [f"run.name={name}", f"run.storage={bucket}/ray", "run.experiment=jobs"]

    # 1. A long run, stopped with `ray job stop` as soon as a checkpoint is complete in S3.
    submit(
        ray_head,
        services,
        "san-stop",
        [*train, *overrides, "optim.max_steps=1000", "run.checkpoint_every=2"],
    )
    deadline = time.monotonic() + 150
    while not complete_checkpoints(run_dir):
        state = status(ray_head, "san-stop")
        assert state not in TERMINAL, f"job ended {state}:\n{logs(ray_head, 'san-stop')}"
        assert time.monotonic() < deadline, f"no checkpoint:\n{logs(ray_head, 'san-stop')}"
        time.sleep(1)
    stop = ray_cli(ray_head, ["job", "stop", "san-stop"], timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert wait_status(ray_head, "san-stop", 60) == "STOPPED"
    stopped_log = logs(ray_head, "san-stop")
    assert re.search(r"step 2/1000 loss", stopped_log), stopped_log[-3000:]
    kept = complete_checkpoints(run_dir)
    state, config = storage.load_checkpoint(kept[-1])
    assert state["step"] >= 2 and config["run"]["name"] == name

    # 2. The tiny config under the same name: resumes from the stopped run, runs to the end.
    last_step = int(state["step"])
    final_steps = last_step + 2
    submit(
        ray_head,
        services,
        "san-resume",
        [*train, *overrides, f"optim.max_steps={final_steps}", "run.checkpoint_every=2"],
    )
    assert wait_status(ray_head, "san-resume", 150) == "SUCCEEDED", logs(ray_head, "san-resume")
    text = logs(ray_head, "san-resume")
    cli_logs = ray_cli(ray_head, ["job", "logs", "san-resume"], timeout=60).stdout
    assert "resumed from step" in cli_logs, cli_logs[-3000:]
    assert re.search(rf"step {final_steps}/{final_steps} loss", text), text[-3000:]
    result = json.loads(
        [line for line in text.splitlines() if line.startswith('{"mlflow_run_id"')][-1]
    )

    # 3. MLflow (the real server) has the run, finished, pointing at a loadable checkpoint.
    from mlflow.tracking import MlflowClient

    run = MlflowClient(mlflow_server.uri).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["checkpoint_uri"] == result["checkpoint"]
    # The job's working dir went without .git; the commit came from the submitting checkout.
    assert run.data.tags["mlflow.source.git.commit"] == code_version()["commit"]
    first_command = [*train, *overrides, "optim.max_steps=1000", "run.checkpoint_every=2"]
    assert run.data.tags["san.command"] == shlex.join(first_command)
    changed = json.loads(run.data.tags["san.resume_changed"])  # what the resubmission changed
    assert changed["optim.max_steps"] == str(final_steps) and "san.command" in changed
    assert "loss" in run.data.metrics
    final_state, _ = storage.load_checkpoint(result["checkpoint"])
    assert final_state["step"] == final_steps

    # 4. No secret (the cluster's S3 keys, the Ray token) in what the jobs left behind:
    # MLflow params, tags and artifacts, the stored run, job logs, Ray's session logs.
    needles = [v.encode() for v in ray_head.cluster_env.values()]
    needles.append(ray_head.token_path.read_text().strip().encode())
    leaks = assert_no_secret(needles)
    client = MlflowClient(mlflow_server.uri)
    params = json.dumps([run.data.params, run.data.tags, sorted(run.data.metrics)]).encode()
    leaks(params, "MLflow params/tags/metrics")
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "art")))
    for path in [p for p in artifacts.rglob("*") if p.is_file()]:
        leaks(path.read_bytes(), f"MLflow artifact {path.name}")
    s3 = s3_env.client()
    bucket_name = bucket.removeprefix("s3://")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket_name):
        for obj in page.get("Contents", []):
            leaks(s3.get_object(Bucket=bucket_name, Key=obj["Key"])["Body"].read(), obj["Key"])
    for job_id in ("san-stop", "san-resume"):
        leaks(logs(ray_head, job_id).encode(), f"`ray job logs {job_id}`")
    for path in ray_head.temp_dir.rglob("*.log"):
        if path.is_file():
            leaks(path.read_bytes(), f"Ray log {path.name}")


def assert_no_secret(needles: list[bytes]):
    """A checker that fails naming where a secret value was found."""

    def leaks(blob: bytes, where: str) -> None:
        found = [n[:6].decode() + "..." for n in needles if n in blob]
        assert not found, f"secret {found} in {where}"

    return leaks


def test_other_pipelines_run_as_jobs(ray_head) -> None:
    """Each pipeline imports and parses its CLI in the job's Python environment (one job
    for the three: a job costs seconds to start)."""
    scripts = ("tune.py", "evaluate.py", "predict.py")
    command = " && ".join(f"python pipelines/{s} --help && echo done:{s}" for s in scripts)
    submit(ray_head, {}, "san-help", ["bash", "-c", command])
    assert wait_status(ray_head, "san-help", 120) == "SUCCEEDED", logs(ray_head, "san-help")
    text = logs(ray_head, "san-help")
    assert text.count("usage:") == 3 and all(f"done:{s}" in text for s in scripts), text
