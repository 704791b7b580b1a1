"""Normalisation inside the model: a graph that takes NxSxSx3 uint8 crops instead of Nx3xSxS floats.

`uint8_input_model(path)` returns the exported model (any variant, or a fused-probe model) with
its float image input replaced by a uint8 NHWC one, followed by

    Transpose(NHWC -> NCHW) -> Cast(float) -> Mul(1/255) -> Sub(mean) -> Div(std) [-> Cast(fp16)]

feeding the original first layers. These are the float32 operations of
`common.images.normalize` in the same order with the same constants, so the model sees
bit-identical tensors (tested); the transpose runs on bytes, before the cast, because it is a
quarter of the memory traffic, and channels-first broadcasting is what onnxruntime's CPU kernels
do fast (mean/std over a trailing axis of 3 costs about 5x more).

Why: the decode workers then hand the model the crops as they are, a quarter of the bytes of a
float batch, and the per-pixel arithmetic runs in onnxruntime's kernels (about 0.3 CPU ms per
224 px image against 0.5 for NumPy's table lookup). On a GPU the host->device copy shrinks 4x.

The graph is built in memory with the `onnx` package (no torch); the metadata (the model
description, fused-probe classes) is kept, plus `unirep.input` = "uint8 NHWC".
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from common.description import ONNX_METADATA_KEY, ModelDescription
from common.errors import UserError

log = logging.getLogger("unirep.runtime")

INPUT_METADATA_KEY = "unirep.input"
INPUT_LAYOUT = "uint8 NHWC"
_PREFIX = "unirep_normalise"


class PrefixError(UserError, ValueError):
    """The model's input is not one a uint8 front can be put on (the float path still works)."""


@dataclass
class Uint8Model:
    model: bytes                      # serialised ModelProto, for ort.InferenceSession
    description: ModelDescription | None
    input_name: str
    float_type: str                   # "float" or "float16": what the original input took


def _metadata(model) -> dict:
    return {p.key: p.value for p in model.metadata_props}


def add_uint8_front(model, mean, std, size: int) -> str:
    """Rewrite `model` (an onnx ModelProto) in place; returns the original input's elem type
    name. The new input keeps the original input's name, so feeds and TensorRT profiles name
    the same tensor."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise PrefixError(f"expected one image input, found {len(inputs)}")
    image = inputs[0]
    tensor = image.type.tensor_type
    elem = tensor.elem_type
    if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise PrefixError(f"image input is {TensorProto.DataType.Name(elem)}, not float")
    dims = list(tensor.shape.dim)
    fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(dims) != 4 or fixed[1:] not in ([3, size, size], [3, None, None]):
        raise PrefixError(f"image input shape {fixed} is not (N, 3, {size}, {size})")
    if any(p.key == INPUT_METADATA_KEY for p in model.metadata_props):
        raise PrefixError("the model already takes uint8 input")

    name = image.name
    if any(output.name == name for output in graph.output):
        raise PrefixError("the image input is also a graph output")
    inner = f"{_PREFIX}/{name}"
    for node in graph.node:
        for k, x in enumerate(node.input):
            if x == name:
                node.input[k] = inner

    channels = (1, 3, 1, 1)
    consts = [numpy_helper.from_array(np.array(1.0 / 255.0, np.float32), f"{_PREFIX}/scale"),
              numpy_helper.from_array(np.asarray(mean, np.float32).reshape(channels),
                                      f"{_PREFIX}/mean"),
              numpy_helper.from_array(np.asarray(std, np.float32).reshape(channels),
                                      f"{_PREFIX}/std")]
    p = _PREFIX
    nodes = [helper.make_node("Transpose", [name], [f"{p}/nchw"], perm=[0, 3, 1, 2],
                              name=f"{p}/transpose"),
             helper.make_node("Cast", [f"{p}/nchw"], [f"{p}/float"], to=TensorProto.FLOAT,
                              name=f"{p}/cast"),
             helper.make_node("Mul", [f"{p}/float", f"{p}/scale"], [f"{p}/unit"],
                              name=f"{p}/mul"),
             helper.make_node("Sub", [f"{p}/unit", f"{p}/mean"], [f"{p}/centred"],
                              name=f"{p}/sub"),
             helper.make_node("Div", [f"{p}/centred", f"{p}/std"],
                              [inner if elem == TensorProto.FLOAT else f"{p}/float32"],
                              name=f"{p}/div")]
    if elem == TensorProto.FLOAT16:  # as the float path does: float32 normalisation, then cast
        nodes.append(helper.make_node("Cast", [f"{p}/float32"], [inner], to=TensorProto.FLOAT16,
                                      name=f"{p}/to_fp16"))
    for node in reversed(nodes):
        graph.node.insert(0, node)
    graph.initializer.extend(consts)

    batch = dims[0]
    new_dims = tensor.shape.dim
    kept = type(batch)()
    kept.CopyFrom(batch)
    del new_dims[:]
    new_dims.add().CopyFrom(kept)
    for value in (size, size, 3):
        new_dims.add().dim_value = value
    tensor.elem_type = TensorProto.UINT8
    entry = model.metadata_props.add()
    entry.key, entry.value = INPUT_METADATA_KEY, INPUT_LAYOUT
    return "float16" if elem == TensorProto.FLOAT16 else "float"


def uint8_input_model(model_path: str, description: ModelDescription | None = None
                      ) -> Uint8Model:
    """The model at `model_path` with a uint8 NHWC front (see the module docstring).

    `description` supplies mean/std/size when the file carries none in its metadata. Raises
    PrefixError when the model cannot take one (not one 3-channel float image input, no
    description, or too big to serialise in memory)."""
    import onnx

    model = onnx.load(model_path)
    text = _metadata(model).get(ONNX_METADATA_KEY)
    if text:
        description = ModelDescription.from_json(text)
    if description is None:
        raise PrefixError("no model description to take mean, std and size from")
    pre = description.preprocessing
    float_type = add_uint8_front(model, pre.mean, pre.std, pre.input_size)
    try:
        data = model.SerializeToString()
    except Exception as e:  # protobuf's 2 GB limit (the error type varies by protobuf build)
        raise PrefixError(f"cannot serialise the model in memory ({e})") from e
    name = next(i.name for i in model.graph.input
                if i.name not in {t.name for t in model.graph.initializer})
    return Uint8Model(data, description, name, float_type)
