#!/usr/bin/env bash
# Create .venv-caffe2: a Python 3.8 environment with torch 1.8.1, the last PyTorch wheel that ships
# the `caffe2` package, so exported Caffe2 nets are proven in a real Caffe2 runtime (see README,
# "Caffe2"). Skipped with a one-line reason where no Python 3.8 exists. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=.venv-caffe2
stamp=$ENV/.unirep-caffe2-installed
if [ -f "$stamp" ]; then
  exit 0
fi
PY38=${PYTHON38:-}
if [ -z "$PY38" ]; then
  for candidate in python3.8 "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.8.*/bin/python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 8))'; then
      PY38=$(command -v "$candidate"); break
    fi
  done
fi
if [ -z "$PY38" ]; then
  echo "[setup] caffe2 runtime skipped: no Python 3.8 found (set PYTHON38=/path/to/python3.8 to enable it)"
  exit 0
fi
echo "[setup] creating $ENV with $PY38: torch 1.8.1 (its caffe2 package), numpy<1.24, protobuf<4"
rm -rf "$ENV"
"$PY38" -m venv "$ENV"
"$ENV/bin/pip" install -q --disable-pip-version-check \
  "torch==1.8.1" "numpy<1.24" "protobuf<4" future six typing_extensions 2>&1 | grep -v "is ignored" || true
"$ENV/bin/python" -c "from caffe2.python import workspace" || { echo "[setup] $ENV: caffe2 does not import" >&2; exit 1; }
touch "$stamp"
