"""Smoke tests of the benchmarks: each --quick run finishes and writes its results table.

The Ray benchmarks (ray_overhead.py, scaling.py, checkpoint_path.py) are not run here:
each starts a local Ray cluster and one TorchTrainer per variant, minutes on the shared
2-core machine. Their worker code (benchmarks/common.py: build_trainer, train_loader,
timed_steps) is the same the plain-loop side uses, which these tests run;
checkpoint_path.py runs pipelines/train.py's train(), which the end-to-end tests run
with run.checkpoint_upload at its default (async for a training run) and at sync.
gpu.py runs its CPU path (no GPU here), which exercises bf16 and channels_last.
"""

import itertools
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        ("cpu_step", "| 1 | bf16 + channels_last |"),
        ("eval_path", "confusion matrix only"),
        ("gpu", "bf16 + channels_last"),
        ("data_path", "endpoint cores busy"),
    ],
)
def test_benchmark_quick(name, expect, tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick", "--threads", "1"]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    text = (tmp_path / f"{name}.md").read_text()
    assert "## Result" in text and expect in text
    assert "- torch: " in text and "- machine: " in text and "--quick" in text
    # The table is printed last.
    assert proc.stdout.rstrip().splitlines()[-1].startswith("|")


def test_timed_steps_tell_the_steps_cpu_from_other_processes():
    """A process spinning beside the timed steps counts as another process's CPU, not
    the steps'; wait_until_quiet waits while it spins and returns once it has stopped."""
    from benchmarks.common import timed_steps, wait_until_quiet

    class SleepingTrainer:  # a step that uses no CPU: the CPU seen is the other processes'
        def step(self, batch):
            time.sleep(0.1)

    steps = itertools.repeat({})
    background = timed_steps(SleepingTrainer(), steps, n_steps=5, warmup=0)["other_cores"]
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        result = timed_steps(SleepingTrainer(), steps, n_steps=10, warmup=0)
        assert result["other_cores"] > background + 0.5, (background, result)
        assert result["own_cores"] < 0.3, result
        assert wait_until_quiet(max_other_cores=background + 0.5, limit_s=1.5) >= 1.5
    finally:
        spinner.kill()
        spinner.wait()
    assert wait_until_quiet(max_other_cores=background + 0.5, limit_s=20) < 10
