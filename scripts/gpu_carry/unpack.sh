#!/usr/bin/env bash
# Device machine: join the three carried onnxruntime-gpu parts and unpack them into /tmp/site.
set -euo pipefail
mv .c3/ort.part2 /tmp/parts/
cat /tmp/parts/ort.part0 /tmp/parts/ort.part1 /tmp/parts/ort.part2 > /tmp/ort.tar.xz
[ "$(sha256sum /tmp/ort.tar.xz | cut -c1-64)" = "$(cat .c3/ort.sha)" ] || { echo "parts do not join: checksum differs" >&2; exit 1; }
mkdir -p /tmp/site && tar -xJf /tmp/ort.tar.xz -C /tmp/site && rm -rf /tmp/parts /tmp/ort.tar.xz
PYTHONPATH=/tmp/site python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
