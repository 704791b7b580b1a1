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
from typing import Any

import numpy as np

from common.atomic import atomic_open
from common.errors import UserError

from .probes import KNNProbe, Probe, load_probe, model_mismatch

PROBE_METADATA_KEY = "unirep.probe"
CLASSES_METADATA_KEY = "unirep.probe.classes"
PROBABILITIES, LABEL = "probabilities", "label"


class FuseError(UserError, ValueError):
    """The probe cannot be fused into this model; the message says why and what to do."""


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


def fuse_probe(model_dir: str, probe: Probe | str, out_path: str, variant: str = "fp32",
               embedding: str = "embedding") -> dict:
    """Write `out_path`: the model of MODEL_DIR (or a .onnx path) with `probe` (a fitted probe
    or a probe folder) appended. Returns a summary {"classes", "opset", "outputs", "path"}.

    Raises FuseError when the probe does not match the model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

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

    W: np.ndarray | None
    b: np.ndarray | None
    prep: dict[str, Any]
    if isinstance(probe, KNNProbe):
        W = b = None
        prep = {"l2_normalize": True, "mean": None}
    else:
        try:
            W, b, prep = probe.linear_form_(dtype=np.float32)
        except NotImplementedError as e:
            raise FuseError(str(e)) from e
    dim = int(probe.n_features_in_)

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

    taken = {n for node in graph.node for n in (*node.input, *node.output)}
    taken |= {t.name for t in graph.initializer} | {i.name for i in graph.input}

    for name in (PROBABILITIES, LABEL):
        if name in taken:
            raise FuseError(f"{model_path}: the graph already uses the name {name!r}")

    def fresh(name: str) -> str:
        base = candidate = f"probe/{name}"
        k = 0
        while candidate in taken:
            k += 1
            candidate = f"{base}_{k}"
        taken.add(candidate)
        return candidate

    def const(name: str, array: np.ndarray, dtype=np.float32) -> str:
        tensor = numpy_helper.from_array(np.ascontiguousarray(array, dtype), fresh(name))
        graph.initializer.append(tensor)
        return tensor.name

    nodes = []

    def op(op_type: str, inputs: list[str], name: str, extra_outputs=(), **attrs):
        """Append a node; returns its output name (a list when extra_outputs are named)."""
        outs = [fresh(name)] + [fresh(f"{name}_{extra}") for extra in extra_outputs]
        nodes.append(helper.make_node(op_type, inputs, outs, name=outs[0], **attrs))
        return outs if extra_outputs else outs[0]

    x = embedding
    if outputs[embedding].type.tensor_type.elem_type != TensorProto.FLOAT:
        x = op("Cast", [x], "to_float", to=TensorProto.FLOAT)
    if prep.get("l2_normalize"):
        # ||x|| via MatMul with a ones column: no opset-dependent ReduceSum signature
        squares = op("Mul", [x, x], "squares")
        norm = op("Sqrt", [op("MatMul", [squares, const("ones", np.ones((dim, 1)))],
                                 "sum_squares")], "norm")
        x = op("Div", [x, op("Max", [norm, const("eps", np.array(1e-12))], "safe_norm")],
               "l2_normalized")
    if prep.get("mean") is not None:
        x = op("Div", [op("Sub", [x, const("mean", prep["mean"])], "centred"),
                       const("scale", prep["scale"])], "standardized")
    if isinstance(probe, KNNProbe):
        nodes.extend(_knn_nodes(probe, x, op, const))
    else:
        assert W is not None and b is not None  # every probe but kNN has a linear form
        logits = op("Add", [op("MatMul", [x, const("weight", W)], "matmul"), const("bias", b)],
                    "logits")
        nodes.append(helper.make_node("Softmax", [logits], [PROBABILITIES],
                                      name="probe/softmax", axis=1))
    nodes.append(helper.make_node("ArgMax", [PROBABILITIES], [LABEL], name="probe/argmax",
                                  axis=1, keepdims=0))
    graph.node.extend(nodes)

    batch = dims[0] if len(dims) else None
    batch_dim = (batch.dim_param or None) if batch is not None and not batch.HasField(
        "dim_value") else (batch.dim_value if batch is not None else None)
    graph.output.append(helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT,
                                                      [batch_dim or "batch", len(probe.classes_)]))
    graph.output.append(helper.make_tensor_value_info(LABEL, TensorProto.INT64,
                                                      [batch_dim or "batch"]))
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
        raise ValueError(f"{path}: not a fused model (no '{CLASSES_METADATA_KEY}' metadata)")
    return json.loads(text)
