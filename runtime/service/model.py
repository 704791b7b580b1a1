"""What the service serves: a model folder, its probes, the tensors they take and give.

Inputs (one per request; the first dimension is the batch):
    image   BYTES [N]            encoded images (JPEG, PNG, ...; base64 strings in JSON)
    pixels  UINT8 [N, H, W, 3]   decoded RGB images ([H, W, 3]: one image)
Outputs (all by default; `outputs` in the request picks some):
    embedding            FP32 [N, D]     NaN rows (null in JSON) for failed items
    error                BYTES [N]       "" or why that item failed
    <probe>_label        BYTES [N]       per probe: the predicted class
    <probe>_score        FP32 [N]        its probability
    <probe>_topk_label   BYTES [N, K]    the K most likely classes
    <probe>_topk_score   FP32 [N, K]
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import UserError

from .protocol import InferRequest, ProtocolError, decode_base64

log = logging.getLogger("unirep.serve")

IMAGE_INPUT, PIXELS_INPUT = "image", "pixels"


class ProbeMismatch(UserError, ValueError):
    """A probe fitted on another backbone (or unreadable); the message says which and why."""


@dataclass
class ServedProbe:
    name: str
    probe: Any
    classes: list[str]


@dataclass
class ItemResult:
    vector: np.ndarray
    error: str
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    batch_start: float = 0.0      # perf_counter when its batch started (queue time = it - t0)
    batch_seconds: float = 0.0    # decode + model time of its batch


def parse_probe_specs(specs: list[str]) -> dict[str, str]:
    """["NAME=DIR", ...] -> {name: dir}; names are output prefixes, so [A-Za-z0-9_-] only."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--probe {spec!r}: write NAME=PROBE_DIR, e.g. mnist=probes/mnist")
        if not all(c.isalnum() or c in "_-" for c in name):
            raise ValueError(f"--probe {spec!r}: the name may hold letters, digits, _ and -")
        if name in out:
            raise ValueError(f"--probe {name!r} is given twice")
        out[name] = path
    return out


def load_probes(specs: dict[str, str], description) -> list[ServedProbe]:
    """Load each probe and check it was fitted on this backbone; ProbeMismatch says why not.
    A probe that records no fingerprint is accepted with a warning (runtime.probes)."""
    from runtime.probes import ProbeMismatchError, load_probe_for

    served = []
    for name, path in specs.items():
        try:
            probe = load_probe_for(description, path)
        except ProbeMismatchError as e:
            raise ProbeMismatch(f"--probe {name}={path}: {e.reason}") from e
        except (OSError, ValueError, KeyError) as e:
            raise ProbeMismatch(f"--probe {name}={path}: cannot load it ({e})") from e
        served.append(ServedProbe(name, probe, [str(c) for c in probe.classes_]))
    return served


def model_description(model_dir: str):
    """The model's description without opening a session (for checks before loading)."""
    from runtime.pipeline import load_description, resolve_model
    return load_description(resolve_model(model_dir))


