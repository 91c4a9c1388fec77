"""Object storage and SAN checkpoints on local disk, AWS S3, MinIO or any S3-compatible store.

Everything goes through fsspec (s3fs for ``s3://``) so one code path serves a laptop and a
cluster, except whole-object reads of large files (`fetch_object`, data shards), which take
pyarrow's S3 client where that is safe. The S3 endpoint comes from the standard AWS
variables (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``) or MLflow's
``MLFLOW_S3_ENDPOINT_URL``; credentials come from the standard AWS variables and are never
logged or put in messages.

A checkpoint is a directory holding ``state.pt``, ``config.json`` and, written last,
``MANIFEST.json`` with the sha256 and size of each file. A directory without a valid manifest
is not a complete checkpoint, so a crash mid-save can never be mistaken for a good one.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs
import torch

CHECKPOINT_FORMAT = "san-checkpoint"
CHECKPOINT_VERSION = 1
MANIFEST = "MANIFEST.json"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"

# check_storage must answer in seconds, not after minutes of botocore retries.
_CHECK_CONNECT_TIMEOUT_S = 3
_CHECK_READ_TIMEOUT_S = 5


class StorageError(RuntimeError):
    """Storage is unreachable, missing or refuses us (one-line message naming the URL)."""


class CheckpointError(ValueError):
    """A checkpoint URI is missing, not a SAN checkpoint, incomplete or corrupt (one line)."""


def _one_line(text: object) -> str:
    """Collapse an arbitrary (possibly multi-line) message into one line."""
    return " ".join(str(text).split())


def _first_line(text: object) -> str:
    """First non-empty line of a message (torch errors run to many lines)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _is_s3(url: str) -> bool:
    return url.startswith(("s3://", "s3a://"))


def s3_endpoint() -> str | None:
    """The S3 endpoint URL to use, or None for AWS itself.

    AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL (the AWS SDK order); MLflow's
    MLFLOW_S3_ENDPOINT_URL is the fallback so one MinIO setting serves both.
    """
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        value = os.environ.get(name, "").strip()
        if value:
            if "://" not in value:  # boto3 raised "Invalid endpoint" in a traceback
                raise StorageError(
                    f"{name}={value!r} has no scheme: write http://{value} or https://{value}"
                )
            return value
    return None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _local_path(url: str) -> str:
    """Absolute local path for a plain path or a file:// URL."""
    if url.startswith("file://"):
        url = url[len("file://") :]
    return os.path.abspath(os.path.expanduser(url))


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem for ``url`` and the path inside it.

    For S3 the endpoint, region and any credentials in the environment are passed explicitly:
    fsspec caches instances by their arguments, so a change in the environment gets a new
    client while repeated calls reuse one (a new client costs ~0.3 s). Listings are not cached,
    so writes by other processes are always seen.
    """
    if _is_s3(url):
        import s3fs

        endpoint = s3_endpoint()
        client_kwargs: dict[str, Any] = {"region_name": _region()}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        fs = s3fs.S3FileSystem(
            key=os.environ.get("AWS_ACCESS_KEY_ID") or None,
            secret=os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
            token=os.environ.get("AWS_SESSION_TOKEN") or None,
            client_kwargs=client_kwargs,
            use_listings_cache=False,
        )
        return fs, fs._strip_protocol(url).rstrip("/")
    if "://" in url and not url.startswith("file://"):
        try:
            return fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:  # no such scheme, or its package is absent
            raise StorageError(
                f"{url}: {url.split('://', 1)[0]}:// cannot be opened here "
                f"({_first_line(exc)}); use a local folder, file:// or s3://"
            ) from None
    return fsspec.filesystem("file"), _local_path(url)


class ForkSafeFilesystem:
    """Holds the filesystem of `self.url`, made afresh after a fork or unpickling.

    s3fs clients are not fork-safe, and datasets are forked into DataLoader workers and
    pickled into Ray workers; each process must open its own client.
    """

    url: str
    _fs: fsspec.AbstractFileSystem | None
    _pid: int

    def _open_filesystem(self, url: str) -> str:
        """Open the filesystem of `url`; returns the path inside it."""
        self.url = url
        self._fs, path = filesystem(url)
        self._pid = os.getpid()
        return path

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._pid != os.getpid():
            self._open_filesystem(self.url)
        return self._fs

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fs"], state["_pid"] = None, -1  # rebuilt on first use after unpickling
        return state


def pyarrow_filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for Ray's ``RunConfig(storage_path, storage_filesystem)``.

    Ray does not read AWS_ENDPOINT_URL for its own storage, so the endpoint is passed here.
    """
    if _is_s3(url):
        return _arrow_s3_client(), url.split("://", 1)[1].rstrip("/")
    if "://" in url and not url.startswith("file://"):
        # A local path for it would be "./gs:/bucket/...", where fsspec (resume,
        # evaluation) would never look.
        raise StorageError(
            f"{url}: Ray writes checkpoints through pyarrow, set up here for a local folder "
            f"(or file://) and s3:// (AWS, MinIO or any S3 endpoint); "
            f"{url.split('://', 1)[0]}:// is not one of them"
        )
    return pafs.LocalFileSystem(), _local_path(url)


