#!/usr/bin/env bash
# The runtime benchmark of the README: random-weights ResNet-18 (224 px) and the default small
# CNN (32 px), each exported fp32 + int8 (calibrated on the JPEG corpus), then `bench` on both.
# Run it on a quiet machine (check `uptime`): the figures are timings.
#
#   scripts/bench_runtime.sh                      # everything under bench-out/
#   BENCH_OUT=/tmp/b BENCH_ARGS="--repeats 1 --limit 64" scripts/bench_runtime.sh   # quick try
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${BENCH_OUT:-bench-out}
ARCHS=${BENCH_ARCHS:-"resnet18:224 small_cnn:32"}
read -r -a EXTRA <<< "${BENCH_ARGS:-}"
mkdir -p "$OUT"

CORPUS=$("$PY" -c "from benchmarks.corpus import ensure_corpus; print(ensure_corpus())")
echo "corpus: $CORPUS" >&2

for spec in $ARCHS; do
    arch=${spec%%:*}
    size=${spec##*:}
    run="$OUT/runs/$arch-$size"
    model="$OUT/models/$arch-$size"
    "$PY" -c "from train.runs import untrained_run; untrained_run('$arch', '$run', input_size=$size)"
    "$PY" cli.py export "$run" --out "$model" --int8 --calib "$CORPUS" --check-data "$CORPUS" \
        --overwrite
    uptime >&2
    "$PY" cli.py bench "$model" --images "$CORPUS" --batch-size 32 --repeats 3 \
        --out "$OUT/bench-$arch-$size.json" "${EXTRA[@]}" | tee "$OUT/bench-$arch-$size.txt"
done
