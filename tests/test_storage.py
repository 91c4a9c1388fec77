"""san.storage on local disk and on a real S3 endpoint (moto server): files, checkpoints, and
one-line fail-fast errors."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from services import S3Server, free_port

from san import storage
from san.storage import CheckpointError, StorageError


def _state() -> dict:
    return {"step": 7, "model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}}


def _config() -> dict:
    return {"model": {"n_clusters": 5}, "train": {"lr": 0.001}}


def _assert_one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text.strip() == text and text
    return text


# ------------------------------------------------------------------ endpoints and filesystems


def test_s3_endpoint_order(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    assert storage.s3_endpoint() is None
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://c:3")
    assert storage.s3_endpoint() == "http://c:3"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://b:2")
    assert storage.s3_endpoint() == "http://b:2"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://a:1")
    assert storage.s3_endpoint() == "http://a:1"


def test_join() -> None:
    assert storage.join("s3://b/x/", "y", "/z") == "s3://b/x/y/z"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"


def test_pyarrow_filesystem_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = storage.pyarrow_filesystem("runs")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "runs")
    fs, path = storage.pyarrow_filesystem(f"file://{tmp_path}/x")
    assert path == str(tmp_path / "x")


def test_pyarrow_filesystem_s3_reaches_endpoint(s3_env: S3Server) -> None:
    s3_env.make_bucket("arrow-bucket")
    fs, path = storage.pyarrow_filesystem("s3://arrow-bucket/runs/")
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "arrow-bucket/runs"
    with fs.open_output_stream(f"{path}/hello.txt") as f:
        f.write(b"arrow")
    assert storage.read_bytes("s3://arrow-bucket/runs/hello.txt") == b"arrow"


def _fetch_in_forked_child(url: str) -> tuple[bool, str] | None:
    """Fork now; the child fetches `url` with fetch_object (through its own s3fs instance,
    as a forked ShardDataset opens) and reports (whether it may use pyarrow's client, sha256
    of what it read). None when the child hung."""
    context = multiprocessing.get_context("fork")
    answers = context.Queue()

    def child() -> None:
        data = storage.fetch_object(*storage.filesystem(url))
        answers.put((storage._ARROW_S3.usable, hashlib.sha256(data).hexdigest()))

    proc = context.Process(target=child)
    proc.start()
    proc.join(60)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return None
    return answers.get(timeout=10)


def test_fetch_object_through_pyarrow_survives_fork_mid_read(s3_env: S3Server) -> None:
    """fetch_object reads s3:// through pyarrow's S3 client, whose SDK hangs a child forked
    while a request is in flight (most such forks, measured). A child forked mid-read must
    read through s3fs instead and get the same bytes; one forked while the client is idle
    (as DataLoader workers are) keeps the fast path."""
    bucket = s3_env.make_bucket("fetch-fork")
    data = os.urandom(16 << 20)
    s3_env.client().put_object(Bucket="fetch-fork", Key="blob", Body=data)
    digest = hashlib.sha256(data).hexdigest()
    fs, path = storage.filesystem(f"{bucket}/blob")
    assert storage.fetch_object(fs, path) == data
    assert _fetch_in_forked_child(f"{bucket}/blob") == (True, digest)

    stop = threading.Event()

    def keep_reading() -> None:
        while not stop.is_set():
            storage.fetch_object(fs, path)

    reader = threading.Thread(target=keep_reading, daemon=True)
    reader.start()
    try:
        answers = []
        for _ in range(4):
            deadline = time.monotonic() + 30
            while not storage._ARROW_S3._in_flight and time.monotonic() < deadline:
                time.sleep(0.001)
            answers.append(_fetch_in_forked_child(f"{bucket}/blob"))
    finally:
        stop.set()
        reader.join(60)
    assert None not in answers, f"a child forked mid-read hung: {answers}"
    assert {answer[1] for answer in answers} == {digest}
    assert (False, digest) in answers  # forked mid-read: read through s3fs


# ------------------------------------------------------------------ files


def test_local_write_read_exists_list_remove(tmp_path: Path) -> None:
    url = str(tmp_path / "d" / "f.bin")
    assert not storage.exists(url)
    storage.write_bytes_atomic(url, b"abc")
    assert storage.exists(url)
    assert storage.read_bytes(url) == b"abc"
    storage.write_bytes_atomic(url, b"new")
    assert storage.read_bytes(f"file://{url}") == b"new"
    assert storage.list_dir(str(tmp_path / "d")) == ["f.bin"]  # no temp files left behind
    storage.write_bytes_atomic(str(tmp_path / "d" / "sub" / "g.bin"), b"g")
    assert storage.list_files(str(tmp_path / "d")) == ["f.bin", "sub/g.bin"]
    assert storage.list_files(str(tmp_path / "nothing")) == []
    storage.remove(str(tmp_path / "d"), recursive=True)
    assert not storage.exists(str(tmp_path / "d"))
    storage.remove(str(tmp_path / "d"), recursive=True)  # missing is fine


def test_local_atomic_write_failure_leaves_old_file(tmp_path: Path) -> None:
    url = str(tmp_path / "f.bin")
    storage.write_bytes_atomic(url, b"old")
    with pytest.raises(TypeError):
        storage.write_bytes_atomic(url, "not bytes")  # type: ignore[arg-type]
    assert storage.read_bytes(url) == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_s3_write_read_exists_list_remove(s3_env: S3Server) -> None:
    bucket = s3_env.make_bucket("files-bucket")
    url = storage.join(bucket, "p", "f.bin")
    assert not storage.exists(url)
    storage.write_bytes_atomic(url, b"abc")
    assert storage.exists(url)
    assert storage.exists(storage.join(bucket, "p"))
    assert storage.read_bytes(url) == b"abc"
    assert storage.list_dir(storage.join(bucket, "p")) == ["f.bin"]
    storage.write_bytes_atomic(storage.join(bucket, "p", "sub", "g.bin"), b"g")
    assert storage.list_files(storage.join(bucket, "p")) == ["f.bin", "sub/g.bin"]
    assert storage.list_files(storage.join(bucket, "nothing")) == []
    storage.remove(storage.join(bucket, "p"), recursive=True)
    assert not storage.exists(url)


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip_local(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint_000001"
    storage.save_checkpoint(ckpt, _state(), _config())
    assert sorted(os.listdir(ckpt)) == ["MANIFEST.json", "config.json", "state.pt"]
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    assert manifest["format"] == "san-checkpoint" and manifest["version"] == 1
    assert manifest["step"] == 7
    assert set(manifest["files"]) == {"state.pt", "config.json"}
    assert storage.is_complete_checkpoint(str(ckpt))
    state, config = storage.load_checkpoint(str(ckpt))
    assert torch.equal(state["model"]["w"], _state()["model"]["w"])
    assert state["step"] == 7 and config == _config()


def test_checkpoint_round_trip_s3(s3_env: S3Server, tmp_path: Path) -> None:
    bucket = s3_env.make_bucket("ckpt-bucket")
    local = tmp_path / "checkpoint_000002"
    storage.save_checkpoint(local, _state(), _config())
    fs, root = storage.filesystem(bucket)
    fs.put(str(local), f"{root}/run1/", recursive=True)
    uri = storage.join(bucket, "run1", "checkpoint_000002")
    assert storage.is_complete_checkpoint(uri)
    state, config = storage.load_checkpoint(uri)
    assert torch.equal(state["model"]["w"], _state()["model"]["w"]) and config == _config()

    direct = storage.join(bucket, "run1", "direct")
    storage.save_checkpoint(direct, _state(), _config())
    assert storage.load_checkpoint(direct)[0]["step"] == 7

    # What a listing tells (the driver's view of the newest checkpoint), here through S3.
    assert storage.is_written_checkpoint(uri) and storage.is_written_checkpoint(direct)
    storage.write_bytes_atomic(storage.join(uri, "state.pt"), b"cut short")
    assert not storage.is_written_checkpoint(uri)
    storage.remove(storage.join(direct, "state.pt"))
    assert not storage.is_written_checkpoint(direct)
    assert not storage.is_written_checkpoint(storage.join(bucket, "run1", "nothing"))


def test_corrupt_checkpoint_is_one_line_error(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    storage.save_checkpoint(ckpt, _state(), _config())
    data = bytearray((ckpt / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpt / "state.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        storage.load_checkpoint(str(ckpt))
    assert "corrupt" in _assert_one_line(err) and str(ckpt) in str(err.value)
    assert not storage.is_complete_checkpoint(str(ckpt))


def test_missing_file_is_incomplete(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    storage.save_checkpoint(ckpt, _state(), _config())
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError) as err:
        storage.load_checkpoint(str(ckpt))
    assert "incomplete" in _assert_one_line(err)


def test_directory_without_manifest_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "state.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError) as err:
        storage.load_checkpoint(str(tmp_path))
    assert "not a SAN checkpoint" in _assert_one_line(err)
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a SAN checkpoint"):
        storage.load_checkpoint(str(tmp_path))


def test_missing_uri_is_checkpoint_error(tmp_path: Path, s3_env: S3Server) -> None:
    with pytest.raises(CheckpointError) as err:
        storage.load_checkpoint(str(tmp_path / "nope"))
    assert "does not exist" in _assert_one_line(err)
    s3_env.make_bucket("empty-bucket")
    with pytest.raises(CheckpointError, match="does not exist"):
        storage.load_checkpoint("s3://empty-bucket/run/checkpoint_000009")


def test_resave_replaces_manifest_last(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    storage.save_checkpoint(ckpt, _state(), _config())
    storage.save_checkpoint(ckpt, {**_state(), "step": 8}, _config())
    assert storage.load_checkpoint(str(ckpt))[0]["step"] == 8
    assert sorted(os.listdir(ckpt)) == ["MANIFEST.json", "config.json", "state.pt"]


# ------------------------------------------------------------------ check_storage


def test_check_storage_local_creates_folder(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    storage.check_storage(str(target))
    assert target.is_dir() and os.listdir(target) == []


def test_check_storage_local_not_creatable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(StorageError) as err:
        storage.check_storage(str(blocker / "sub"))
    assert str(blocker / "sub") in _assert_one_line(err)


def test_check_storage_s3_ok(s3_env: S3Server) -> None:
    s3_env.make_bucket("check-bucket")
    storage.check_storage("s3://check-bucket/runs")
    assert not storage.exists("s3://check-bucket/runs/.san-write-check")


def test_check_storage_unreachable_endpoint_is_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL_S3": endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.check_storage("s3://any-bucket/runs")
    assert time.monotonic() - start < 15
    text = _assert_one_line(err)
    assert "unreachable" in text and "s3://any-bucket/runs" in text and endpoint in text


def test_check_storage_missing_bucket(s3_env: S3Server) -> None:
    with pytest.raises(StorageError) as err:
        storage.check_storage("s3://no-such-bucket/runs")
    text = _assert_one_line(err)
    assert "does not exist" in text and "no-such-bucket" in text
    names = [b["Name"] for b in s3_env.client().list_buckets()["Buckets"]]
    assert "no-such-bucket" not in names  # never created


# moto's server checks credentials only once INITIAL_NO_AUTH_ACTION_COUNT requests are used up:
# the first four make an IAM user with a key and full rights, and a bucket.
_FREE_ACTIONS = 4


@pytest.fixture(scope="module")
def s3_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Server, dict]]:
    """A second moto server with IAM auth on, and a real access key for it."""
    server = S3Server(
        tmp_path_factory.mktemp("s3auth"),
        extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": str(_FREE_ACTIONS)},
    )
    server.start()
    try:
        iam = server.client("iam")
        iam.create_user(UserName="san")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*",
                                                            "Resource": "*"}]}  # fmt: skip
        iam.put_user_policy(UserName="san", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="san")["AccessKey"]
        server.client().create_bucket(Bucket="auth-bucket")
        yield server, {"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("which", "code"),
    [
        ("good", None),
        ("wrong-secret", "SignatureDoesNotMatch"),
        ("unknown-key", "InvalidAccessKeyId"),
    ],
)
def test_check_storage_credentials(
    s3_with_auth: tuple[S3Server, dict],
    monkeypatch: pytest.MonkeyPatch,
    which: str,
    code: str | None,
) -> None:
    server, key = s3_with_auth
    key_id, secret = {
        "good": (key["id"], key["secret"]),
        "wrong-secret": (key["id"], "not-the-secret"),
        "unknown-key": ("AKIAUNKNOWNUNKNOWN00", "whatever"),
    }[which]
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    if code is None:
        storage.check_storage("s3://auth-bucket/runs")
        return
    with pytest.raises(StorageError) as err:
        storage.check_storage("s3://auth-bucket/runs")
    text = _assert_one_line(err)
    assert code in text and "s3://auth-bucket/runs" in text
    assert secret not in text and key_id not in text  # never leak credentials