def _arrow_s3_client(region: str = "") -> pafs.S3FileSystem:
    """pyarrow's S3 client for the endpoint in the environment and `region` (default: the
    environment's); credentials come from the AWS SDK's own chain, which reads the same
    variables."""
    endpoint = s3_endpoint()
    kwargs: dict[str, Any] = {"region": region or _region()}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    return pafs.S3FileSystem(**kwargs)


class _ArrowS3Reads:
    """Whole-object reads through pyarrow's S3 client (the AWS C++ SDK), safe across fork.

    Against s3fs's ``cat_file`` it costs 0.65-0.7x the client CPU per MiB and holds no GIL
    while it waits and copies, so a fetch in a background thread overlaps the reader instead
    of competing with it for the GIL (cold raw CamVid shards from the moto endpoint: 1.75x
    the folder loader's images/s in process and 1.52x through one loader worker, against
    s3fs's 1.28x and 1.25x, measured alternating).

    The SDK is not fork-safe while a request is in flight: a child forked then hangs for good
    on its first request (31 of 40 forks, measured). So reads in flight are counted, a fork
    waits for the count's lock (never held across I/O), and a child forked mid-read reads
    through s3fs instead, as do its own children. A child forked while the SDK is idle (as
    DataLoader workers are, forked when training starts) keeps the fast path. Ray's own
    checkpoint uploads use the same SDK, from the training thread between steps, never while
    that thread forks a loader worker.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self.usable = True
        self._clients: dict[tuple, pafs.S3FileSystem] = {}
        self._inherited: list[pafs.S3FileSystem] = []
        # Through self._lock at call time: the child replaces its lock.
        os.register_at_fork(
            before=lambda: self._lock.acquire(),
            after_in_parent=lambda: self._lock.release(),
            after_in_child=self._after_fork_in_child,
        )
        # Dropped before pyarrow's own exit hook finalizes the SDK (registered earlier, so it
        # runs later): a client alive at that point can deadlock the exit (apache/arrow#50188).
        atexit.register(lambda: self._clients.clear())

    def _after_fork_in_child(self) -> None:
        if self._in_flight:
            self.usable = False
        self._in_flight = 0
        self._lock = threading.Lock()
        # Each process opens its own clients. The parent's are kept, never destroyed here:
        # closing them would close connections the parent still uses.
        self._inherited.extend(self._clients.values())
        self._clients = {}

    def _client(self, bucket: str) -> pafs.S3FileSystem:
        # Keyed by the values filesystem() gives s3fs (endpoint, region, credentials), so a
        # changed environment gets a new client, as it does there; on AWS itself also by
        # bucket, for its region.
        endpoint = s3_endpoint()
        key = (
            "" if endpoint else bucket,
            endpoint,
            _region(),
            os.environ.get("AWS_ACCESS_KEY_ID"),
            os.environ.get("AWS_SECRET_ACCESS_KEY"),
            os.environ.get("AWS_SESSION_TOKEN"),
        )
        if key not in self._clients:
            self._clients[key] = _arrow_s3_client("" if endpoint else _bucket_region(bucket))
        return self._clients[key]

    def read(self, path: str) -> bytes:
        """Whole content of `path` ("bucket/key")."""
        with self._lock:
            self._in_flight += 1
        try:  # the client counts as in flight too: finding a bucket's region is a request
            client = self._client(path.split("/", 1)[0])
            with client.open_input_file(path) as src:
                return src.read()
        finally:
            with self._lock:
                self._in_flight -= 1


_ARROW_S3 = _ArrowS3Reads()


def _bucket_region(bucket: str) -> str:
    """An AWS bucket's own region ("" when it cannot be found: the environment's is used).
    pyarrow's client must be given it: where s3fs follows S3's redirect to another region
    by itself, pyarrow's fails with HTTP 301."""
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return ""


