"""Real local services for end-to-end tests: an S3 endpoint (moto), an MLflow server, a Ray head.

Each runs as a subprocess in its own process group, bound to 127.0.0.1 on a free port, and is
stopped by killing exactly the processes it started (never by process name, so other Ray or
MLflow instances on the machine are left alone).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent

TEST_KEY = "testing"
TEST_SECRET = "testing"
TEST_REGION = "us-east-1"

# Variables that would point a child at some other Ray cluster or credentials.
_RAY_CLIENT_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def pipeline_env(**extra: str) -> dict[str, str]:
    """This process's environment without service settings, plus `extra`: a pipeline run
    from a test reaches exactly the services the test names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "RAY_"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def free_ports(n: int) -> list[int]:
    """`n` different TCP ports on 127.0.0.1 that nothing listens on right now. They are
    bound together, so no two are the same: a port asked for alone is free again as
    soon as it is returned, and the next request can get it too (a Ray head given the
    same port for its dashboard and its metrics export fails to start)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``url`` gives any HTTP response (a 4xx counts: the server is up).

    With ``proc``, give up at once if that process has died.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s (last error: {last})")


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in a new process group with output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _kill_group(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM the process group ``proc`` leads, then SIGKILL whatever is left."""
    if proc is None:
        return
    pgid = proc.pid  # start_new_session=True makes the child its own group leader
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; make sure nothing else in its group lingers.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break
    if proc.poll() is None:
        proc.wait(timeout=5)


def _pids_mentioning(marker: str) -> list[int]:
    """PIDs of this user's processes whose command line contains ``marker`` (a unique path)."""
    pids = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


