"""Proof that exported Caffe2 nets compute what the ONNX graph computes, by two executors.

1. The NumPy reference executor (`export.caffe2_exec`), always: it proves our reading of the files.
2. The real Caffe2 runtime (torch 1.8.1's `caffe2`, in `.venv-caffe2`; `export.caffe2_runtime`)
   when that environment exists: it proves that a Caffe2 deployment runs them. Without it the
   report says so and the reference proof stands alone.

Both are compared with onnxruntime on the same real images (batch 1 and 7), against the export's
fp32 tolerance; a refusal or a failed comparison by either is an ExportError naming the output.
"""
from __future__ import annotations

import os
import time

import numpy as np

from common.model_dir import CAFFE2_INIT_NET, CAFFE2_PREDICT_NET

from . import caffe2_runtime
from . import parity as parity_mod
from .onnx_files import ExportError


def _real_runtime_proof(model_path: str, init_net: str, predict_net: str, images: np.ndarray,
                        timeout: float) -> dict:
    """The real runtime against onnxruntime, or {"available": False, "reason": ...}."""
    try:
        python = caffe2_runtime.find_caffe2_python()
        info = caffe2_runtime.runtime_info(python)
    except caffe2_runtime.Caffe2Unavailable as e:
        return {"available": False, "reason": str(e)}
    sizes = [bs for bs in parity_mod.BATCH_SIZES if bs <= len(images)] or [len(images)]
    t0 = time.perf_counter()
    try:
        results, run_info = caffe2_runtime.run_real_caffe2(
            init_net, predict_net, [images[:bs] for bs in sizes], timeout=timeout, python=python)
    except caffe2_runtime.Caffe2RuntimeError as e:
        raise ExportError(f"the real Caffe2 runtime refused the converted nets: {e}. Export "
                          "without --format caffe2, or report the operator named here") from e
    by_size = dict(zip(sizes, results))
    result = parity_mod.check_against(model_path, lambda batch: by_size[len(batch)], images,
                                      label="Caffe2 runtime", batch_sizes=tuple(sizes))
    result.update(available=True, runtime=info["runtime"], python=info["python"],
                  ops=run_info["ops"], run_s=round(time.perf_counter() - t0, 3))
    return result


def prove_caffe2(model_path: str, out_dir: str, images: np.ndarray, *,
                 timeout: float = caffe2_runtime.DEFAULT_TIMEOUT_S) -> dict:
    """Convert MODEL_PATH's graph into OUT_DIR's nets and prove them; export.json's parity.caffe2.

    The top level keeps the reference executor's figures (as before); `real_runtime` holds the
    real runtime's (or why there is none) and `proved_by` names the executors that passed.
    """
    from . import caffe2, caffe2_exec

    t0 = time.perf_counter()
    info = caffe2.convert_onnx_file(model_path, out_dir)
    convert_s = time.perf_counter() - t0
    init_net, predict_net = (os.path.join(out_dir, n) for n in (CAFFE2_INIT_NET, CAFFE2_PREDICT_NET))

    def run_reference(batch):
        return caffe2_exec.run_caffe2(init_net, predict_net, {"image": batch})
    result = parity_mod.check_against(model_path, run_reference, images, label="Caffe2 reference executor")
    result["executor"] = "reference (export/caffe2_exec.py, NumPy)"
    result["convert_s"] = round(convert_s, 3)
    result["converter"] = {k: v for k, v in (info or {}).items()
                           if isinstance(v, (str, int, float, bool, list, dict))}
    real = _real_runtime_proof(model_path, init_net, predict_net, images, timeout)
    result["real_runtime"] = real
    result["proved_by"] = ["reference executor"] + ([real["runtime"]] if real.get("available") else [])
    return result
