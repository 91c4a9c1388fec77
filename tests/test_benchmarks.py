"""Smoke tests of the benchmarks: each --quick run finishes and writes its results table.

The Ray benchmarks (ray_overhead.py, scaling.py, checkpoint_path.py) are not run here:
each starts a local Ray cluster and one TorchTrainer per variant, minutes on the shared
2-core machine. Their worker code (benchmarks/common.py: build_trainer, train_loader,
timed_steps) is the same the plain-loop side uses, which these tests run;
checkpoint_path.py runs pipelines/train.py's train(), which the end-to-end tests run
with run.checkpoint_upload at its default (async for a training run) and at sync.
gpu.py runs its CPU path (no GPU here), which exercises bf16 and channels_last.
"""

import subprocess
import sys
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
