"""End-to-end sweeps: pipelines/tune.py on a local Ray, tracked in a real MLflow server.

Each sweep runs as a subprocess (its own local Ray, 4 logical CPUs: two concurrent trials,
each a trial driver plus one training worker) so the last stdout line and exit code are
checked exactly as a user sees them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.job_env import code_version

ROOT = Path(__file__).resolve().parents[1]
TUNE = ROOT / "pipelines" / "tune.py"


def sweep_env(mlflow_uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["MLFLOW_TRACKING_URI"] = mlflow_uri
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def space_file(tmp_path: Path, name: str, edit) -> Path:
    """quick.yaml, edited for one test."""
    space = yaml.safe_load((ROOT / "tune_spaces" / "quick.yaml").read_text())
    edit(space)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def sweep_cmd(space: Path, storage: Path, *extra: str) -> list[str]:
    return [sys.executable, str(TUNE), "--space", str(space), "--num-cpus", "4", *extra]


def stop_group(proc: subprocess.Popen) -> None:
    """Kill what this test started (the sweep's own process group), if still there."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def children(client, parent_id: str) -> list:
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiment_ids, f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_trial_finished_before_an_interrupt_hands_tune_its_stored_result(
    tmp_path: Path, monkeypatch
) -> None:
    """A sweep interrupted after a trial closed its run but before Tune recorded the trial:
    on --resume the trial reports its stored result instead of reopening the run. Only a
    run closed as completed, with a complete checkpoint at the last step, counts."""
    import math

    from mlflow.tracking import MlflowClient

    from pipelines import tracking
    from pipelines.tune import STOP_COMPLETED, finished_trial_result
    from san.config import load_config
    from san.storage import save_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load_config(ROOT / "pipelines" / "configs" / "tiny.yaml", ["run.name=sweep-t0"])
    storage, steps = str(tmp_path / "train"), cfg.optim.max_steps
    assert finished_trial_result(cfg, storage, "miou") is None  # never started
    run_id, _ = tracking.start_run(cfg, storage)
    client = MlflowClient(uri)
    client.log_metric(run_id, "miou", 0.5, step=steps)
    assert finished_trial_result(cfg, storage, "miou") is None  # still running
    client.set_tag(run_id, "stop_reason", STOP_COMPLETED)
    tracking.end_run(run_id, "FINISHED")
    assert finished_trial_result(cfg, storage, "miou") is None  # no final checkpoint
    final = tmp_path / "train" / "sweep-t0" / f"checkpoint_{steps:07d}"
    save_checkpoint(final, {"step": steps}, cfg.to_dict())
    result = finished_trial_result(cfg, storage, "miou")
    assert result == {"miou": 0.5, "step": steps, "checkpoint_path": str(final)}
    # What the final checkpoint was reported with, where it keeps that: MLflow's latest
    # value of a class's IoU may be from an earlier evaluation, the class absent since.
    reported = {"step": steps, "miou": 0.25, "iou/sky": 0.5}
    save_checkpoint(final, {"step": steps, "metrics": reported}, cfg.to_dict())
    client.log_metric(run_id, "iou/road", 0.9, step=steps - 1)
    result = finished_trial_result(cfg, storage, "iou/road")  # as Tune expects it: NaN
    assert math.isnan(result.pop("iou/road"))
    assert result == {**reported, "checkpoint_path": str(final)}
    (final / "state.pt").write_bytes(b"torn")
    assert finished_trial_result(cfg, storage, "miou") is None  # an incomplete checkpoint: not done
    assert client.get_run(run_id).info.status == "FINISHED"  # and the run stays closed


def test_training_loop_sees_when_the_scheduler_stopped_its_run(tmp_path: Path) -> None:
    """RunLogger.stopped_by_scheduler: true once the sweep's ASHA tagged the run stopped
    (the loop then ends at its next checkpoint), never during an MLflow outage."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import RunLogger
    from pipelines.tune import STOP_COMPLETED, STOP_EARLY

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("stops")).info.run_id
    logger = RunLogger(run_id, uri)
    assert not logger.stopped_by_scheduler()
    client.set_tag(run_id, "stop_reason", STOP_COMPLETED)
    assert not logger.stopped_by_scheduler()
    client.set_tag(run_id, "stop_reason", STOP_EARLY)
    assert logger.stopped_by_scheduler()
    logger.failing = True  # an outage: never a reason to stop training
    assert not logger.stopped_by_scheduler()
    assert not RunLogger("no-such-run", uri).stopped_by_scheduler()


def test_a_resumed_sweep_keeps_its_sample_count(tmp_path: Path, monkeypatch) -> None:
    """Tune restores a sweep with its own num_samples: a resume that asked another made the
    summary wait for trials that never come, ending KILLED on every resume."""
    from pipelines import tracking
    from pipelines.common import UserError
    from pipelines.spaces import load_space
    from pipelines.tune import sweep_num_samples
    from san.config import load_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    space = load_space(ROOT / "tune_spaces" / "quick.yaml")
    parent = load_config(None, ["run.name=sweep"])
    storage = str(tmp_path / "ray")
    assert sweep_num_samples(space, parent, storage, None, False) == space.num_samples
    assert sweep_num_samples(space, parent, storage, 5, False) == 5
    run_id, _ = tracking.start_run(parent, storage)
    tracking.client().log_param(run_id, "sweep.num_samples", "2")
    assert sweep_num_samples(space, parent, storage, None, True) == 2
    assert sweep_num_samples(space, parent, storage, 2, True) == 2
    with pytest.raises(UserError, match="started with --num-samples 2; resume it with that"):
        sweep_num_samples(space, parent, storage, 3, True)
    elsewhere = load_config(None, ["run.name=unknown"])  # no MLflow run: as asked
    assert sweep_num_samples(space, elsewhere, storage, 3, True) == 3


def test_asha_compares_a_resumed_trial_at_the_rung_of_its_step(tmp_path: Path, monkeypatch):
    """After --resume a trial goes on from its checkpoint, but Tune counts its reports from
    1 again: ASHA must place its results by training step, with the other trials' results
    at that step, not with their first evaluations."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from pipelines.spaces import load_space
    from pipelines.tune import build_scheduler, sweep_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    space = load_space(ROOT / "tune_spaces" / "quick.yaml")  # an evaluation every 2 steps
    cfg = sweep_config(space, None, [])
    sweep = {"space": space, "base": cfg.to_dict(), "name": "rungs", "storage": str(tmp_path)}
    asha = build_scheduler(space, cfg, sweep)
    asha.set_search_properties(space.metric, space.mode)
    sampled = {p.key: p.values[0] if p.values else p.low for p in space.params}
    never_reported = SimpleNamespace(last_result={})  # Tune's record of a trial: none yet
    fresh, resumed, late = (
        SimpleNamespace(trial_id=name, config=sampled, run_metadata=never_reported)
        for name in ("fresh", "resumed", "late")
    )
    for trial in (fresh, resumed, late):
        asha.on_trial_add(None, trial)

    def report(trial, step: int, iteration: int, value: float) -> str:
        result = {"step": step, "training_iteration": iteration, space.metric: value}
        return asha.on_trial_result(None, trial, result)

    assert report(fresh, 2, 1, 0.9) == TrialScheduler.CONTINUE
    assert report(fresh, 4, 2, 0.1) == TrialScheduler.CONTINUE
    # Resumed at step 4, its first report is at step 6: better than the step-4 rung (0.1),
    # worse than the step-2 rung (0.9), which it has passed.
    assert report(resumed, 6, 1, 0.5) == TrialScheduler.CONTINUE
    assert report(late, 2, 1, 0.5) == TrialScheduler.STOP  # a first evaluation below 0.9


def test_a_resumed_sweeps_asha_starts_with_the_evaluations_before_the_interrupt(
    tmp_path: Path, monkeypatch
) -> None:
    """Tune does not checkpoint its scheduler: after --resume, each restored trial's
    evaluations come back into ASHA's rungs from its MLflow run, up to the last result Tune
    kept of it. A new trial below them is stopped; a resumed trial is not compared again at
    a rung it passed, and is at one it logged but Tune never judged. A trial is never
    stopped at its last step."""
    import pickle
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from pipelines import tracking
    from pipelines.spaces import load_space
    from pipelines.tune import build_scheduler, sweep_config, trial_config, trial_storage
    from san.config import load_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    space = load_space(ROOT / "tune_spaces" / "quick.yaml")  # rungs at steps 2, 4 and 8
    cfg = sweep_config(space, None, [])
    storage = str(tmp_path / "ray")
    parent_id, _ = tracking.start_run(load_config(None, ["run.name=sweep"]), storage)
    sampled = {p.key: p.values[0] if p.values else p.low for p in space.params}
    sweep = {"space": space, "base": cfg.to_dict(), "name": "sweep", "storage": storage}
    sweep["parent_run_id"] = parent_id
    client = tracking.client()
    for trial_id, values in (
        ("a", {2: 0.9, 4: 0.8}),  # finished its rungs
        ("b", {2: 0.7, 4: 0.6}),  # interrupted after logging step 4, before Tune judged it
        ("c", {2: 0.95, 4: 0.9}),  # interrupted after Tune judged step 4
    ):
        child_cfg = trial_config(cfg.to_dict(), space, sampled, "sweep", trial_id)
        run_id, _ = tracking.start_run(
            child_cfg, trial_storage(storage, "sweep"), parent_run_id=parent_id
        )
        client.set_tag(run_id, "san.trial_id", trial_id)  # as run_trial tags it
        for step, value in values.items():
            client.log_metric(run_id, space.metric, value, step=step)
            client.log_metric(run_id, "loss", 1.0, step=step)  # other metrics: not rungs'

    def scheduler():  # as Tuner.restore hands it back: unpickled from the sweep's start
        asha = pickle.loads(pickle.dumps(build_scheduler(space, cfg, sweep)))
        asha.set_search_properties(space.metric, space.mode)
        return asha

    def trial(trial_id: str, last_result: dict) -> SimpleNamespace:
        metadata = SimpleNamespace(last_result=last_result)  # the last result Tune processed
        return SimpleNamespace(trial_id=trial_id, config=sampled, run_metadata=metadata)

    # A new sweep under the same MLflow run (its Ray folder deleted): nothing to compare with.
    new = scheduler()
    new.on_trial_add(None, trial("z", {}))
    new_result = {"step": 2, "training_iteration": 1, space.metric: 0.1}
    assert new.on_trial_result(None, trial("z", {}), new_result) == TrialScheduler.CONTINUE

    asha = scheduler()
    for trial_id, step in (("a", 4), ("b", 2), ("c", 4)):  # as Tune restores them
        asha.on_trial_add(None, trial(trial_id, {"step": step}))

    def report(trial_id: str, step: int, value: float) -> str:
        if trial_id not in asha._trial_info:  # a trial new to the resumed sweep
            asha.on_trial_add(None, trial(trial_id, {}))
        result = {"step": step, "training_iteration": 1, space.metric: value}
        return asha.on_trial_result(None, trial(trial_id, {}), result)

    assert report("late", 2, 0.75) == TrialScheduler.STOP  # below a, b, c's median 0.9
    assert report("c", 6, 0.0) == TrialScheduler.CONTINUE  # c passed rungs 2 and 4
    assert report("b", 4, 0.6) == TrialScheduler.STOP  # a, c at step 4: 0.85
    assert report("good", 2, 0.95) == TrialScheduler.CONTINUE
    # A trial's last evaluation (max_steps) below the rung: it has finished, and ends by
    # itself, closing its run as completed (stopped, Tune killed it before that).
    assert report("good", 8, 0.0) == TrialScheduler.CONTINUE


def test_a_report_without_the_sweeps_class_metric_reaches_tune_as_nan() -> None:
    """A sweep on iou/<class>: an evaluation where that class is absent reports no IoU for
    it, and Tune fails the whole sweep at a report without its metric."""
    import math
    import queue

    from pipelines.tune import SweepReportCallback

    callback = SweepReportCallback.__new__(SweepReportCallback)  # outside a Tune session:
    callback._training_actor_item_queue = queue.Queue()  # what Tune would read, by hand
    callback.metric = "iou/sky"
    callback.after_report(None, [{"step": 2, "miou": 0.3}], None)
    callback.after_report(None, [{"step": 4, "miou": 0.4, "iou/sky": 0.7}], None)
    absent, present = callback._training_actor_item_queue.queue
    assert absent["step"] == 2 and absent["miou"] == 0.3 and math.isnan(absent["iou/sky"])
    assert present == {"step": 4, "miou": 0.4, "iou/sky": 0.7}


def test_sweep_trials_wait_for_checkpoint_uploads() -> None:
    """run.checkpoint_upload=auto: a training run uploads in the background, a sweep's trial
    waits, as Ray Train passes a checkpoint's metrics to the scheduler only once uploaded
    (in the background, a stopped loser trained on for that long)."""
    from pipelines.loop import uploads_in_background
    from san.config import load_config

    auto = load_config(None, [])
    assert auto.run.checkpoint_upload == "auto"
    assert uploads_in_background(auto, sweep_trial=False)
    assert not uploads_in_background(auto, sweep_trial=True)
    for value, background in (("async", True), ("sync", False)):
        cfg = load_config(None, [f"run.checkpoint_upload={value}"])
        for sweep_trial in (False, True):
            assert uploads_in_background(cfg, sweep_trial) is background


def test_stopped_trials_lose_the_checkpoints_saved_after_the_stop(s3_env) -> None:
    """ASHA stops a trial on its step-2 result while it trains on: a checkpoint at step 4,
    complete or half uploaded, is recorded nowhere and goes; the one its result names, the
    ones before it, and every checkpoint of a completed trial stay (here in S3)."""
    from pipelines.tune import STOP_COMPLETED, STOP_EARLY, drop_checkpoints_after_stop
    from san import storage

    bucket = s3_env.make_bucket("stopped-trials")
    for run, names in (
        ("stopped", ("checkpoint_0000002", "checkpoint_0000004")),
        ("done", ("checkpoint_0000002", "checkpoint_0000004")),
    ):
        for name in names:
            storage.write_bytes_atomic(f"{bucket}/train/{run}/{name}/state.pt", b"x")
    storage.write_bytes_atomic(f"{bucket}/train/stopped/checkpoint_0000006/part", b"x")
    storage.write_bytes_atomic(f"{bucket}/train/stopped/checkpoint_manager_snapshot.json", b"{}")

    def row(run: str, reason: str, step: int) -> dict:
        uri = f"{bucket}/train/{run}/checkpoint_{step:07d}"
        return {"stop_reason": reason, "checkpoint_uri": uri}

    rows = [row("stopped", STOP_EARLY, 2), row("done", STOP_COMPLETED, 2)]
    deleted = drop_checkpoints_after_stop(rows)
    assert deleted == [
        f"{bucket}/train/stopped/checkpoint_0000004",
        f"{bucket}/train/stopped/checkpoint_0000006",
    ]
    assert storage.list_dir(f"{bucket}/train/stopped") == [
        "checkpoint_0000002",
        "checkpoint_manager_snapshot.json",
    ]
    assert storage.list_dir(f"{bucket}/train/done") == ["checkpoint_0000002", "checkpoint_0000004"]
    assert drop_checkpoints_after_stop(rows) == []  # a resumed sweep finds nothing more


@pytest.mark.e2e
def test_quick_sweep_asha_stops_the_clear_loser(tmp_path: Path, mlflow_server) -> None:
    """4 trials, 2 concurrent, ASHA: half the trials face an 8-class scene with K=2 clusters
    (mIoU <= 2/8) against a 2-class scene (mIoU >= 1/4 even when collapsed), so they lose
    clearly at the first evaluation and ASHA must stop at least one."""
    from mlflow.tracking import MlflowClient

    from san.storage import checkpoint_names

    def edit(space: dict) -> None:
        space["params"].pop("model.n_clusters")
        space["params"]["scene"] = {
            "grid": {
                "easy": {"data.synthetic_classes": 2, "model.n_clusters": 2},
                "hard": {"data.synthetic_classes": 8, "model.n_clusters": 2},
            }
        }
        space["search"]["num_samples"] = 2  # x 2 grid points = 4 trials

    space = space_file(tmp_path, "asha", edit)
    metric = yaml.safe_load(space.read_text())["metric"]  # miou_one_to_one: K is searched
    started = time.perf_counter()
    proc = subprocess.run(
        sweep_cmd(space, tmp_path, f"run.storage={tmp_path / 'ray'}"),
        env=sweep_env(mlflow_server.uri),
        capture_output=True,
        text=True,
        timeout=900,
        start_new_session=True,
    )
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"sweep wall time {wall:.0f}s; result {result}")

    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(result["parent_run_id"])
    assert parent.data.params["sweep.scheduler"] == "asha"
    assert parent.data.params["sweep.algorithm"] == "random"
    assert "space.model.tau" in parent.data.params and "space.scene" in parent.data.params
    assert parent.data.metrics["n_trials"] == 4
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    artifacts |= {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"results/trials.csv", "plots/metric_vs_params.png"} <= artifacts

    kids = children(client, parent.info.run_id)
    assert len(kids) == 4
    commit = code_version()["commit"]  # the sweep and each trial name the code they ran
    assert parent.data.tags["mlflow.source.git.commit"] == commit
    assert parent.data.tags["san.command"].startswith("python pipelines/tune.py --space ")
    histories = {}
    for kid in kids:
        assert kid.data.tags["mlflow.source.git.commit"] == commit
        assert "model.tau" in kid.data.params and "optim.lr" in kid.data.params
        histories[kid.info.run_id] = client.get_metric_history(kid.info.run_id, metric)
        assert histories[kid.info.run_id], f"child {kid.info.run_id} has no {metric} history"
        assert kid.data.tags["stop_reason"] in ("completed", "early_stopped_asha")
        assert kid.data.tags["checkpoint_uri"]
        # Stopped trials are KILLED, whether their loop stopped first or Tune killed them
        # (it used to be KILLED or FAILED by that race).
        status = {"completed": "FINISHED", "early_stopped_asha": "KILLED"}
        assert kid.info.status == status[kid.data.tags["stop_reason"]], kid.data.tags
        # quick.yaml keeps 1 checkpoint; a stopped trial may have saved one after the stop
        # (ASHA decides while it trains on), which the sweep deletes.
        uri = kid.data.tags["checkpoint_uri"]
        saved = checkpoint_names([p.name for p in Path(uri).parent.iterdir()])
        assert saved == [Path(uri).name], kid.data.tags
    stopped = [k for k in kids if k.data.tags["stop_reason"] == "early_stopped_asha"]
    assert stopped, "ASHA stopped no trial"
    for kid in stopped:
        assert kid.data.tags["san.group.scene"] == "hard"
        assert len(histories[kid.info.run_id]) < 4  # fewer evaluations than a full run
    assert result["n_early_stopped"] == len(stopped)
    assert result["compute_ratio"] < 1.0
    assert result["trial_steps_run"] < result["trial_steps_full"]

    # The printed best is the best child in MLflow, with the same settings.
    best_value = max(k.data.metrics[metric] for k in kids)
    best = client.get_run(result["best_child_run_id"])
    assert best.data.metrics[metric] == pytest.approx(best_value)
    assert result["best_metric"] == pytest.approx(best_value)
    assert float(best.data.params["model.tau"]) == pytest.approx(result["best_config"]["model.tau"])
    assert float(best.data.params["optim.lr"]) == pytest.approx(result["best_config"]["optim.lr"])
    assert best.data.tags["san.group.scene"] == result["best_config"]["scene"] == "easy"
    assert result["checkpoint"] == best.data.tags["checkpoint_uri"]
    assert Path(result["checkpoint"]).is_dir()


