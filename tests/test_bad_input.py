"""Bad input to train.py and evaluate.py: one line naming the cause, exit 2, nothing left behind.

Each case runs the pipeline's real `main` under `run_main` (what `python pipelines/X.py`
runs) in this process, which costs milliseconds instead of a ~5 s interpreter start; two
cases also run as real subprocesses to prove the command line end to end. "Nothing left
behind" means: no run folder under the storage root and no MLflow database or run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sample_data import write_folder
from services import S3Server, free_port

from san.data import encode_png

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "pipelines" / "configs" / "tiny.yaml")
RUN = "bad-input"


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """No outside services; MLflow into a SQLite file that must not appear."""
    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "AWS_", "RAY_")):
            monkeypatch.delenv(name)
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    return {"db": db, "storage": tmp_path / "ray"}


def run_inprocess(
    script: str, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys
) -> tuple[int, str]:
    """Run pipelines/<script>'s main under run_main; returns (exit code, stderr)."""
    import importlib

    from pipelines.common import run_main

    module = importlib.import_module(f"pipelines.{script}")
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as exit_info:
        run_main(module.main)
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *expected: str) -> str:
    last = err.strip().splitlines()[-1]
    assert code == 2, err
    assert last.startswith("error: "), err
    assert "Traceback" not in err, err
    for text in expected:
        assert text in last, last
    return last


def assert_nothing_left(env: dict) -> None:
    assert not (env["storage"] / RUN).exists(), "a run folder was left behind"
    assert not env["db"].exists(), "an MLflow database/run was created"


def train_args(env: dict, *overrides: str) -> list[str]:
    return ["--config", TINY, f"run.storage={env['storage']}", f"run.name={RUN}", *overrides]


# ---------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.bogus=1", "unknown config key 'model.bogus'"),
        ("optim.max_steps=abc", "optim.max_steps='abc' has the wrong type"),
        ("model.n_clusters=1", "model.n_clusters=1 is out of range; allowed: >= 2"),
        ("model.tau=0", "model.tau=0.0 is out of range; allowed: > 0"),
        ("loss.w_rec=-0.5", "loss.w_rec=-0.5 is out of range; allowed: >= 0"),
        # Judged by building the model on the meta device, before Ray starts: these used
        # to fail in each worker, after run.max_failures restarts, with a traceback.
        ("model.encoder=resnet10", "model.encoder='resnet10' is not a timm model"),
        ("model.vit=vit_tiny", "model.vit='vit_tiny' is not a timm model"),
        ("model.encoder=vit_tiny_patch16_224", "has no feature level at stride 8"),
        ("model.vit=resnet18", "vit='resnet18', stride=8) cannot be built: TypeError"),
        ("model.vit_weights=/no/such.pt", "model.vit_weights='/no/such.pt': no such file"),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "K<2",
        "tau<=0",
        "negative-weight",
        "unknown-encoder",
        "unknown-vit",
        "encoder-without-stride",
        "vit-not-a-vit",
        "missing-vit-weights",
    ],
)
def test_bad_config_value(clean_env, monkeypatch, capsys, override, expected):
    code, err = run_inprocess("train", train_args(clean_env, override), monkeypatch, capsys)
    assert_one_line_error(code, err, expected)
    assert_nothing_left(clean_env)


def test_vit_weights_of_another_vit_are_one_line_before_ray_starts(
    clean_env, monkeypatch, capsys, tmp_path
):
    """A weights file that does not fit model.vit failed in each worker, after
    run.max_failures restarts, with a traceback."""
    import timm
    import torch

    weights = tmp_path / "vit_small.pth"
    torch.save(timm.create_model("vit_small_patch16_224", depth=1).state_dict(), weights)
    args = train_args(clean_env, f"model.vit_weights={weights}")
    code, err = run_inprocess("train", args, monkeypatch, capsys)
    assert_one_line_error(code, err, f"model.vit_weights='{weights}' does not fit model.vit: ")
    assert_nothing_left(clean_env)


# ------------------------------------------------------------------------------------ data


def _corrupt_image(root: Path) -> None:
    (root / "train" / "images" / "img1.png").write_bytes(b"\x89PNG not really an image")


def _mis_sized_label(root: Path) -> None:
    label = np.zeros((16, 16), dtype=np.uint8)
    (root / "val" / "labels" / "img2.png").write_bytes(encode_png(label))


def _out_of_range_label(root: Path) -> None:
    label = np.full((32, 32), 7, dtype=np.uint8)  # classes.txt declares 3 classes
    (root / "val" / "labels" / "img0.png").write_bytes(encode_png(label))


