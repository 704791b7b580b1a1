#!/usr/bin/env bash
# The GPU device check (issue 14) in one go: ResNet-50 FP16 at batch 256 on 2,048 JPEGs,
# model-only (CUDA, CUDA graphs, TensorRT FP16/INT8), end to end (GPU decode, decode processes,
# decode threads, the PyTorch DataLoader recipe), fidelity and alignment; writes
# docs/gpu/device-check-resnet50.{json,log} (and copies them to $OUT when set).
# Whole run time-boxed to 8 minutes; each stage has its own box inside (scripts/device_check.py).
#
#   PYTHONPATH=/tmp/site scripts/device_check.sh            # on the H200
#   scripts/device_check.sh --arch small_cnn --images 64 --batch-size 16   # CPU dry run
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: no GPU visible" >&2
timeout -k 10 480 "$PY" scripts/device_check.py "$@"
rc=$?
[ $rc -eq 124 ] && echo "device check stopped at 8 minutes; partial results are in docs/gpu/" >&2
exit $rc