@pytest.mark.e2e
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(
    tmp_path: Path, mlflow_server
) -> None:
    """Interrupted once its first trial has finished; rerun, refused; --resume runs the
    other trial only. The trials run one after the other, a 2-class scene with K=2, then an
    8-class one (mIoU <= 2/8: below the first at its first evaluation, see the ASHA test),
    so the second loses at a rung only the resumed ASHA's restored records hold."""
    from mlflow.tracking import MlflowClient

    def edit(space: dict) -> None:
        space["params"] = {
            "scene": {
                "grid": {
                    "easy": {"data.synthetic_classes": 2, "model.n_clusters": 2},
                    "hard": {"data.synthetic_classes": 8, "model.n_clusters": 2},
                }
            }
        }
        space["search"] = {"algorithm": "random", "num_samples": 1, "max_concurrent": 1, "seed": 0}
        space["scheduler"] = {"name": "asha", "grace_period": 1, "reduction_factor": 2}

    space = space_file(tmp_path, "resume", edit)
    storage = tmp_path / "ray"
    env = sweep_env(mlflow_server.uri)
    client = MlflowClient(mlflow_server.uri)
    args = sweep_cmd(space, tmp_path, f"run.storage={storage}", "run.name=resume")
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        # Interrupt (Ctrl-C) as soon as the first trial has finished.
        finished = []
        deadline = time.monotonic() + 600
        while not finished and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            runs = client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                "tags.`san.sweep` = 'resume-resume' and tags.stop_reason = 'completed'",
            )
            finished = [r for r in runs if r.info.status == "FINISHED"]
        assert finished, "no trial finished before the deadline"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=180)
    finally:
        stop_group(proc)
    assert proc.returncode == 2, stderr.decode()[-3000:]
    assert "--resume" in stderr.decode().strip().splitlines()[-1]
    done = finished[0]
    before = client.get_metric_history(done.info.run_id, "miou")

    # A plain rerun refuses to overwrite the sweep; --resume continues it, with the
    # sample count it started with, as its MLflow run records it (a resume asking another
    # is refused from that record: test_a_resumed_sweep_keeps_its_sample_count).
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = subprocess.run(
        [*args, "--resume"], env=env, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])

    assert client.get_run(result["parent_run_id"]).data.params["sweep.num_samples"] == "1"
    kids = children(client, result["parent_run_id"])
    assert len(kids) == 2
    # ASHA starts the resumed sweep with the finished trial's 4 evaluations (Tune restores
    # no scheduler state), so the other trial is stopped at the first rung (step 2 or 4)
    # where it is below them: the hard scene's, at its first.
    assert re.search(r"ASHA: trial \S+'s 4 evaluations to step 8 back", resumed.stderr)
    metric = yaml.safe_load(space.read_text())["metric"]
    (other,) = [k for k in kids if k.info.run_id != done.info.run_id]
    first, second = (
        {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}
        for run in (done, other)
    )
    losing = [step for step in (2, 4) if step in second and second[step] < first[step]]
    expected = ("early_stopped_asha", str(losing[0])) if losing else ("completed", None)
    tags = other.data.tags
    assert (tags["stop_reason"], tags.get("san.stopped_at_step")) == expected, (first, second)
    assert tags["san.group.scene"] == "hard" and losing[:1] == [2], (first, second)
    assert result["n_early_stopped"] == len(losing[:1])
    kept = client.get_run(done.info.run_id)
    assert kept.info.end_time == done.info.end_time  # the finished trial was not run again
    assert "san.resumed_at_step" not in kept.data.tags
    after = client.get_metric_history(done.info.run_id, "miou")
    assert [(m.step, m.timestamp) for m in after] == [(m.step, m.timestamp) for m in before]
    assert result["n_trials"] == 2
