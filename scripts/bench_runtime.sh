#!/usr/bin/env bash
# The runtime benchmark of the README, kept under its old name: it lives in
# benchmarks/bench_runtime.py now (`make bench`, or `python -m benchmarks.bench_runtime`).
#
#   scripts/bench_runtime.sh                      # everything under bench-out/
#   BENCH_OUT=/tmp/b BENCH_ARGS="--repeats 1 --limit 64" scripts/bench_runtime.sh   # quick try
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m benchmarks.bench_runtime "$@"