def _unlabelled_train(root: Path) -> None:
    for path in (root / "train" / "labels").iterdir():
        path.unlink()


def _out_of_range_train_label(root: Path) -> None:
    label = np.full((32, 32), 7, dtype=np.uint8)
    (root / "train" / "labels" / "img0.png").write_bytes(encode_png(label))


def _class_ids_with_a_gap(root: Path) -> None:
    (root / "classes.txt").unlink()
    (root / "classes.json").write_text('{"0": "sky", "1": "road", "3": "car"}')


def _empty(root: Path) -> None:
    for path in (root / "train" / "images").iterdir():
        path.unlink()


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (None, "not found"),
        (_empty, "has no .jpg/.jpeg/.png/.bmp/.webp/.tif/.tiff files"),
        (_corrupt_image, "image 'img1' could not be decoded"),
        (_mis_sized_label, "label 'img2' is 16x16 but its image is 32x32"),
        (_out_of_range_label, "label 'img0' in split 'val' has class id 7; allowed 0..2"),
        (_out_of_range_train_label, "label 'img0' in split 'train' has class id 7"),
        (_unlabelled_train, "linear probe (run.probe_steps=20) fits on labels of split 'train'"),
        # Named id 2 "car" and counted 3 classes; a "sky": 0 mapping was a int() traceback.
        (_class_ids_with_a_gap, "its keys must be the ids 0..N-1, got ['0', '1', '3']"),
    ],
    ids=[
        "missing-path",
        "empty",
        "corrupt-image",
        "label-size",
        "class-id-range",
        "train-class-id-range",
        "probe-without-train-labels",
        "class-ids-with-a-gap",
    ],
)
def test_bad_data(clean_env, tmp_path, monkeypatch, capsys, damage, expected):
    root = tmp_path / "data"
    if damage is not None:
        damage(write_folder(root))
    args = train_args(clean_env, "data.dataset=folder", f"data.root={root}", "data.image_size=32")
    code, err = run_inprocess("train", args, monkeypatch, capsys)
    assert_one_line_error(code, err, expected)
    assert_nothing_left(clean_env)
    assert not clean_env["storage"].exists()  # data is checked before storage is touched


def test_class_count_that_disagrees_with_the_class_names(tmp_path):
    """data.n_classes=4 over 3 names passed the pre-flight, then every worker failed at its
    first evaluation (segmentation_scores: 3 class_names for 4 classes)."""
    from pipelines.common import UserError
    from pipelines.train import preflight_data
    from san.config import load_config

    root = write_folder(tmp_path / "data")  # classes.txt names 3
    overrides = ["data.dataset=folder", f"data.root={root}", "data.image_size=32"]
    with pytest.raises(UserError, match="data.n_classes=4, but the 'folder' data at .* names 3"):
        preflight_data(load_config(TINY, [*overrides, "data.n_classes=4"]))
    preflight_data(load_config(TINY, [*overrides, "data.n_classes=3"]))
    preflight_data(load_config(TINY, overrides))


def test_splits_read_from_one_folder_are_named(tmp_path, caplog):
    """data.root=<data>/train: both splits fell back to that folder's images/ and the run
    evaluated on its training images without a word."""
    from pipelines.train import preflight_data
    from san.config import load_config

    root = write_folder(tmp_path / "data")
    overrides = ["data.dataset=folder", "data.image_size=32", "data.n_classes=3"]
    with caplog.at_level("WARNING", logger="san"):
        preflight_data(load_config(TINY, [*overrides, f"data.root={root / 'train'}"]))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("splits 'train' and 'val' both read" in w for w in warnings), warnings
    caplog.clear()
    with caplog.at_level("WARNING", logger="san"):
        preflight_data(load_config(TINY, [*overrides, f"data.root={root}"]))
    assert not [r for r in caplog.records if "both read" in r.getMessage()]


def test_train_labels_are_needed_only_by_the_probe(tmp_path):
    """Unsupervised training never reads train labels: without the probe, an unlabelled
    (or differently labelled) train split passes the pre-flight."""
    from pipelines.train import preflight_data
    from san.config import load_config

    root = tmp_path / "data"
    _unlabelled_train(write_folder(root))
    overrides = ["data.dataset=folder", f"data.root={root}", "data.image_size=32"]
    preflight_data(load_config(TINY, [*overrides, "run.probe_steps=0"]))
    _out_of_range_train_label(write_folder(tmp_path / "other"))
    overrides[1] = f"data.root={tmp_path / 'other'}"
    preflight_data(load_config(TINY, [*overrides, "run.probe_steps=0"]))


