"""Fuse a probe into the embedding model: one ONNX file, one call per batch.

The fused graph keeps every output of the model (`embedding` first) and adds

    probabilities [B, K] float32 = softmax(prep(embedding) @ W + b)
    label         [B]    int64   = argmax(probabilities)   (index into the class names)

where `prep` is the probe's preprocessing (standardisation for logreg/svm, L2 normalisation for
ncm), written as plain ONNX ops (Sub, Div, Mul, MatMul, Sqrt, Max, Add, Softmax, ArgMax) that
every opset >= 13 supports. A kNN probe becomes its vote instead: cosine similarities to the
stored features (MatMul), TopK, Gather of their labels, OneHot, (weighted) sums; probabilities
are the vote fractions, as in `KNNProbe.predict_proba`.

The class names go to the metadata key `unirep.probe.classes` (a JSON list, label i =
classes[i]); the probe.json document, minus its arrays, goes to `unirep.probe`. The model
description stays under `unirep.description`.

Needs the `onnx` package (a tooling dependency; applying a fused model needs onnxruntime only).
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from common.atomic import atomic_open

from .base import Probe
from .compat import model_mismatch
from .errors import FuseError
from .files import load_probe

if TYPE_CHECKING:
    from .similarity import KNNProbe

PROBE_METADATA_KEY = "unirep.probe"
CLASSES_METADATA_KEY = "unirep.probe.classes"
PROBABILITIES, LABEL = "probabilities", "label"


def _set_metadata(model, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value


def _probe_document(probe: Probe) -> dict:
    classes = probe.classes_
    return {"kind": probe.kind, "feature_dim": int(probe.n_features_in_),
            "classes": [str(c) if classes.dtype.kind == "U" else int(c) for c in classes],
            "params": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                       for k, v in probe.get_params().items()},
            "metadata": getattr(probe, "metadata_", {}) or {}}


class _GraphBuilder:
    """Appends nodes and initialisers to a graph under fresh "probe/..." names."""

    def __init__(self, graph):
        self.graph = graph
        self.nodes: list = []
        self.taken = {n for node in graph.node for n in (*node.input, *node.output)}
        self.taken |= {t.name for t in graph.initializer} | {i.name for i in graph.input}

    def fresh(self, name: str) -> str:
        base = candidate = f"probe/{name}"
        k = 0
        while candidate in self.taken:
            k += 1
            candidate = f"{base}_{k}"
        self.taken.add(candidate)
        return candidate

    def const(self, name: str, array: np.ndarray, dtype=np.float32) -> str:
        from onnx import numpy_helper
        tensor = numpy_helper.from_array(np.ascontiguousarray(array, dtype), self.fresh(name))
        self.graph.initializer.append(tensor)
        return tensor.name

    def op(self, op_type: str, inputs: list[str], name: str, extra_outputs=(), **attrs):
        """Append a node; returns its output name (a list when extra_outputs are named)."""
        from onnx import helper
        outs = [self.fresh(name)] + [self.fresh(f"{name}_{extra}") for extra in extra_outputs]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=outs[0], **attrs))
        return outs if extra_outputs else outs[0]


def _linear_form(probe: Probe) -> tuple[np.ndarray | None, np.ndarray | None, dict[str, Any]]:
    """(W, b, preprocessing) of the probe; (None, None, L2 normalisation) for a kNN vote."""
    if probe.kind == "knn":  # a vote, not a linear form
        return None, None, {"l2_normalize": True, "mean": None}
    try:
        return probe.linear_form_(dtype=np.float32)
    except NotImplementedError as e:
        raise FuseError(str(e)) from e


def _check_outputs(graph, model_path: str, embedding: str, dim: int) -> dict:
    """The graph's outputs by name, once the probe's outputs are known to fit among them."""
    outputs = {o.name: o for o in graph.output}
    if embedding not in outputs:
        raise FuseError(f"{model_path}: no output {embedding!r} to attach the probe to "
                        f"(outputs: {', '.join(outputs)})")
    for name in (PROBABILITIES, LABEL):
        if name in outputs:
            raise FuseError(f"{model_path}: already has an output {name!r} (a fused model?); "
                            "fuse into the plain exported model")
    dims = outputs[embedding].type.tensor_type.shape.dim
    if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value != dim:
        raise FuseError(f"{model_path}: embedding has {dims[1].dim_value} dims; the probe "
                        f"expects {dim}")
    return outputs


def _preprocessing_nodes(g: _GraphBuilder, x: str, prep: dict, dim: int) -> str:
    """L2 normalisation and standardisation of the embedding, as the probe applies them."""
    if prep.get("l2_normalize"):
        # ||x|| via MatMul with a ones column: no opset-dependent ReduceSum signature
        squares = g.op("Mul", [x, x], "squares")
        norm = g.op("Sqrt", [g.op("MatMul", [squares, g.const("ones", np.ones((dim, 1)))],
                                  "sum_squares")], "norm")
        x = g.op("Div", [x, g.op("Max", [norm, g.const("eps", np.array(1e-12))], "safe_norm")],
                 "l2_normalized")
    if prep.get("mean") is not None:
        x = g.op("Div", [g.op("Sub", [x, g.const("mean", prep["mean"])], "centred"),
                         g.const("scale", prep["scale"])], "standardized")
    return x


def _batch_dim(dims):
    batch = dims[0] if len(dims) else None
    if batch is None:
        return None
    return (batch.dim_param or None) if not batch.HasField("dim_value") else batch.dim_value


def fuse_probe(model_dir: str, probe: Probe | str, out_path: str, variant: str = "fp32",
               embedding: str = "embedding") -> dict:
    """Write `out_path`: the model of MODEL_DIR (or a .onnx path) with `probe` (a fitted probe
    or a probe folder) appended. Returns a summary {"classes", "opset", "outputs", "path"}.

    Raises FuseError when the probe does not match the model."""
    import onnx
    from onnx import TensorProto, helper

    from common.model_dir import ModelDir

    if isinstance(probe, (str, os.PathLike)):
        probe = load_probe(os.fspath(probe))
    md = ModelDir(model_dir)
    model_path = md.model_path(variant)
    md.check_model(variant)  # a corrupt file or foreign description: one ModelError line
    model = onnx.load(model_path)
    graph = model.graph
    problem = model_mismatch(probe, md.description.to_dict())
    if problem:
        raise FuseError(f"probe does not fit model {model_path}: {problem}")
    W, b, prep = _linear_form(probe)
    dim = int(probe.n_features_in_)
    outputs = _check_outputs(graph, model_path, embedding, dim)
    g = _GraphBuilder(graph)
    for name in (PROBABILITIES, LABEL):
        if name in g.taken:
            raise FuseError(f"{model_path}: the graph already uses the name {name!r}")

    x = embedding
    if outputs[embedding].type.tensor_type.elem_type != TensorProto.FLOAT:
        x = g.op("Cast", [x], "to_float", to=TensorProto.FLOAT)
    x = _preprocessing_nodes(g, x, prep, dim)
    if W is None or b is None:
        g.nodes.extend(_knn_nodes(probe, x, g.op, g.const))  # type: ignore[arg-type]
    else:
        logits = g.op("Add", [g.op("MatMul", [x, g.const("weight", W)], "matmul"),
                              g.const("bias", b)], "logits")
        g.nodes.append(helper.make_node("Softmax", [logits], [PROBABILITIES],
                                        name="probe/softmax", axis=1))
    g.nodes.append(helper.make_node("ArgMax", [PROBABILITIES], [LABEL], name="probe/argmax",
                                    axis=1, keepdims=0))
    graph.node.extend(g.nodes)

    batch = _batch_dim(outputs[embedding].type.tensor_type.shape.dim) or "batch"
    graph.output.append(helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT,
                                                      [batch, len(probe.classes_)]))
    graph.output.append(helper.make_tensor_value_info(LABEL, TensorProto.INT64, [batch]))
    document = _probe_document(probe)
    _set_metadata(model, PROBE_METADATA_KEY, json.dumps(document))
    _set_metadata(model, CLASSES_METADATA_KEY, json.dumps(document["classes"]))

    onnx.checker.check_model(model, full_check=True)
    out_path = os.path.abspath(out_path)
    with atomic_open(out_path, "wb") as f:
        f.write(model.SerializeToString())  # a fused model stays far below protobuf's 2 GB
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return {"path": out_path, "classes": document["classes"], "opset": opset,
            "outputs": [o.name for o in graph.output]}


def _knn_nodes(probe: KNNProbe, x: str, op, const) -> list:
    """Votes of the k most similar stored features: TopK over cosine similarities, Gather of
    their labels, OneHot, then (weighted) sums by MatMul and Reshape, which keep one signature
    across opsets (ReduceSum's changed at 13)."""
    from onnx import helper

    n_classes, k = len(probe.classes_), min(int(probe.k_), len(probe.features_))
    sims = op("MatMul", [x, const("features_t", probe.features_.T)], "similarities")
    top, indices = op("TopK", [sims, const("k", np.array([k]), np.int64)], "top",
                      extra_outputs=("indices",), axis=1, largest=1, sorted=1)
    neighbour_labels = op("Gather", [const("labels", probe.labels_, np.int64), indices],
                          "neighbour_labels")
    one_hot = op("OneHot", [neighbour_labels, const("depth", np.array([n_classes]), np.int64),
                            const("off_on", np.array([0.0, 1.0]))], "one_hot", axis=-1)
    if probe.weights == "uniform":
        weights = const("uniform", np.ones((1, 1, k)))
    else:
        positive = op("Max", [top, const("zero", np.array(0.0))], "positive_similarity")
        weights = op("Reshape", [op("Add", [positive, const("eps", np.array(1e-12))],
                                    "weights"),
                                 const("shape_b1k", np.array([-1, 1, k]), np.int64)],
                     "weights_b1k")
    votes = op("Reshape", [op("MatMul", [weights, one_hot], "votes_b1c"),
                           const("shape_bc", np.array([-1, n_classes]), np.int64)], "votes")
    total = op("MatMul", [votes, const("ones_c", np.ones((n_classes, 1)))], "total")
    return [helper.make_node("Div", [votes, total], [PROBABILITIES], name="probe/vote_fractions")]


def read_fused_classes(path: str) -> list:
    """Class names stored in a fused model (label i is classes[i]); needs onnxruntime only."""
    import onnxruntime as ort
    meta = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_modelmeta()
    text = meta.custom_metadata_map.get(CLASSES_METADATA_KEY)
    if text is None:
        raise FuseError(f"{path}: not a fused model (no '{CLASSES_METADATA_KEY}' metadata)")
    return json.loads(text)
