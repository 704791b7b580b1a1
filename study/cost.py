"""Inference cost of an exported model, read from its ONNX graph: its weights, and floating-point
operations per image (one multiply-add = 2 FLOPs) of its convolutions and matrix products, the layers that
carry almost all of a CNN's work (activations, additions and pooling are left out)."""
from __future__ import annotations

import math
import os

from common.model_dir import MODEL_FILE


def _shapes(model) -> dict[str, list[int]]:
    """Every tensor's static shape after shape inference with a batch of one."""
    import onnx
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = 1                  # the dynamic batch dimension
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value for d in dims]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _node_flops(node, shapes: dict[str, list[int]]) -> int:
    if node.op_type == "Conv":
        out, weight = shapes.get(node.output[0]), shapes.get(node.input[1])
        if not out or not weight or 0 in out:
            raise ValueError(f"Conv {node.name!r}: its shapes are not static")
        # weight (C_out, C_in / groups, kh, kw): each output value is one dot product of that size
        return 2 * math.prod(out) * math.prod(weight[1:])
    if node.op_type in ("Gemm", "MatMul"):
        a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not a or not out or 0 in out:
            raise ValueError(f"{node.op_type} {node.name!r}: its shapes are not static")
        inner = a[-1] if not (node.op_type == "Gemm" and any(
            at.name == "transA" and at.i for at in node.attribute)) else a[0]
        return 2 * math.prod(out) * inner
    return 0


def model_flops(model_dir: str) -> int:
    """FLOPs per image of MODEL_DIR/model.onnx (convolutions and matrix products), sub-graphs of
    a combination included (they are inlined in one graph)."""
    import onnx
    model = onnx.load(os.path.join(model_dir, MODEL_FILE))
    shapes = _shapes(model)
    return sum(_node_flops(node, shapes) for node in model.graph.node)


def model_parameters(model_dir: str) -> int:
    """Weights in MODEL_DIR/model.onnx (its floating-point initialisers; batch norms are folded
    into the convolutions, so a little under the PyTorch count)."""
    import onnx
    from onnx import TensorProto
    model = onnx.load(os.path.join(model_dir, MODEL_FILE))
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    return sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type in floats)