def test_sweep_checks_its_data_before_ray(clean_env, tmp_path, monkeypatch, capsys):
    """Once, in the sweep's driver: before, every trial met the missing folder in its
    workers and failed after Ray's restarts (2 minutes and a dozen tracebacks)."""
    import ray

    space = str(ROOT / "tune_spaces" / "quick.yaml")
    args = ["--space", space, f"run.storage={clean_env['storage']}", "data.dataset=folder"]
    code, err = run_inprocess(
        "tune", [*args, f"data.root={tmp_path / 'nope'}"], monkeypatch, capsys
    )
    assert_one_line_error(code, err, "image folder", "nope/train/images' not found")
    assert not ray.is_initialized()
    assert not clean_env["storage"].exists() and not clean_env["db"].exists()


def test_bad_sample_met_while_streaming_is_skipped_with_a_count(tmp_path, caplog):
    """A corrupt file the pre-flight did not sample is skipped by training, not fatal."""
    from san.data import DataError, FolderDataset, SkipBad

    root = write_folder(tmp_path / "data", n=4)
    (root / "train" / "images" / "img2.png").write_bytes(b"garbage")
    source = FolderDataset(str(root), "train")
    source.on_bad = SkipBad(limit=1)
    with caplog.at_level("WARNING", logger="san"):
        ids = [s["id"] for s in source.iter_partition(0, 1, 0, False, 0)]
    assert ids == ["img0", "img1", "img3"]
    assert "skipped bad sample 1 of at most 1: image 'img2'" in caplog.text
    (root / "train" / "images" / "img3.png").write_bytes(b"garbage")
    source.on_bad = SkipBad(limit=1)
    with pytest.raises(DataError, match="2 bad samples, more than data.max_bad_samples=1"):
        list(source.iter_partition(0, 1, 0, False, 0))


# -------------------------------------------------------------------------------- services