def fetch_object(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """Whole content of one (large) file of `fs` in one request: through pyarrow's S3 client
    where `fs` is S3 and this process may use it (see `_ArrowS3Reads`), else `fs.cat_file`."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    if "s3" in protocols and _ARROW_S3.usable:
        return _ARROW_S3.read(path)
    return fs.cat_file(path)


def join(url: str, *parts: str) -> str:
    """Join path parts onto a local path or URL, keeping its scheme."""
    if "://" in url and not url.startswith("file://"):
        out = url.rstrip("/")
        for part in parts:
            out = f"{out}/{str(part).strip('/')}"
        return out
    return os.path.join(url, *[str(p) for p in parts])


def exists(url: str) -> bool:
    """True when a file or directory (or S3 prefix) exists at ``url``."""
    fs, path = filesystem(url)
    return bool(fs.exists(path))


def read_bytes(url: str) -> bytes:
    """Whole content of one file."""
    fs, path = filesystem(url)
    return fs.cat_file(path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write a whole file so readers see the old content or the new one, never a torn one.

    Locally: a temp file in the same directory, fsync, then os.replace. On S3 a single PUT is
    already atomic.
    """
    fs, path = filesystem(url)
    if fs.protocol and "file" not in fs.protocol:
        fs.pipe_file(path, data)
        return
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; shared datasets must stay readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def list_dir(url: str) -> list[str]:
    """Sorted names (not paths) of the entries directly under ``url``.

    Raises FileNotFoundError when there is nothing there.
    """
    fs, path = filesystem(url)
    entries = fs.ls(path, detail=False)
    names = {os.path.basename(str(e).rstrip("/")) for e in entries}
    names.discard("")
    return sorted(names)


def list_files(url: str) -> list[str]:
    """Sorted paths, relative to ``url`` and with "/" between folders, of every file under
    it at any depth (one paginated listing on S3); empty when there is nothing there."""
    fs, path = filesystem(url)
    prefix = path.rstrip("/") + "/"
    return sorted(str(p)[len(prefix) :] for p in fs.find(path) if str(p).startswith(prefix))


def remove(url: str, recursive: bool = False) -> None:
    """Delete a file (or a tree with ``recursive``); a missing target is not an error."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return
    fs.rm(path, recursive=recursive)


# --------------------------------------------------------------------------------------------
# Fail-fast storage check


def check_storage(url: str, write: bool = True) -> None:
    """Fail before training, in one line, if ``url`` cannot be used for outputs.

    Local: creates the folder and proves it is writable. S3: the endpoint answers, the bucket
    exists, the credentials are accepted and (with ``write``) a probe object can be put and
    deleted. Buckets are never created.
    """
    if _is_s3(url):
        _check_s3(url, write)
    elif "://" in url and not url.startswith("file://"):
        try:
            fs, path = filesystem(url)
            fs.makedirs(path, exist_ok=True)
        except Exception as e:  # noqa: BLE001 - any backend failure is reported the same way
            raise StorageError(_one_line(f"storage {url} is not usable: {e}")) from e
    else:
        _check_local(url, write)


def _check_local(url: str, write: bool) -> None:
    path = _local_path(url)
    try:
        os.makedirs(path, exist_ok=True)
        if write:
            fd, probe = tempfile.mkstemp(dir=path, prefix=".san-write-check-")
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        cause = e.strerror or type(e).__name__
        raise StorageError(
            _one_line(f"local storage path {url} cannot be created or written: {cause}")
        ) from e


def _check_s3(url: str, write: bool) -> None:
    import boto3
    import botocore.config
    import botocore.exceptions as bexc

    bucket, _, prefix = url.split("://", 1)[1].partition("/")
    prefix = prefix.strip("/")
    endpoint = s3_endpoint()
    where = f"{url} (endpoint {endpoint or 'AWS default'})"
    if not bucket:
        raise StorageError(f"storage URL {url} names no bucket")
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=_region(),
        config=botocore.config.Config(
            connect_timeout=_CHECK_CONNECT_TIMEOUT_S,
            read_timeout=_CHECK_READ_TIMEOUT_S,
            retries={"max_attempts": 1, "mode": "standard"},
        ),
    )
    try:
        # ListObjectsV2 (not HeadBucket) so errors come with a code like NoSuchBucket.
        client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        if write:
            key = f"{prefix}/.san-write-check" if prefix else ".san-write-check"
            client.put_object(Bucket=bucket, Key=key, Body=b"ok")
            client.delete_object(Bucket=bucket, Key=key)
    except bexc.NoCredentialsError as e:
        raise StorageError(
            f"storage {where}: no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
        ) from e
    except (bexc.EndpointConnectionError, bexc.ConnectTimeoutError, bexc.ReadTimeoutError) as e:
        raise StorageError(_one_line(f"storage {where}: S3 endpoint unreachable: {e}")) from e
    except bexc.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404"):
            cause = f"bucket {bucket!r} does not exist (it is not created automatically)"
        elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"):
            cause = f"credentials rejected ({code}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        elif code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            cause = f"access denied ({code}) to bucket {bucket!r}"
        else:
            cause = f"{code or type(e).__name__}: {e.response.get('Error', {}).get('Message', '')}"
        raise StorageError(_one_line(f"storage {where}: {cause}")) from e
    except bexc.BotoCoreError as e:
        raise StorageError(_one_line(f"storage {where}: {type(e).__name__}: {e}")) from e


# --------------------------------------------------------------------------------------------
# Checkpoints


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(directory: str | Path, state: dict, config: dict) -> None:
    """Write a SAN checkpoint directory (local path or any fsspec URL).

    Files are written atomically, the manifest last; an old manifest is removed first so an
    interrupted overwrite is never seen as complete.
    """
    url = str(directory)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    files = {
        STATE_FILE: buffer.getvalue(),
        CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True).encode(),
    }
    remove(join(url, MANIFEST))
    for name, data in files.items():
        write_bytes_atomic(join(url, name), data)
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "files": {n: {"sha256": _sha256(d), "size": len(d)} for n, d in files.items()},
        "step": state.get("step"),
    }
    write_bytes_atomic(join(url, MANIFEST), json.dumps(manifest, indent=2).encode())


def _read_verified(uri: str) -> dict[str, bytes]:
    """Contents of every file the manifest lists, after checking sizes and checksums.

    On S3 a failure that is not the checkpoint's own (no credentials, no endpoint, no
    bucket: s3fs reports some as a missing object) is a StorageError naming that cause.
    """
    try:
        return _read_verified_files(uri)
    except CheckpointError:
        raise
    except Exception as exc:
        if _is_s3(uri):
            check_storage(uri, write=False)
        # A file this user may not read is the checkpoint's own problem. Other OSErrors (a
        # timeout, an S3 500) are passing: as CheckpointErrors, a resume would skip to an
        # older checkpoint on one rank and not on another.
        if isinstance(exc, PermissionError | IsADirectoryError | NotADirectoryError):
            raise CheckpointError(_one_line(f"checkpoint {uri} cannot be read: {exc}")) from exc
        raise


def _read_verified_files(uri: str) -> dict[str, bytes]:
    fs, path = filesystem(uri)
    if not fs.exists(path):
        if _is_s3(uri):
            check_storage(uri, write=False)
        raise CheckpointError(f"checkpoint {uri} does not exist")
    manifest_path = f"{path}/{MANIFEST}"
    if not fs.exists(manifest_path):
        inside = checkpoint_names(
            [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        )
        written = [join(uri, name) for name in inside if is_written_checkpoint(join(uri, name))]
        hint = (
            f"; it is a run folder: pass one of its checkpoints, the latest {written[-1]}"
            if written
            else ""
        )
        raise CheckpointError(f"{uri} is not a SAN checkpoint: no {MANIFEST}{hint}")
    try:
        manifest = json.loads(fs.cat_file(manifest_path))
    except ValueError as e:
        raise CheckpointError(f"{uri} is not a SAN checkpoint: {MANIFEST} is not JSON") from e
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{uri} is not a SAN checkpoint: {MANIFEST} format is not {CHECKPOINT_FORMAT!r}"
        )
    if manifest.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {uri} has version {manifest.get('version')!r}; "
            f"this code reads version {CHECKPOINT_VERSION}"
        )
    listed = manifest.get("files")
    if not isinstance(listed, dict) or STATE_FILE not in listed or CONFIG_FILE not in listed:
        raise CheckpointError(f"checkpoint {uri} is incomplete: {MANIFEST} lists no state/config")
    contents: dict[str, bytes] = {}
    for name, meta in listed.items():
        file_path = f"{path}/{name}"
        if not fs.exists(file_path):
            raise CheckpointError(f"checkpoint {uri} is incomplete: {name} is missing")
        data = fs.cat_file(file_path)
        if len(data) != meta.get("size") or _sha256(data) != meta.get("sha256"):
            raise CheckpointError(
                f"checkpoint {uri} is corrupt: {name} does not match its sha256 in {MANIFEST}"
            )
        contents[name] = data
    return contents


def load_checkpoint(
    uri: str, map_location: Any = "cpu", weights_only: bool = True
) -> tuple[dict, dict]:
    """Verify and read a SAN checkpoint; returns ``(state, config)``.

    ``weights_only`` keeps torch.load from running pickled code; states should hold tensors,
    containers and plain Python values only.
    """
    contents = _read_verified(str(uri))
    try:
        state = torch.load(
            io.BytesIO(contents[STATE_FILE]), map_location=map_location, weights_only=weights_only
        )
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(
            f"checkpoint {uri}: {STATE_FILE} cannot be loaded: {type(e).__name__}: {_first_line(e)}"
        ) from e
    try:
        config = json.loads(contents[CONFIG_FILE])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {uri}: {CONFIG_FILE} is not JSON") from e
    return state, config


def checkpoint_step(name: str) -> int:
    """The step in a checkpoint folder's name (checkpoint_<step>); -1 for "" (none)."""
    return int(name.rsplit("_", 1)[1]) if name else -1