class S3Server:
    """moto's S3 (and IAM) server on 127.0.0.1; restartable on the same port.

    moto keeps data in memory, so a restart loses objects; buckets made with make_bucket are
    made again (empty) on start so dependants such as the MLflow server keep working.
    ``extra_env`` lets a test turn on moto's IAM auth (INITIAL_NO_AUTH_ACTION_COUNT).
    """

    def __init__(self, workdir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.extra_env = dict(extra_env or {})
        self.buckets: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "moto.log"

    @property
    def env(self) -> dict[str, str]:
        """What a client (or a server such as MLflow's) needs to use this endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": TEST_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
            "AWS_DEFAULT_REGION": TEST_REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        exe = BIN / "moto_server"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        cmd += ["-H", "127.0.0.1", "-p", str(self.port)]
        env = {**os.environ, **self.extra_env}
        self.proc = _spawn(cmd, env, self.log)
        try:
            wait_http(f"{self.endpoint}/moto-api/", timeout=30, proc=self.proc)
        except Exception as e:
            self.stop()
            raise RuntimeError(f"moto server did not start: {e}\n{_tail(self.log)}") from e
        for name in self.buckets:
            self._create_bucket(name)

    def stop(self) -> None:
        _kill_group(self.proc, grace=5.0)
        self.proc = None

    def client(self, service: str = "s3", **kwargs):
        """A boto3 client for this endpoint (test credentials unless overridden)."""
        import boto3

        opts = {
            "endpoint_url": self.endpoint,
            "region_name": TEST_REGION,
            "aws_access_key_id": TEST_KEY,
            "aws_secret_access_key": TEST_SECRET,
            **kwargs,
        }
        return boto3.client(service, **opts)

    def _create_bucket(self, name: str) -> None:
        s3 = self.client()
        try:
            s3.create_bucket(Bucket=name)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (idempotent, remembered across restarts); returns s3://name."""
        self._create_bucket(name)
        if name not in self.buckets:
            self.buckets.append(name)
        return f"s3://{name}"


# As deploy/mlflow runs the server: MLflow 3's job runner off (8 more processes, 7 of them
# huey consumers, for GenAI evaluation jobs this platform does not use). On, the server took
# ~22 s more CPU in its first 15 s, CPU the tests compete for on a 2-core machine.
MLFLOW_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServer:
    """``mlflow server`` with a SQLite backend and proxied artifacts in an S3 bucket.

    Only this server gets S3 credentials; clients talk HTTP to it and need none.
    """

    ARTIFACT_BUCKET = "mlflow-artifacts"

    def __init__(self, workdir: Path, s3: S3Server) -> None:
        self.workdir = Path(workdir)
        self.s3 = s3
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / "mlflow.log"

    def start(self, timeout: float = 120.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.s3.make_bucket(self.ARTIFACT_BUCKET)
        exe = BIN / "mlflow"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]
        cmd += [
            "server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{self.ARTIFACT_BUCKET}/",
            "--serve-artifacts",
            "--allowed-hosts", f"127.0.0.1:{self.port},localhost:{self.port}",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(self.s3.env, **MLFLOW_ENV)
        self.proc = _spawn(cmd, env, self.log)
        try:
            wait_http(f"{self.uri}/health", timeout=timeout, proc=self.proc)
        except Exception as e:
            self.stop()
            raise RuntimeError(f"mlflow server did not start: {e}\n{_tail(self.log)}") from e

    def stop(self) -> None:
        _kill_group(self.proc)
        self.proc = None


class RayHead:
    """A single-node Ray head with token auth on, in its own temp dir and ports.

    The token is made the documented way (``ray get-auth-token --generate``) with HOME pointed
    at a temp dir, so the user's ~/.ray/auth_token is never read or written.
    """

    def __init__(self, num_cpus: int = 2, cluster_env: dict[str, str] | None = None) -> None:
        # Short path: Ray's unix sockets live under it and must stay under ~107 chars.
        self.root = Path(tempfile.mkdtemp(prefix="sanray-", dir="/tmp"))
        self.num_cpus = num_cpus
        # What a real cluster's `ray start` environment holds (deploy/cluster.yaml's
        # services.env, KubeRay's Secret): every job and worker inherits it.
        self.cluster_env = dict(cluster_env or {})
        # Every port the head is given, all different; the agent port is the head node's
        # job agent's HTTP port, which `start` waits for.
        (self.port, self.dashboard_port, self.agent_port, *self.other_ports) = free_ports(7)
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.token_path = self.root / "home" / ".ray" / "auth_token"
        self.temp_dir = self.root / "ray"
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "ray-start.log"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs: token auth on, the token file and the job-submission address."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_ADDRESS": self.dashboard_url,
        }

    def base_env(self) -> dict[str, str]:
        """This environment minus anything pointing at another Ray cluster or token."""
        env = {k: v for k, v in os.environ.items() if k not in _RAY_CLIENT_VARS}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        return env

    def start(self, timeout: float = 90.0) -> None:
        ray = str(BIN / "ray")
        # RAY_AUTH_TOKEN_PATH must not be set yet: with it, --generate refuses a missing file.
        gen_env = {**self.base_env(), "HOME": str(self.root / "home")}
        gen = subprocess.run(
            [ray, "get-auth-token", "--generate"],
            env=gen_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if gen.returncode != 0 or not self.token_path.is_file():
            self.stop()
            raise RuntimeError(f"ray get-auth-token --generate failed: {gen.stderr[-2000:]}")
        env = {
            **self.base_env(),
            **self.cluster_env,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
        }
        cmd = [
            ray, "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1",
            "--port", str(self.port),
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard_port),
            "--include-dashboard=true",
            "--num-cpus", str(self.num_cpus),
            "--temp-dir", str(self.temp_dir),
            "--disable-usage-stats",
            # Fixed defaults (e.g. the agent's 52365) would clash with other Ray instances.
            "--dashboard-agent-listen-port", str(self.agent_port),
            "--dashboard-agent-grpc-port", str(self.other_ports[0]),
            "--runtime-env-agent-port", str(self.other_ports[1]),
            "--metrics-export-port", str(self.other_ports[2]),
            "--ray-client-server-port", str(self.other_ports[3]),
        ]  # fmt: skip
        self.proc = _spawn(cmd, env, self.log)
        try:
            # The dashboard answers 401 without a token, which still proves it is up.
            wait_http(f"{self.dashboard_url}/api/version", timeout=timeout, proc=self.proc)
            # The dashboard hands each submission to the head node's job agent, a separate
            # process that can come up later; the dashboard waits only 10 s for it before
            # answering "No available agent to submit job", which a loaded machine can exceed.
            wait_http(f"http://127.0.0.1:{self.agent_port}/", timeout=timeout, proc=self.proc)
            self._wait_job_api(timeout)
        except Exception as e:
            log = _tail(self.log)
            self.stop()
            raise RuntimeError(f"ray head did not start: {e}\n{log}") from e

    def _wait_job_api(self, timeout: float) -> None:
        """Wait until the job API accepts our token (the head is ready for ``ray job submit``)."""
        token = self.token_path.read_text().strip()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}")
            req = urllib.request.Request(
                f"{self.dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
            )
            try:
                with urllib.request.urlopen(req, timeout=5):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"Ray job API at {self.dashboard_url} not ready in {timeout:.0f}s")

    def stop(self) -> None:
        """Stop exactly this instance: its process group, then any process naming its temp dir."""
        _kill_group(self.proc, grace=5.0)
        self.proc = None
        for _ in range(3):
            pids = _pids_mentioning(str(self.root))
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)
