"""Print the runtime env for `ray job submit --runtime-env-json`: endpoints and secrets by name.

    ray job submit --working-dir . --runtime-env-json "$(python deploy/runtime_env.py)" \
        -- python pipelines/train.py --config pipelines/configs/tiny.yaml

Only the variables in pipelines.common.FORWARDED_ENV that are set in this shell are passed, so
the job's driver sees the same MLflow server and S3 endpoint as the submitting shell, and
`init_ray` forwards them on to every worker. No pip/conda section: jobs run in the cluster's
own Python (the image of deploy/Dockerfile, or the venv the head was started from), because
installing torch per job is slow and could drift from the cluster's pinned versions. The
working dir excludes (.git, .venv, outputs, caches) come from the project's .rayignore.
Values end up on the job's command line and in the dashboard: on a shared cluster, prefer a
Kubernetes Secret (deploy/kuberay) or instance roles for AWS credentials.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.common import FORWARDED_ENV  # noqa: E402


def runtime_env(environ: dict[str, str] | None = None) -> dict:
    """The runtime env dict: forwarded variables that are set, plus Ray's working-dir cwd rule."""
    environ = dict(os.environ if environ is None else environ)
    env_vars = {name: environ[name] for name in FORWARDED_ENV if environ.get(name)}
    env_vars["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # keep relative paths pointing into the working dir
    return {"env_vars": env_vars}


if __name__ == "__main__":
    print(json.dumps(runtime_env()))