class ServedModel:
    """The adapter (pipeline), the probes, and the tensor schema of one served model."""

    def __init__(self, model_dir: str, *, name: str | None = None,
                 probes: dict[str, str] | None = None, device: str = "auto",
                 workers: int = 2, batch_size: int = 32, top_k: int = 5):
        self.model_dir = model_dir
        self.name = name or os.path.basename(os.path.normpath(os.path.abspath(model_dir)))
        self.probe_specs = dict(probes or {})
        self.device, self.workers, self.batch_size = device, workers, batch_size
        self.top_k = top_k
        self.adapter_: Any = None
        self.probes_: list[ServedProbe] = []
        self.ready_ = threading.Event()

    def load(self) -> ServedModel:
        from .engine_adapter import EmbedAdapter
        adapter = EmbedAdapter(self.model_dir, device=self.device, workers=self.workers,
                               batch_size=self.batch_size)
        self.probes_ = load_probes(self.probe_specs, adapter.description_)
        adapter.warmup()
        self.adapter_ = adapter
        self.ready_.set()
        return self

    def close(self) -> None:
        if self.adapter_ is not None:
            self.adapter_.close()

    # -- schema ------------------------------------------------------------------------------
    def output_specs(self) -> list[dict]:
        dim = self.adapter_.feature_dim_ if self.adapter_ else -1
        specs = [{"name": "embedding", "datatype": "FP32", "shape": [-1, dim]},
                 {"name": "error", "datatype": "BYTES", "shape": [-1]}]
        for p in self.probes_:
            k = min(self.top_k, len(p.classes))
            specs += [{"name": f"{p.name}_label", "datatype": "BYTES", "shape": [-1]},
                      {"name": f"{p.name}_score", "datatype": "FP32", "shape": [-1]},
                      {"name": f"{p.name}_topk_label", "datatype": "BYTES", "shape": [-1, k]},
                      {"name": f"{p.name}_topk_score", "datatype": "FP32", "shape": [-1, k]}]
        return specs

    def metadata(self) -> dict:
        return {
            "name": self.name, "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                       {"name": PIXELS_INPUT, "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
            "outputs": self.output_specs(),
        }

    def items_from_request(self, request: InferRequest) -> list[Any]:
        """The images a request carries, in order; ProtocolError for a wrong name, datatype
        or shape."""
        known = {IMAGE_INPUT: "BYTES", PIXELS_INPUT: "UINT8"}
        for t in request.inputs:
            if t.name not in known:
                raise ProtocolError(f"unknown input {t.name!r}; this model takes `image` "
                                    "(BYTES [N], encoded images) or `pixels` (UINT8 [N,H,W,3])")
            if t.datatype != known[t.name]:
                raise ProtocolError(f"input {t.name!r} must be {known[t.name]}, got "
                                    f"{t.datatype}")
        if len(request.inputs) != 1:
            raise ProtocolError("send one input per request: `image` or `pixels`")
        t = request.inputs[0]
        if t.name == IMAGE_INPUT:
            if len(t.shape) == 2 and t.shape[1] == 1:  # [N, 1], as Triton clients often send
                pass
            elif len(t.shape) != 1:
                raise ProtocolError(f"input 'image' must have shape [N] (or [N, 1]), got "
                                    f"{list(t.shape)}")
            flat = t.data.reshape(-1)
            binary = "binary_data_size" in t.parameters
            return [x if binary else decode_base64(x, f"image[{i}]")
                    for i, x in enumerate(flat)]
        if len(t.shape) == 3:
            data = t.data[None]
        elif len(t.shape) == 4:
            data = t.data
        else:
            raise ProtocolError(f"input 'pixels' must have shape [N, H, W, 3] or [H, W, 3], got "
                                f"{list(t.shape)}")
        if data.shape[-1] != 3 or data.shape[1] < 1 or data.shape[2] < 1:
            raise ProtocolError(f"input 'pixels' must be RGB HWC with H, W >= 1: shape "
                                f"[N, H, W, 3], got {list(t.shape)}")
        return [np.ascontiguousarray(x) for x in data]

    # -- batches (in the batcher's threads) ----------------------------------------------------
    def run_batch(self, items: list[Any]) -> list[ItemResult]:
        result = self.adapter_.embed(items)
        ok = np.array([i not in result.errors for i in range(len(items))], dtype=bool)
        probs: dict[str, np.ndarray] = {}
        for p in self.probes_:
            full = np.full((len(items), len(p.classes)), np.nan, np.float32)
            if ok.any():
                full[ok] = p.probe.predict_proba(result.vectors[ok])
            probs[p.name] = full
        return [ItemResult(result.vectors[i], result.errors.get(i, ""),
                           {n: v[i] for n, v in probs.items()}) for i in range(len(items))]

    def outputs(self, results: list[ItemResult]) -> dict[str, np.ndarray]:
        """Per-item results -> the output tensors, in the order of output_specs()."""
        n = len(results)
        dim = self.adapter_.feature_dim_
        out: dict[str, np.ndarray] = {
            "embedding": (np.stack([r.vector for r in results]).astype(np.float32, copy=False)
                          if n else np.empty((0, dim), np.float32)),
            "error": _bytes_array([f"item {i}: {r.error}" if r.error else ""
                                   for i, r in enumerate(results)]),
        }
        for p in self.probes_:
            k = min(self.top_k, len(p.classes))
            probs = (np.stack([r.probs[p.name] for r in results]) if n
                     else np.empty((0, len(p.classes)), np.float32))
            order = np.argsort(-np.nan_to_num(probs, nan=-1.0), axis=1, kind="stable")[:, :k]
            failed = np.array([bool(r.error) for r in results], dtype=bool)
            top_scores = np.take_along_axis(probs, order, axis=1).astype(np.float32)
            labels = [["" if failed[i] else p.classes[j] for j in row]
                      for i, row in enumerate(order)]
            out[f"{p.name}_label"] = _bytes_array([row[0] if k else "" for row in labels])
            out[f"{p.name}_score"] = (top_scores[:, 0] if k else np.zeros(n, np.float32))
            out[f"{p.name}_topk_label"] = _bytes_array(labels).reshape(n, k)
            out[f"{p.name}_topk_score"] = top_scores
        return out


def _bytes_array(values: list) -> np.ndarray:
    flat = _ravel(values)
    arr = np.empty(len(flat), dtype=object)
    arr[:] = [v.encode() for v in flat]
    return arr


def _ravel(values: list) -> list:
    return [x for row in values for x in row] if values and isinstance(values[0], list) else values
