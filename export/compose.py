"""Combinations with ONNX members: several sources in one graph when some are model folders
(exported or imported ONNX files, which have no PyTorch network to re-export).

The PyTorch members (runs, named architectures) are exported together as one graph with one
output per member; each model folder's model.onnx is added beside it, its names prefixed so that
nothing collides, reading the same `image` input. Then each member's embedding is L-infinity
normalised (x / max(max|x|, 1e-12), the normalisation of every combination) and all are
concatenated into `embedding`, in the order the sources were given.

Parity: onnxruntime on the composed graph against each member's own reference (PyTorch for the
PyTorch members, onnxruntime on the member's own model.onnx for the others), normalised and
concatenated the same way in NumPy.
"""
from __future__ import annotations

import numpy as np

from . import parity as parity_mod
from .onnx_files import ExportError
from .sources import Member

EPS = 1e-12


def _as_opset(model, opset: int):
    """The model at `opset` (local functions inlined), or ExportError naming the member."""
    import onnx
    from onnx import inliner, version_converter
    model = inliner.inline_local_functions(model)
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current != opset:
        try:
            model = version_converter.convert_version(model, opset)
        except Exception as e:  # the converter raises several types for unconvertible ops
            raise ExportError(f"a model folder's graph (opset {current}) cannot be converted to "
                              f"opset {opset} to join the combination ({type(e).__name__}); "
                              "export with --opset " + str(current)) from e
    return onnx.shape_inference.infer_shapes(model)


def _member_graph(model, prefix: str, output: str):
    """The member's nodes and initializers with every name prefixed, reading `image`."""
    from onnx import compose
    prefixed = compose.add_prefix(model, prefix)
    graph = prefixed.graph
    image = prefix + "image"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == image:
                node.input[i] = "image"
    return list(graph.node), list(graph.initializer), prefix + output


def _normalise_nodes(helper, feature: str, k: int, eps_name: str, axes_name: str):
    absolute, peak, floor = f"linf{k}_abs", f"linf{k}_max", f"linf{k}_floor"
    out = f"linf{k}_out"
    return [helper.make_node("Abs", [feature], [absolute], name=absolute),
            helper.make_node("ReduceMax", [absolute, axes_name], [peak], keepdims=1, name=peak),
            helper.make_node("Max", [peak, eps_name], [floor], name=floor),
            helper.make_node("Div", [feature, floor], [out], name=out)], out


def compose_graph(members: list[Member], torch_path: str | None, torch_outputs: list[str],
                  path: str, opset: int) -> dict:
    """Write the composed graph to `path` (see the module docstring); returns its report."""
    import onnx
    from onnx import helper, numpy_helper
    nodes, inits, features, image_input, sources = [], [], [], None, []
    torch_iter = iter(torch_outputs)
    torch_graph = None
    if torch_path:
        torch_graph = _as_opset(onnx.load(torch_path), opset)
        sources.append(torch_graph)
        t_nodes, t_inits, _ = _member_graph(torch_graph, "t_", "unused")
        nodes += t_nodes
        inits += t_inits
        image_input = torch_graph.graph.input[0]
    for k, member in enumerate(members):
        if member.is_onnx:
            model = _as_opset(onnx.load(member.onnx_path), opset)
            sources.append(model)
            m_nodes, m_inits, feature = _member_graph(model, f"m{k}_", "embedding")
            nodes += m_nodes
            inits += m_inits
            image_input = image_input or model.graph.input[0]
        else:
            feature = "t_" + next(torch_iter)
        features.append(feature)
    inits += [numpy_helper.from_array(np.array([EPS], np.float32), "linf_eps"),
              numpy_helper.from_array(np.array([1], np.int64), "linf_axes")]
    normalised = []
    for k, feature in enumerate(features):
        extra, out = _normalise_nodes(helper, feature, k, "linf_eps", "linf_axes")
        nodes += extra
        normalised.append(out)
    nodes.append(helper.make_node("Concat", normalised, ["embedding"], axis=1, name="concat"))
    image = helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT,
                                          ["batch"] + [d.dim_value for d in
                                                       image_input.type.tensor_type.shape.dim[1:]])
    embedding = helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT,
                                              ["batch", None])
    graph = helper.make_graph(nodes, "unirep_combination", [image], [embedding], inits)
    domains = {o.domain: o.version for m in sources for o in m.opset_import
               if o.domain not in ("", "ai.onnx")}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] + [
        helper.make_opsetid(d, v) for d, v in sorted(domains.items())],
        producer_name="unirep-compose")
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return {"exporter": "compose", "dynamo_error": None, "nodes": len(model.graph.node),
            "members_onnx": [m.label for m in members if m.is_onnx]}


def composed_reference(members: list[Member], torch_module, torch_outputs: list[str],
                       images: np.ndarray) -> dict[str, np.ndarray]:
    """Each member's own outputs, normalised and concatenated in NumPy."""
    torch_out = (parity_mod.torch_outputs(torch_module, images, torch_outputs)
                 if torch_outputs else {})
    names = iter(torch_outputs)
    parts = []
    for member in members:
        if member.is_onnx:
            feature = parity_mod.run_onnx(member.onnx_path, images, 8)["embedding"]
        else:
            feature = torch_out[next(names)]
        peak = np.maximum(np.abs(feature).max(axis=1, keepdims=True), np.float32(EPS))
        parts.append(feature / peak)
    return {"embedding": np.concatenate(parts, axis=1).astype(np.float32)}
