#!/usr/bin/env bash
# The GPU device check (issues 14 and 26) in one go, sized for a 15-minute device window:
# ResNet-50 FP16 at batch 256 on 2,048 JPEGs, model-only (CUDA, CUDA graphs, TensorRT
# FP16/INT8), end to end (the GPU decode schedule, decode processes, decode threads, the
# PyTorch DataLoader recipe), alignment with bad items in a GPU batch, fidelity (mean cosine to
# the exact transform, probe change). The whole run is stopped at 7 minutes (6 of budget, each
# stage time-boxed inside it: scripts/device_check.py), which leaves the rest of the window to
# the machine's start, the transfers (scripts/gpu_carry/) and a rerun of some --stages.
#
# Results: $DEVICE_CHECK_OUT/device-check-ARCH.{json,log} (or --out-dir, else a temporary
# folder it prints); never the checkout's docs/gpu/ unless named: the figures are committed by
# hand after reading them.
#
#   DEVICE_CHECK_OUT=$OUT PYTHONPATH=/tmp/site scripts/device_check.sh    # on the H200 (go.sh)
#   scripts/device_check.sh --arch small_cnn --images 64 --batch-size 16  # CPU dry run
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONDONTWRITEBYTECODE=1  # nothing written into the checkout, bytecode included
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: no GPU visible" >&2
timeout -k 10 420 "$PY" scripts/device_check.py "$@"
rc=$?
[ $rc -eq 124 ] && echo "device check stopped at 7 minutes; the JSON holds every stage that finished" >&2
exit $rc