@pytest.fixture(scope="module")
def s3_checking_keys(tmp_path_factory) -> Iterator[S3Server]:
    """A moto endpoint that checks credentials from the first request on."""
    server = S3Server(tmp_path_factory.mktemp("s3keys"), {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_unreachable_s3_endpoint(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    args = train_args(clean_env, "run.storage=s3://bucket/runs")
    code, err = run_inprocess("train", args, monkeypatch, capsys)
    assert_one_line_error(code, err, "s3://bucket/runs", "S3 endpoint unreachable")
    assert not clean_env["db"].exists()


@pytest.mark.parametrize("scheme", ["gs", "nosuch"])
def test_data_under_a_scheme_this_machine_cannot_open(
    clean_env, good_checkpoint, monkeypatch, capsys, scheme
):
    """gs:// without gcsfs (or an unknown scheme) was an ImportError (ValueError) traceback
    from fsspec, in training's pre-flight as in predict."""
    args = train_args(clean_env, "data.dataset=shards", f"data.root={scheme}://bucket/data")
    code, err = run_inprocess("train", args, monkeypatch, capsys)
    assert_one_line_error(code, err, f"{scheme}://bucket/data: {scheme}:// cannot be opened here")
    assert_nothing_left(clean_env)
    out = str(clean_env["storage"] / "masks")
    args = ["--checkpoint", str(good_checkpoint), "--input", f"{scheme}://b/images"]
    args += ["--output", out]
    code, err = run_inprocess("predict", args, monkeypatch, capsys)
    assert_one_line_error(code, err, f"{scheme}://b/images: {scheme}:// cannot be opened here")


@pytest.mark.parametrize(
    ("flag", "value"), [("--batch-size", "0"), ("--num-actors", "0"), ("--num-gpus", "-1")]
)
def test_predict_counts_out_of_range_are_one_line(
    clean_env, good_checkpoint, tmp_path, monkeypatch, capsys, flag, value
):
    """--batch-size 0 and --num-actors 0 reached Ray Data, after Ray had started."""
    images = tmp_path / "images"
    images.mkdir()
    args = ["--checkpoint", str(good_checkpoint), "--input", str(images)]
    args += ["--output", str(tmp_path / "out"), flag, value]
    code, err = run_inprocess("predict", args, monkeypatch, capsys)
    assert_one_line_error(code, err, f"{flag} {float(value):g}", "allowed: >= ")
    assert not (tmp_path / "out").exists()


def test_storage_ray_cannot_write_to(clean_env, monkeypatch, capsys):
    """Ray's pyarrow filesystem took memory:// (or gs://, with gcsfs installed) for a
    local folder named 'memory:', while resume and evaluation looked under memory://."""
    args = train_args(clean_env, "run.storage=memory://runs")
    code, err = run_inprocess("train", args, monkeypatch, capsys)
    assert_one_line_error(code, err, "memory://runs: Ray writes checkpoints through pyarrow")
    assert not clean_env["db"].exists()
    assert not (ROOT / "memory:").exists()


def test_storage_under_home_is_expanded(monkeypatch, tmp_path):
    from pipelines.common import resolve_storage

    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_storage("~/runs") == str(tmp_path / "runs")  # was <project>/~/runs
    assert resolve_storage("runs") == str(ROOT / "runs")
    assert resolve_storage("s3://bucket/runs") == "s3://bucket/runs"
    # One place, one spelling: runs are found by it, and a trailing "/" made a second run.
    assert resolve_storage("s3://bucket/runs/") == "s3://bucket/runs"
    assert resolve_storage("s3://bucket/") == "s3://bucket"
    assert resolve_storage(str(tmp_path / "runs") + "/") == str(tmp_path / "runs")


def test_storage_inputs_that_gave_tracebacks(tmp_path, monkeypatch, good_checkpoint):
    """An endpoint without a scheme (as MinIO's docs write it) raised boto3's ValueError; a
    checkpoint file that cannot be read raised an OSError; prepare_data --out s3:// (an
    unset $BUCKET) wrote to a local folder named "s3:"."""
    import shutil

    from pipelines.common import UserError
    from pipelines.prepare_data import absolute
    from san.storage import MANIFEST, CheckpointError, StorageError, check_storage, load_checkpoint

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "localhost:9000")
    with pytest.raises(StorageError) as caught:
        check_storage("s3://bucket/runs")
    assert str(caught.value) == (
        "AWS_ENDPOINT_URL='localhost:9000' has no scheme: write http://localhost:9000 or "
        "https://localhost:9000"
    )
    unreadable = tmp_path / "checkpoint_0000005"
    shutil.copytree(good_checkpoint, unreadable)
    (unreadable / MANIFEST).unlink()
    (unreadable / MANIFEST).mkdir()  # read as a file: an OSError, as a permission error is
    with pytest.raises(CheckpointError, match=f"^checkpoint {unreadable} cannot be read: "):
        load_checkpoint(str(unreadable))
    for url in ("s3://", "s3:///"):
        with pytest.raises(UserError, match=f"^{url} names no bucket or folder$"):
            absolute(url)
    assert absolute("s3://bucket/shards/") == "s3://bucket/shards"


def test_evaluate_says_mlflow_is_down_before_evaluating(
    good_checkpoint, clean_env, monkeypatch, capsys
):
    """It evaluated first, then retried MLflow for minutes, then raised a traceback: the
    evaluation was lost."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: nothing listens
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    args = ["--checkpoint", str(good_checkpoint)]
    code, err = run_inprocess("evaluate", args, monkeypatch, capsys)
    assert_one_line_error(code, err, f"MLflow server http://127.0.0.1:{port} is unreachable")


def test_the_result_line_is_strict_json(capsys):
    """A NaN metric (a checkpoint re-reported without its loss) was written as NaN, which
    is not JSON: jq and JSON.parse refused the line scripts read."""
    import json

    import numpy as np

    from pipelines.common import print_result

    print_result({"metrics": {"loss": float("nan"), "miou": np.float64(0.5), "n": [float("inf")]}})
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {line}")) == {
        "metrics": {"loss": None, "miou": 0.5, "n": [None]}
    }


def test_local_data_paths_resolve_as_the_workers_need_them(monkeypatch, tmp_path):
    """train.py and tune.py give workers (which run in Ray's session folder) the project
    root's data.root and data.shard_cache: a relative cache was a new one every job."""
    import argparse

    from pipelines.common import config_from_args
    from pipelines.spaces import load_space
    from pipelines.tune import sweep_config

    monkeypatch.setenv("HOME", str(tmp_path))
    overrides = ["data.root=s3://bucket/shards", "data.shard_cache=cache/shards"]
    cfg = config_from_args(argparse.Namespace(config=str(TINY), overrides=overrides))
    assert (cfg.data.root, cfg.data.shard_cache) == (
        "s3://bucket/shards",
        str(ROOT / "cache/shards"),
    )
    space = tmp_path / "space.yaml"
    space.write_text(f"base_config: {TINY}\nparams: {{model.tau: {{choice: [0.1, 0.2]}}}}")
    overrides = ["data.root=../shared/data/camvid", "data.shard_cache=~/cache"]
    cfg = sweep_config(load_space(space), None, overrides)
    assert cfg.data.root == str((ROOT / "../shared/data/camvid").resolve())
    assert cfg.data.shard_cache == str(tmp_path / "cache")


def test_missing_bucket(clean_env, s3_server, monkeypatch, capsys):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    args = train_args(clean_env, "run.storage=s3://no-such-bucket-here/runs")
    code, err = run_inprocess("train", args, monkeypatch, capsys)
    assert_one_line_error(code, err, "bucket 'no-such-bucket-here' does not exist")
    assert not clean_env["db"].exists()


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        (
            "train",
            ["data.dataset=shards", "data.root=s3://no-such-bucket-here/camvid"],
            "shards at s3://no-such-bucket-here/camvid cannot be read",
        ),
        (
            "evaluate",
            ["--checkpoint", "s3://no-such-bucket-here/runs/a/checkpoint_0000001"],
            "storage s3://no-such-bucket-here/runs/a/checkpoint_0000001",
        ),
    ],
    ids=["shards", "checkpoint"],
)
def test_reading_from_a_missing_bucket_names_it(
    clean_env, s3_server, monkeypatch, capsys, script, args, expected
):
    """Not "no manifest.json" or "does not exist", which s3fs makes of any failure."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    args = train_args(clean_env, *args) if script == "train" else args
    code, err = run_inprocess(script, args, monkeypatch, capsys)
    assert_one_line_error(code, err, expected, "bucket 'no-such-bucket-here' does not exist")
    assert not clean_env["db"].exists()


def test_wrong_credentials(clean_env, s3_checking_keys, monkeypatch, capsys):
    for name, value in s3_checking_keys.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    args = train_args(clean_env, "run.storage=s3://bucket/runs")
    code, err = run_inprocess("train", args, monkeypatch, capsys)
    last = assert_one_line_error(code, err, "credentials rejected (InvalidAccessKeyId)")
    assert "wrong-secret-value" not in err and "AKIAWRONGWRONGWRONG0" not in last
    assert not clean_env["db"].exists()


def test_unreachable_mlflow_at_start(clean_env, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, err = run_inprocess("train", train_args(clean_env), monkeypatch, capsys)
    assert_one_line_error(code, err, f"MLflow server {uri} is unreachable")
    assert not (clean_env["storage"] / RUN).exists()


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    """A real SAN checkpoint of the tiny config (K=4, D=32), as training writes it."""
    from san.config import load_config
    from san.models import create_model
    from san.storage import save_checkpoint

    cfg = load_config(TINY)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_0000005"
    state = {"model": create_model(cfg).state_dict(), "step": 5}
    save_checkpoint(path, state, cfg.to_dict())
    return path


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.n_clusters=5", "model.n_clusters=4 there, 5 here"),
        # These two passed the check, then failed in load_state_dict on every worker:
        # the ViT's position embeddings and SAN's decoder.
        ("data.image_size=64", "data.image_size=32 there, 64 here"),
        ("loss.w_rec=0", "there, 0.0 here (san has a decoder only with w_rec > 0)"),
    ],
)
def test_train_resume_from_incompatible_checkpoint(
    clean_env, good_checkpoint, monkeypatch, capsys, override, expected
):
    import shutil

    run_dir = clean_env["storage"] / RUN
    shutil.copytree(good_checkpoint, run_dir / good_checkpoint.name)
    before = sorted(p.name for p in run_dir.rglob("*"))
    args = train_args(clean_env, override)
    code, err = run_inprocess("train", args, monkeypatch, capsys)
    assert_one_line_error(code, err, "written with another model", expected)
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # the checkpoint is untouched
    assert not clean_env["db"].exists()


def test_rerunning_a_finished_run_says_so_and_names_settings_that_differ(
    good_checkpoint, tmp_path, caplog
):
    """A rerun of a finished run trains nothing and prints the stored result; the driver
    says so, and which settings given now did not produce it (not run.log_every and the
    like, which do not change what is trained)."""
    import shutil

    from pipelines import train
    from san.config import load_config

    shutil.copytree(good_checkpoint, tmp_path / "done" / good_checkpoint.name)
    storage = str(tmp_path)

    def rerun(*overrides: str) -> list[str]:
        cfg = load_config(TINY, ["run.name=done", *overrides])
        caplog.clear()
        with caplog.at_level("WARNING", logger="san"):
            train.say_if_finished(cfg, train.newest_saved_checkpoint(cfg, storage))
        return [r.getMessage() for r in caplog.records]

    assert rerun("optim.max_steps=6") == []  # not finished: it resumes at step 5
    (said,) = rerun("optim.max_steps=5", "run.log_every=7")
    assert said.startswith(f"run 'done' already finished at step 5 ({tmp_path / 'done'}")
    assert "nothing to train, its result follows; raise optim.max_steps" in said
    (said,) = rerun("optim.max_steps=5", "loss.w_mi=2", "data.jitter=0.1")
    assert said.count(" there, ") == 2
    assert "not trained with these settings (loss.w_mi=1.0 there, 2.0 here; data.jitter=" in said
    assert train.newest_saved_checkpoint(load_config(TINY, ["run.name=new"]), storage) is None


def write_ray_record(run_dir: Path, names: list[str]) -> Path:
    """Ray Train's record of a run's checkpoints (as 2.60 writes it), naming `names`."""
    import json

    from pipelines import train

    results = [{"checkpoint_dir_name": name, "metrics": {}} for name in names]
    record = run_dir / train.RAY_CHECKPOINT_RECORD
    record.write_text(json.dumps({"ray_version": "2.60.0", "checkpoint_results": results}))
    return record


def test_a_checkpoint_gone_from_rays_record_is_one_line(good_checkpoint, tmp_path):
    """Ray refused such a run folder in a traceback saying to delete the whole folder."""
    import shutil

    from pipelines import train
    from pipelines.common import UserError
    from san.config import load_config

    run_dir = tmp_path / "went-back"
    shutil.copytree(good_checkpoint, run_dir / good_checkpoint.name)
    # The user deleted the newer one.
    record = write_ray_record(run_dir, [good_checkpoint.name, "checkpoint_0000010"])
    cfg = load_config(TINY, ["run.name=went-back"])
    newest = train.newest_saved_checkpoint(cfg, str(tmp_path))
    with pytest.raises(UserError) as caught:
        train.check_ray_record(cfg, str(tmp_path), newest)
    assert str(caught.value) == (
        f"run 'went-back' cannot resume: Ray's record {record} names checkpoint_0000010, no "
        f"longer in storage; put it back, or delete that record to resume from "
        f"{run_dir / good_checkpoint.name}"
    )
    write_ray_record(run_dir, [good_checkpoint.name])
    train.check_ray_record(cfg, str(tmp_path), newest)  # all there: nothing to say


def test_a_damaged_checkpoint_in_rays_record_is_refused_when_ray_deletes_old_ones(
    good_checkpoint, tmp_path
):
    """Going on from the checkpoint before a damaged one saves under the damaged one's name
    again: Ray's record then has two entries for one folder, and with keep_checkpoints > 0
    evicting the stale one deletes the new checkpoint."""
    import shutil

    from pipelines import train
    from pipelines.common import UserError
    from san.config import load_config
    from san.storage import STATE_FILE

    run_dir = tmp_path / "cut"
    shutil.copytree(good_checkpoint, run_dir / good_checkpoint.name)
    damaged = run_dir / "checkpoint_0000010"
    shutil.copytree(good_checkpoint, damaged)
    (damaged / STATE_FILE).write_bytes((damaged / STATE_FILE).read_bytes()[:1000])
    record = write_ray_record(run_dir, [good_checkpoint.name, damaged.name])
    cfg = load_config(TINY, ["run.name=cut", "run.keep_checkpoints=2"])
    newest = train.newest_saved_checkpoint(cfg, str(tmp_path))
    assert newest[0] == str(run_dir / good_checkpoint.name)
    with pytest.raises(UserError) as caught:
        train.check_ray_record(cfg, str(tmp_path), newest)
    assert str(caught.value) == (
        f"run 'cut' cannot resume with run.keep_checkpoints=2: Ray's record {record} names "
        f"checkpoint_0000010, whose files are cut short or missing; delete it and that record "
        f"to resume from {run_dir / good_checkpoint.name}"
    )
    assert damaged.is_dir() and record.is_file()  # nothing deleted for the user
    keep_all = load_config(TINY, ["run.name=cut", "run.keep_checkpoints=0"])
    train.check_ray_record(keep_all, str(tmp_path), newest)  # nothing is ever deleted


def _not_san(path: Path) -> str:
    path.mkdir()
    (path / "model.bin").write_bytes(b"weights")
    return str(path)


def _corrupt_state(path: Path, good: Path) -> str:
    import shutil

    shutil.copytree(good, path)
    data = bytearray((path / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "state.pt").write_bytes(bytes(data))
    return str(path)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "does not exist"),
        ("not-san", "is not a SAN checkpoint: no MANIFEST.json"),
        ("corrupt", "is corrupt: state.pt does not match its sha256"),
        ("other-K", "size mismatch for running_centres: copying a param with shape"),
        ("other-D", "does not fit the config (model.n_clusters=4, model.embed_dim=48"),
        ("missing-data", "nowhere/val/images' not found; expected <root>/<split>/images/"),
        ("run-folder", "it is a run folder: pass one of its checkpoints, the latest /"),
    ],
)
def test_evaluate_bad_checkpoint(
    clean_env, tmp_path, good_checkpoint, monkeypatch, capsys, kind, expected
):
    overrides: list[str] = []
    uri = str(good_checkpoint)
    if kind == "missing":
        uri = str(tmp_path / "nowhere" / "checkpoint_0000001")
    elif kind == "not-san":
        uri = _not_san(tmp_path / "other")
    elif kind == "corrupt":
        uri = _corrupt_state(tmp_path / "corrupt", good_checkpoint)
    elif kind == "other-K":
        overrides = ["model.n_clusters=6"]
    elif kind == "other-D":
        overrides = ["model.embed_dim=48"]
    elif kind == "run-folder":  # with Ray's record, which sorts after every checkpoint
        import shutil

        run = tmp_path / "run"
        shutil.copytree(good_checkpoint, run / good_checkpoint.name)
        (run / "checkpoint_manager_snapshot.json").write_text("{}")
        uri = str(run)
        expected += f"{str(run)[1:]}/{good_checkpoint.name}"
    elif kind == "missing-data":  # was a traceback
        overrides = ["data.dataset=folder", f"data.root={tmp_path / 'nowhere'}"]
    code, err = run_inprocess("evaluate", ["--checkpoint", uri, *overrides], monkeypatch, capsys)
    assert_one_line_error(code, err, expected)
    assert not clean_env["db"].exists()


def test_evaluate_alias_without_register(clean_env, good_checkpoint, monkeypatch, capsys):
    """Was ignored: the user believed the checkpoint registered as 'best'."""
    args = ["--checkpoint", str(good_checkpoint), "--alias", "best"]
    code, err = run_inprocess("evaluate", args, monkeypatch, capsys)
    assert_one_line_error(code, err, "--alias best names a registered version: add --register")
    assert not clean_env["db"].exists()


@pytest.mark.parametrize(
    ("register", "alias", "expected"),
    [
        ("san", "v2", "--alias 'v2': an alias is letters"),
        ("san", "Latest", "--alias 'Latest': an alias is letters"),
        ("san", "prod.1", "--alias 'prod.1': an alias is letters"),
        ("team/seg", "best", "--register 'team/seg': a model name must be"),
        ("..seg", "best", "--register '..seg': a model name must be"),
    ],
)
def test_evaluate_refuses_registry_names_before_evaluating(
    clean_env, good_checkpoint, monkeypatch, capsys, register, alias, expected
):
    """MLflow refused these only after the evaluation and the new model version: a
    traceback, and a version without its alias at every try."""
    args = ["--checkpoint", str(good_checkpoint), "--register", register, "--alias", alias]
    code, err = run_inprocess("evaluate", args, monkeypatch, capsys)
    assert_one_line_error(code, err, expected)
    assert not clean_env["db"].exists()


# ------------------------------------------------------------------- the real command line


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.n_clusters=1"], "model.n_clusters=1 is out of range"),
        (["data.dataset=folder", "data.root=/no/such/folder"], "not found"),
    ],
    ids=["config", "data"],
)
def test_command_line_error_is_one_line(tmp_path, overrides, expected):
    assert_one_line_exit(tmp_path, ["train.py", "--config", TINY], overrides, expected)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["run.num_workers=3", "run.cpus_per_worker=2"], "need 6 CPUs but the local Ray has 4"),
        (
            ["run.use_gpu=true", "run.num_workers=2"],
            "needs a GPU per worker but the local Ray has 1",
        ),
    ],
)
def test_a_run_that_does_not_fit_the_local_ray_is_one_line(monkeypatch, overrides, expected):
    """A local Ray cannot grow: these waited forever for their workers (Ray Train retrying
    every 60 s). Checked against the resources the local Ray reports; a cluster may
    autoscale, so it is not checked."""
    from pipelines.common import UserError
    from pipelines.train import check_fits_local_ray
    from san.config import load_config

    cfg = load_config(TINY, overrides)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UserError, match=expected):
        check_fits_local_ray(cfg, {"CPU": 4.0, "GPU": 1.0})
    check_fits_local_ray(cfg, {"CPU": 8.0, "GPU": 2.0})
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    check_fits_local_ray(cfg, {"CPU": 4.0, "GPU": 1.0})


def assert_one_line_exit(tmp_path, command: list[str], overrides: list[str], expected: str):
    """The pipeline exits 2 with `expected` in its one error line, having written nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "RAY_"))}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "ray"
    script, *args = command
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / script), *args,
         f"run.storage={storage}", f"run.name={RUN}", *overrides],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not list(storage.glob(f"*{RUN}*")) and not (tmp_path / "mlflow.db").exists()


