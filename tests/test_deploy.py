"""deploy/: every manifest parses, names scripts that exist and sets only variables the code reads.

Plus an MLflow tracking server on a real PostgreSQL backend (started here with initdb/pg_ctl
in a temp dir, stopped at the end) with artifacts proxied to the session's S3 endpoint.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from services import MLFLOW_ENV, _kill_group, _spawn, _tail, free_port, wait_http

from pipelines.job_env import FORWARDED_ENV, SECRET_ENV

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"

# Variables the manifests may set that are Ray's own, not the project's services.
RAY_VARS = {"RAY_CHDIR_TO_TRIAL_DIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def walk(node) -> Iterator[dict]:
    """Every mapping inside a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def env_names(doc: dict) -> set[str]:
    """Variable names a manifest sets: container env, Secret keys, RayJob runtime env vars."""
    names: set[str] = set()
    for node in walk(doc):
        for item in node.get("env", []) if isinstance(node.get("env"), list) else []:
            names.add(item["name"])
        if node.get("kind") == "Secret":
            names |= set(node.get("stringData", {})) | set(node.get("data", {}))
        if isinstance(node.get("runtimeEnvYAML"), str):
            runtime_env = yaml.safe_load(node["runtimeEnvYAML"]) or {}
            names |= set(runtime_env.get("env_vars", {}))
    return names


def environ_reads(path: Path) -> set[str]:
    """Names a source file reads with os.environ.get("X") / os.environ["X"] / os.getenv("X")."""
    text = path.read_text()
    pattern = (
        r"""(?:os\.environ\.get|os\.getenv|os\.environ\[|environ\.get)\(?\s*["']([A-Z0-9_]+)"""
    )
    return set(re.findall(pattern, text))


