"""The real Caffe2 runtime, run in its own Python 3.8 environment as a subprocess with a time limit.

Caffe2 left PyTorch after 1.8, so it cannot be imported here: `make caffe2-env` builds
`.venv-caffe2/` (Python 3.8, torch 1.8.1 with its `caffe2` package) and `export/caffe2_worker.py`
runs the nets there. Arrays cross as `.npz` files read with `allow_pickle=False`.

    python = find_caffe2_python()          # path, or raises Caffe2Unavailable with the reason
    outputs = run_real_caffe2(init, predict, [batch1, batch16])   # [{output name: array}, ...]
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import numpy as np

from common.errors import UserError

ENV_VAR = "UNIREP_CAFFE2_PYTHON"
ENV_DIR = ".venv-caffe2"
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "caffe2_worker.py")
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TIMEOUT_S = 600.0


class Caffe2Unavailable(UserError):
    """No real Caffe2 runtime here (no environment, or it does not import)."""


class Caffe2RuntimeError(UserError, RuntimeError):
    """The real Caffe2 runtime refused or failed a net; the message says why in one line."""


def find_caffe2_python() -> str:
    """The interpreter of the Caffe2 environment: $UNIREP_CAFFE2_PYTHON, else .venv-caffe2/."""
    explicit = os.environ.get(ENV_VAR)
    path = explicit or os.path.join(PROJECT_ROOT, ENV_DIR, "bin", "python")
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        where = f"${ENV_VAR}={explicit}" if explicit else os.path.join(PROJECT_ROOT, ENV_DIR)
        raise Caffe2Unavailable(f"no Caffe2 runtime at {where}: run `make caffe2-env` (needs a Python 3.8)")
    return path


def runtime_info(python: str | None = None, timeout: float = 120.0) -> dict:
    """{"python": ..., "runtime": "caffe2 (torch 1.8.1)"} of a working environment, else raises."""
    python = python or find_caffe2_python()
    code = ("import sys, torch; from caffe2.python import workspace; "
            "print('%d.%d.%d' % sys.version_info[:3], torch.__version__)")
    try:
        done = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Caffe2Unavailable(f"the Caffe2 environment {python} does not start: {e}") from e
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise Caffe2Unavailable(f"the Caffe2 environment {python} does not import caffe2: {last}")
    version, torch_version = done.stdout.split()
    return {"python": version, "runtime": f"caffe2 (torch {torch_version})", "interpreter": python}


def run_real_caffe2(init_net: str, predict_net: str, batches: list[np.ndarray],
                    timeout: float = DEFAULT_TIMEOUT_S, python: str | None = None) -> tuple[list[dict], dict]:
    """Run the nets on each batch in the real runtime: ([{output: array} per batch], run info)."""
    python = python or find_caffe2_python()
    work = tempfile.mkdtemp(prefix="unirep-caffe2-")
    try:
        inputs, outputs = os.path.join(work, "inputs.npz"), os.path.join(work, "outputs.npz")
        np.savez(inputs, **{f"b{i}": np.ascontiguousarray(b, np.float32) for i, b in enumerate(batches)})
        # -I: isolated, so neither PYTHONPATH nor the worker's own folder (where export/caffe2.py
        # would shadow the real `caffe2` package) reaches the other interpreter's sys.path.
        command = [python, "-I", WORKER, os.path.abspath(init_net), os.path.abspath(predict_net), inputs, outputs]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise Caffe2RuntimeError(f"the Caffe2 runtime took longer than {timeout:.0f} s on "
                                     f"{predict_net}; raise the limit or use fewer images") from e
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
            raise Caffe2RuntimeError(f"Caffe2 runtime on {predict_net}: {lines[-1].strip()}")
        info = json.loads(done.stdout.strip().splitlines()[-1])
        with np.load(outputs, allow_pickle=False) as archive:
            results = [{name: archive[f"b{i}/{name}"] for name in info["outputs"]} for i in range(len(batches))]
        return results, info
    finally:
        shutil.rmtree(work, ignore_errors=True)
