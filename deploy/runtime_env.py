"""Print the runtime env for `ray job submit --runtime-env-json`: service endpoints, no secrets.

    ray job submit --working-dir . --runtime-env-json "$(python deploy/runtime_env.py)" \
        -- python pipelines/train.py --config pipelines/configs/tiny.yaml

Only the variables in pipelines.job_env.FORWARDED_ENV that are set in this shell and are not
secrets (pipelines.job_env.SECRET_ENV) are passed, so the job's driver sees the same MLflow server
and S3 endpoint as the submitting shell, and `init_ray` forwards them on to every worker.
Secrets (S3 keys, MLflow credentials) never travel in a runtime env: Ray writes runtime envs,
values included, into its logs and shows them in the dashboard. They belong to the cluster:
the environment `ray start` runs in (deploy/cluster.yaml's services.env, KubeRay's
`san-services` Secret), which every job and worker inherits. A secret set in this shell is
named on stderr as not forwarded. No pip/conda section: jobs run in the cluster's
own Python (the image of deploy/Dockerfile, or the venv the head was started from), because
installing torch per job is slow and could drift from the cluster's pinned versions. The
working dir excludes (.git, .venv, outputs, caches) come from the project's .rayignore;
so that the job's MLflow runs still name the code they ran, the submitting checkout's git
commit, branch and dirty flag go as SAN_GIT_* variables (pipelines.job_env.code_version).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.job_env import (  # noqa: E402 - the standard library only: no torch needed here
    CODE_VERSION_ENV,
    FORWARDED_ENV,
    SECRET_ENV,
    code_version,
)


def runtime_env(
    environ: dict[str, str] | None = None, version: dict[str, str] | None = None
) -> dict:
    """The runtime env dict: forwarded non-secret variables that are set, the code's
    version (`version`, by default this checkout's), plus Ray's cwd rule."""
    environ = dict(os.environ if environ is None else environ)
    version = code_version() if version is None else version
    env_vars = {
        name: environ[name]
        for name in FORWARDED_ENV
        if environ.get(name) and name not in SECRET_ENV
    }
    env_vars |= {CODE_VERSION_ENV[key]: value for key, value in version.items() if value}
    env_vars["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # keep relative paths pointing into the working dir
    return {"env_vars": env_vars}


if __name__ == "__main__":
    held_back = [name for name in SECRET_ENV if os.environ.get(name)]
    if held_back:
        print(
            f"note: not forwarding secrets {', '.join(held_back)}: set them where the cluster's "
            "`ray start` runs (deploy/README.md)",
            file=sys.stderr,
        )
    print(json.dumps(runtime_env()))