# -------------------------------------------------------------------------------- security


def test_shipped_configs_keep_auth_on():
    """Ray token auth and MLflow's host-allow list stay on in every shipped deploy config."""
    import re

    texts = {p: p.read_text() for p in (ROOT / "deploy").rglob("*") if p.is_file()}
    assert texts, "deploy/ is empty"
    for path, text in texts.items():
        assert "RAY_AUTH_MODE=disabled" not in text, path
        if re.search(r"mlflow server\b", text) and path.suffix in (".yaml", ".yml", ""):
            assert "--allowed-hosts" in text, f"{path} starts MLflow without --allowed-hosts"
            assert not re.search(r"--allowed-hosts\s+\"?\*", text), path
        if path.suffix not in (".yaml", ".yml") or "kind: RayCluster" in text:
            continue
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if "ray start " in line and not line.lstrip().startswith("#"):
                near = " ".join(lines[max(0, i - 1) : i + 1])
                assert "RAY_AUTH_MODE=token" in near, f"{path}:{i + 1} ray start without token"
    raycluster = ROOT / "deploy" / "kuberay" / "raycluster.yaml"
    assert re.search(r"authOptions:\s*\n\s*mode:\s*token", raycluster.read_text())


def test_resume_fallback_skips_incomplete_and_corrupt_checkpoints(tmp_path, good_checkpoint):
    """The newest *verified* checkpoint in storage is the one a restart may fall back to."""
    import shutil

    from san.storage import MANIFEST, latest_complete_checkpoint

    run = tmp_path / "run"
    assert latest_complete_checkpoint(str(run)) is None
    shutil.copytree(good_checkpoint, run / "checkpoint_0000005")
    _corrupt_state(run / "checkpoint_0000010", good_checkpoint)  # checksum fails
    shutil.copytree(good_checkpoint, run / "checkpoint_0000015")
    (run / "checkpoint_0000015" / MANIFEST).unlink()  # upload cut short: no manifest
    uri, state, _ = latest_complete_checkpoint(str(run))
    assert uri == str(run / "checkpoint_0000005") and state["step"] == 5
    # With step 5 in hand (registered with Ray), nothing newer is complete.
    assert latest_complete_checkpoint(str(run), newer_than="checkpoint_0000005") is None
    assert latest_complete_checkpoint(str(run), newer_than="checkpoint_0000004")[1]["step"] == 5