def test_every_yaml_parses() -> None:
    files = yaml_files()
    assert {p.relative_to(DEPLOY).as_posix() for p in files} >= {
        "cluster.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-train.yaml",
        "kuberay/rayjob-tune.yaml",
        "kuberay/secret.example.yaml",
        "mlflow/docker-compose.yaml",
        "mlflow/kubernetes.yaml",
    }
    for path in files:
        docs = load_all(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            if "apiVersion" in doc:  # a Kubernetes object
                assert doc.get("kind") and doc.get("metadata", {}).get("name"), path


def test_kuberay_shapes() -> None:
    """GPU worker group with autoscaling bounds, token auth, services from the Secret."""
    for name in ("raycluster.yaml", "rayjob-train.yaml", "rayjob-tune.yaml"):
        (doc,) = load_all(KUBERAY / name)
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["authOptions"]["mode"] == "token", name
        assert spec["enableInTreeAutoscaling"] is True, name
        (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
        assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] >= 4, name
        (worker,) = gpu["template"]["spec"]["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1", name
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for container in group["template"]["spec"]["containers"]:
                secrets = [e["secretRef"]["name"] for e in container.get("envFrom", [])]
                assert secrets == ["san-services"], f"{name}: {container['name']}"


def test_entrypoints_name_existing_files() -> None:
    """RayJob entrypoints run pipelines that exist, with spaces and configs that exist."""
    scripts = set()
    for path in KUBERAY.glob("rayjob-*.yaml"):
        (doc,) = load_all(path)
        words = shlex.split(doc["spec"]["entrypoint"])
        assert words[0] == "python", path
        script = words[1]
        assert (ROOT / script).is_file(), f"{path.name}: {script} does not exist"
        scripts.add(script)
        for flag in ("--config", "--space"):
            if flag in words:
                target = words[words.index(flag) + 1]
                assert (ROOT / target).is_file(), f"{path.name}: {flag} {target} does not exist"
    assert scripts == {"pipelines/train.py", "pipelines/tune.py"}
    readme = (DEPLOY / "README.md").read_text()
    for script in set(re.findall(r"python (pipelines/\w+\.py|deploy/\w+\.py)", readme)):
        assert (ROOT / script).is_file(), f"deploy/README.md runs {script}, which does not exist"


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, arguments) of every train.py / tune.py command in README.md's and
    deploy/README.md's bash blocks and in the RayJob entrypoints."""
    texts = {p: (ROOT / p).read_text() for p in ("README.md", "deploy/README.md")}
    commands = []
    for where, text in texts.items():
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            commands += [(where, line) for line in block.replace("\\\n", " ").splitlines()]
    for path in KUBERAY.glob("rayjob-*.yaml"):
        (doc,) = load_all(path)
        commands.append((path.name, doc["spec"]["entrypoint"]))
    found = []
    for where, line in commands:
        words = shlex.split(line, comments=True)
        for script in ("pipelines/train.py", "pipelines/tune.py"):
            if script in words:
                found.append((where, script, words[words.index(script) + 1 :]))
    return found


def flag_value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def test_documentation_shows_training_and_sweep_commands() -> None:
    scripts = [script for _, script, _ in documented_commands()]
    assert scripts.count("pipelines/train.py") >= 8 and scripts.count("pipelines/tune.py") >= 3


@pytest.mark.parametrize(
    ("where", "script", "args"),
    documented_commands(),
    ids=lambda v: v if isinstance(v, str) and v.endswith((".md", ".yaml")) else "",
)
def test_documented_commands_make_valid_configs(where: str, script: str, args: list) -> None:
    """Each documented training or sweep command's config, overrides and space load: a
    `run.use_gpu=true`, which YAML reads as a bool, once failed every GPU command here."""
    from pipelines.spaces import load_space
    from pipelines.tune import sweep_config
    from san.config import load_config

    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    config = flag_value(args, "--config")
    if script.endswith("tune.py"):
        space = load_space(ROOT / flag_value(args, "--space"))
        sweep_config(space, config and str(ROOT / config), overrides)
    else:
        load_config(ROOT / (config or "pipelines/configs/default.yaml"), overrides)


def test_env_vars_are_the_ones_the_code_reads() -> None:
    """Manifests set only FORWARDED_ENV (+ Ray's own); the code reads nothing beyond it."""
    storage_reads = environ_reads(ROOT / "san" / "storage.py")
    assert storage_reads, "san/storage.py reads no variables: the pattern here is stale"
    assert storage_reads <= set(FORWARDED_ENV), storage_reads - set(FORWARDED_ENV)
    allowed = set(FORWARDED_ENV) | RAY_VARS
    for path in KUBERAY.glob("*.yaml"):
        for doc in load_all(path):
            names = env_names(doc)
            assert names <= allowed, f"{path.name} sets {sorted(names - allowed)}"
    (secret,) = load_all(KUBERAY / "secret.example.yaml")
    keys = set(secret["stringData"])
    assert {"MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= keys
    services_env = re.findall(r"([A-Z_]+)=", (DEPLOY / "cluster.yaml").read_text())
    assert set(services_env) - {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"} <= allowed
    from deploy.runtime_env import runtime_env

    # A job's runtime env carries the endpoints but never a secret (Ray logs runtime envs).
    every = {name: "x" for name in FORWARDED_ENV} | {"UNRELATED": "y"}
    expected = (set(FORWARDED_ENV) - set(SECRET_ENV)) | {"RAY_CHDIR_TO_TRIAL_DIR"}
    assert set(runtime_env(every, version={})["env_vars"]) == expected
    # and the code's version, since the job's working dir goes without .git
    version = {"commit": "0123abc", "branch": "main", "dirty": "true"}
    got = runtime_env({}, version=version)["env_vars"]
    assert {k: v for k, v in got.items() if k.startswith("SAN_GIT_")} == {
        "SAN_GIT_COMMIT": "0123abc",
        "SAN_GIT_BRANCH": "main",
        "SAN_GIT_DIRTY": "true",
    }


def test_runtime_env_script_needs_only_the_standard_library() -> None:
    """It runs on the machine that submits jobs, which deploy/README.md gives only
    ray[default] and boto3: importing torch, fsspec or pyarrow there failed, and
    `--runtime-env-json "$(...)"` then got an empty string."""
    check = (
        "import runpy, sys; runpy.run_path('deploy/runtime_env.py', run_name='__main__'); "
        "heavy = {'torch', 'pyarrow', 'fsspec', 'san', 'ray', 'mlflow'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    proc = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "env_vars" in json.loads(proc.stdout)


def test_mlflow_server_manifests() -> None:
    """PostgreSQL backend, S3 artifacts, a host-allow list; S3/DB variables only."""
    allowed = {
        "POSTGRES_USER",
        "POSTGRES_PASSWORD",
        "POSTGRES_DB",
        "PGDATA",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "MLFLOW_S3_ENDPOINT_URL",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
    }
    compose = load_all(DEPLOY / "mlflow" / "docker-compose.yaml")[0]
    command = " ".join(compose["services"]["mlflow"]["command"])
    environment = compose["services"]["mlflow"]["environment"]
    assert set(environment) <= allowed
    docs = load_all(DEPLOY / "mlflow" / "kubernetes.yaml")
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert env_names(deployment) <= allowed
    # MLflow's job runner is off in both, as the test servers run it (services.MLFLOW_ENV).
    k8s_env = {item["name"]: item.get("value") for item in container["env"]}
    for env in (environment, k8s_env):
        assert {k: env.get(k) for k in MLFLOW_ENV} == MLFLOW_ENV
    for text in (command, " ".join(container["args"])):
        assert "--backend-store-uri" in text and "postgresql+psycopg2://" in text
        assert "--artifacts-destination" in text and "s3://" in text
        assert "--allowed-hosts" in text and "--serve-artifacts" in text


def test_dockerfile_matches_the_project() -> None:
    """The image has the Ray the project pins, the same torch version, and installs the project."""
    import ray

    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+)", text, re.M)
    assert base and ray.__version__.startswith(base.group(1) + ".")
    pins = re.findall(r'"(torch==[\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pins and all(pin in text for pin in pins)
    assert "pip install --no-cache-dir -e ." in text
    for tree in ("san", "pipelines", "tune_spaces"):
        assert f"COPY --chown=ray:users {tree} ./{tree}" in text


def test_rayignore_keeps_the_upload_small(tmp_path: Path) -> None:
    """`ray job submit --working-dir .` reads .rayignore: no .git, venv, outputs or caches."""
    lines = set((ROOT / ".rayignore").read_text().split())
    assert {".git/", ".venv/", "outputs/", "__pycache__/"} <= lines
    # Build the package exactly as `ray job submit` does (Ray's own packaging code).
    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "working_dir.zip"
    create_package(str(ROOT), package, include_gitignore=True)
    import zipfile

    names = zipfile.ZipFile(package).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert not top & {".git", ".venv", "outputs", ".pytest_cache", ".ruff_cache"}, top
    assert "pipelines" in top and "san" in top
    assert package.stat().st_size < 5 * 2**20, f"upload is {package.stat().st_size} bytes"

    # The MLflow server's filled-in .env (deploy/README.md step 3) never travels.
    (tmp_path / "tree" / "deploy" / "mlflow").mkdir(parents=True)
    (tmp_path / "tree" / "deploy" / "mlflow" / ".env").write_text("AWS_SECRET_ACCESS_KEY=x\n")
    (tmp_path / "tree" / "deploy" / "mlflow" / "env.example").write_text("AWS_SECRET_ACCESS_KEY=\n")
    for ignore in (".rayignore", ".gitignore"):
        shutil.copy(ROOT / ignore, tmp_path / "tree" / ignore)
    create_package(str(tmp_path / "tree"), tmp_path / "tree.zip", include_gitignore=True)
    packed = zipfile.ZipFile(tmp_path / "tree.zip").namelist()
    assert "deploy/mlflow/env.example" in packed and "deploy/mlflow/.env" not in packed, packed


# ---------------------------------------------------------------------------------------------
# MLflow on PostgreSQL, for real


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


class Postgres:
    """A throwaway PostgreSQL cluster in a temp dir on a free 127.0.0.1 port.

    PostgreSQL refuses to run as root, so as root every command runs as the `postgres` user
    (Debian's package creates it) through runuser.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sanpg-", dir="/tmp"))
        self.data = self.root / "data"
        self.port = free_port()
        self.uri = f"postgresql+psycopg2://mlflow@127.0.0.1:{self.port}/postgres"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, user="postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def run(self, *cmd: str) -> None:
        proc = subprocess.run(
            [*self.as_user, *cmd], capture_output=True, text=True, timeout=120, cwd=self.root
        )
        assert proc.returncode == 0, f"{cmd[0]} failed: {proc.stdout[-1500:]}{proc.stderr[-1500:]}"

    def start(self) -> None:
        self.run(
            _pg_bin("initdb"), "-D", str(self.data), "-U", "mlflow", "--auth=trust", "-E", "UTF8"
        )
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root}"
        self.run(
            _pg_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "pg.log"),
            "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                [
                    *self.as_user,
                    _pg_bin("pg_ctl"),
                    "-D",
                    str(self.data),
                    "-m",
                    "fast",
                    "-w",
                    "stop",
                ],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.mark.e2e
def test_mlflow_server_on_postgres(s3_server, tmp_path: Path) -> None:
    """`mlflow server` as deploy/mlflow runs it: PostgreSQL backend, S3 artifacts, allowed hosts."""
    if not (_pg_bin("initdb") and _pg_bin("pg_ctl")):
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install -y postgresql)")
    try:
        import psycopg2  # noqa: F401  (MLflow's SQLAlchemy driver for postgresql://)
    except ImportError:
        pytest.skip("psycopg2 is not installed (pip install psycopg2-binary)")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.skip("running as root without runuser: PostgreSQL cannot be started")
    bucket = s3_server.make_bucket("mlflow-pg")
    postgres = Postgres()
    server = None
    try:
        postgres.start()
        port = free_port()
        uri = f"http://127.0.0.1:{port}"
        cmd = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", postgres.uri,
            "--artifacts-destination", f"{bucket}/artifacts",
            "--serve-artifacts",
            "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(s3_server.env, **MLFLOW_ENV)
        log = tmp_path / "mlflow.log"
        server = _spawn(cmd, env, log)
        try:
            wait_http(f"{uri}/health", timeout=180, proc=server)
        except Exception as e:
            raise AssertionError(f"mlflow server did not start: {e}\n{_tail(log)}") from e

        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        experiment = client.create_experiment("pg-check")
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "miou", 0.5, step=1)
        client.log_text(run.info.run_id, "hello", "notes/hello.txt")
        client.set_terminated(run.info.run_id)
        again = MlflowClient(uri).get_run(run.info.run_id)
        assert again.data.metrics["miou"] == 0.5 and again.info.status == "FINISHED"
        objects = s3_server.client().list_objects_v2(Bucket="mlflow-pg")["Contents"]
        assert any(o["Key"].endswith("notes/hello.txt") for o in objects)
        # The rows are in PostgreSQL, not some SQLite file.
        import psycopg2

        with psycopg2.connect(
            host="127.0.0.1", port=postgres.port, user="mlflow", dbname="postgres"
        ) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (run.info.run_id,))
                assert cur.fetchone()[0] == 1
        # A Host header outside the allow list is refused.
        request = urllib.request.Request(
            f"{uri}/api/2.0/mlflow/experiments/search?max_results=1",
            headers={"Host": f"evil.example:{port}"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code in (400, 403), json.dumps(refused.value.code)
    finally:
        _kill_group(server)
        postgres.stop()
