#!/bin/bash
# Issue 8's GPU checks as one command, for a session that is lent a GPU machine.
#
#   bash benchmarks/gpu_device.sh "$OUT"        (on the device; OUT defaults to /tmp/gpu-checks)
#
# The device image has torch, timm, pyarrow, fsspec, scipy, pillow and pytest but not Ray
# or MLflow (and nothing can be installed there from the network), so this runs what
# needs only those: the CUDA tests (confusion matrix on the device, the training step,
# evaluation and torch.compile, also with inductor: SAN_TEST_INDUCTOR=1) and
# benchmarks/gpu.py with its torch.compile variant (bf16 autocast, channels_last, fused
# AdamW; img/s and MFU). Everything it prints is also written under OUT: nvidia-smi.txt,
# tests.log, gpu.log and gpu.md, the results table to copy into benchmarks/results/. A
# step that fails does not stop the next one; the exit status is the first failure's.
# PYTHON picks the interpreter (default python3).
set -uo pipefail
out=${1:-/tmp/gpu-checks}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
failed() { if [ "$status" -eq 0 ]; then status=$1; fi; }

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi: running on $(uname -m) CPU" >"$out/nvidia-smi.txt"
"$python" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" | tee "$out/tests.log"

SAN_TEST_INDUCTOR=1 "$python" -m pytest -q -p no:cacheprovider tests/test_metrics.py tests/test_engine.py 2>&1 |
    tee -a "$out/tests.log" || failed 1

"$python" benchmarks/gpu.py --compile --out "$out" 2>&1 | tee "$out/gpu.log" || failed 2

echo "gpu checks done (status $status): $out"
exit "$status"