def checkpoint_names(names: list[str]) -> list[str]:
    """The checkpoint folders among a run folder's entry names, oldest first.

    Ordered by step, not as text: the names are zero-padded to 7 digits, so from step
    10,000,000 on, text order would put the newest first. Ray keeps its record,
    checkpoint_manager_snapshot.json, beside them: a prefix test alone takes it for the
    newest checkpoint.
    """
    return sorted((n for n in names if re.fullmatch(r"checkpoint_\d+", n)), key=checkpoint_step)


def is_written_checkpoint(uri: str) -> bool:
    """Whether every file the manifest of checkpoint ``uri`` lists is there at its size:
    what a listing can tell (no download), so an upload cut off before a file is not
    taken for a checkpoint. `load_checkpoint` also checks the contents."""
    fs, path = filesystem(uri)
    try:
        files = json.loads(fs.cat_file(f"{path}/{MANIFEST}"))["files"]
        sizes = {
            os.path.basename(str(e["name"]).rstrip("/")): e.get("size")
            for e in fs.ls(path, detail=True)
        }
        return all(sizes.get(name) == entry["size"] for name, entry in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def is_complete_checkpoint(uri: str) -> bool:
    """True when ``uri`` is a SAN checkpoint whose files all match the manifest."""
    try:
        _read_verified(str(uri))
    except CheckpointError:
        return False
    return True


def latest_complete_checkpoint(run_url: str, newer_than: str = "") -> tuple[str, dict, dict] | None:
    """The newest verified checkpoint under a run folder: ``(uri, state, config)``, or None.

    Ray resumes from the checkpoints it registered; one written in full but not yet
    registered (the worker died between upload and report) would otherwise be lost work.
    Incomplete or corrupt directories are skipped, never loaded. Only checkpoints of later
    steps than ``newer_than`` (the name of the checkpoint Ray registered) are read, so
    confirming that nothing is newer costs a listing, not a download.
    """
    try:
        names = checkpoint_names(list_dir(run_url))
    except FileNotFoundError:
        return None
    for name in reversed(names):
        if checkpoint_step(name) <= checkpoint_step(newer_than):
            break
        uri = join(run_url, name)
        try:
            state, config = load_checkpoint(uri)
        except CheckpointError:
            continue
        return uri, state, config
    return None
