#!/usr/bin/env bash
# Create .venv (if missing), install the project with everything it needs, fetch the data packages.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.unirep-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  echo "[setup] installing the project and its dependencies into .venv (torch from this machine's disk)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[full,test,serve,bulk,ray,search]'
  touch "$stamp"
fi
bash scripts/setup_data.sh
bash scripts/setup_caffe2.sh
