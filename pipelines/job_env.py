"""What a job carries to Ray: the service variables its workers need, and the version of its
code. Standard library only, so deploy/runtime_env.py runs where only `ray[default]` is
installed (the machine that submits jobs to a cluster)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Secrets a Ray worker may need. Ray writes a job's runtime env, values included, into its
# logs (runtime_env_agent.log) and the dashboard, so secrets never travel in one. Workers get
# them by inheritance instead: a local Ray's processes are started by this driver and inherit
# its environment; on a cluster every Ray process inherits the environment `ray start` ran in
# (deploy/cluster.yaml's services.env, KubeRay's san-services Secret).
SECRET_ENV = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)

# Variables a Ray worker needs to reach the same services as the driver, the secrets among
# them. Only names travel in code; the values come from the driver's environment.
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    *SECRET_ENV,
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_S3_ENDPOINT_URL",
)


# Where a job's code came from. `ray job submit` uploads the working dir without .git
# (.rayignore), so deploy/runtime_env.py sets these from the submitting checkout.
CODE_VERSION_ENV = {
    "commit": "SAN_GIT_COMMIT",
    "branch": "SAN_GIT_BRANCH",
    "dirty": "SAN_GIT_DIRTY",
}


def _git(root: Path, *args: str) -> str | None:
    """`git <args>` in the checkout at `root`: its output, or None (no git, no checkout)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def code_version(root: Path = ROOT) -> dict[str, str]:
    """{"commit", "branch", "dirty": "true"/"false"} of the code at `root` (the project):
    its git checkout, else the SAN_GIT_* variables a job was submitted with; {} when
    neither tells (a copy of the code outside git)."""
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {
            key: os.environ[var] for key, var in CODE_VERSION_ENV.items() if os.environ.get(var)
        }
    changes = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit.strip(),
        "branch": (_git(root, "rev-parse", "--abbrev-ref", "HEAD") or "").strip(),
        "dirty": "true" if changes else "false",
    }


def uncommitted_diff(root: Path = ROOT) -> str:
    """The uncommitted changes to tracked files at `root`, as `git diff HEAD` prints them."""
    return _git(root, "diff", "HEAD", "--no-ext-diff") or ""