def test_checkpoints_past_step_ten_million_are_newest(tmp_path, good_checkpoint):
    """Names are padded to 7 digits: as text, checkpoint_10000000 sorted before
    checkpoint_9999000, and a restart resumed from the older one."""
    import shutil

    from san.storage import checkpoint_names, latest_complete_checkpoint

    run = tmp_path / "run"
    for name in ("checkpoint_9999000", "checkpoint_10000000"):
        shutil.copytree(good_checkpoint, run / name)
    names = ["checkpoint_10000000", "checkpoint_manager_snapshot.json", "checkpoint_9999000"]
    assert checkpoint_names(names) == ["checkpoint_9999000", "checkpoint_10000000"]
    uri, _, _ = latest_complete_checkpoint(str(run), newer_than="checkpoint_9999000")
    assert uri == str(run / "checkpoint_10000000")
    assert latest_complete_checkpoint(str(run), newer_than="checkpoint_10000000") is None


def test_driver_and_workers_agree_on_the_newest_checkpoint(tmp_path, good_checkpoint):
    """An upload cut off after the manifest but before (all of) state.pt: the driver took
    it for the newest checkpoint (said a finished run had nothing to train, checked the
    wrong config, pointed evaluate at it) while the workers skipped it."""
    import shutil

    from pipelines import train
    from san.config import load_config
    from san.storage import STATE_FILE, CheckpointError, latest_complete_checkpoint, load_checkpoint

    run = tmp_path / RUN
    shutil.copytree(good_checkpoint, run / "checkpoint_0000005")
    shutil.copytree(good_checkpoint, run / "checkpoint_0000006")
    shutil.copytree(good_checkpoint, run / "checkpoint_0000007")
    state = run / "checkpoint_0000006" / STATE_FILE
    state.write_bytes(state.read_bytes()[:1000])  # cut short
    (run / "checkpoint_0000007" / STATE_FILE).unlink()  # never arrived
    cfg = load_config(TINY, [f"run.name={RUN}"])
    uri, _ = train.newest_saved_checkpoint(cfg, str(tmp_path))
    assert uri == str(run / "checkpoint_0000005") == latest_complete_checkpoint(str(run))[0]
    with pytest.raises(CheckpointError, match="the latest .*checkpoint_0000005$"):
        load_checkpoint(str(run))
