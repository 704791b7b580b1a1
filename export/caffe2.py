"""ONNX -> Caffe2 conversion. The message definitions live in `export.caffe2_proto` (re-exported
here for callers of the converter).

A Caffe2 model is two nets: `init_net.pb` fills every weight blob (one `GivenTensorFill` per
float tensor) and `predict_net.pb` holds the operators, with `external_input` = the data blob then
every weight blob. `value_info.json` names the input blob and its shape. The conversion follows the
old onnx-caffe2 backend's conventions (NCHW, pads as begin+end, FC for Gemm with W as [out, in]).

Constants are folded at conversion time: Constant nodes, initializers used as shapes or axes,
sub-graphs whose inputs are all constant (evaluated with onnx's reference evaluator), and the
`Shape -> Gather -> Concat` arithmetic that exporters emit for a dynamic batch (the batch dimension
is tracked symbolically and becomes Caffe2's "copy this dimension" 0 in `Reshape`).
`export.caffe2_exec` runs the nets with NumPy to prove parity with onnxruntime.
"""
from __future__ import annotations

import collections
import json
import os

import numpy as np

from common.model_dir import CAFFE2_INIT_NET, CAFFE2_PREDICT_NET, CAFFE2_VALUE_INFO

from .caffe2_ops import UnsupportedOnnxOp, _Converter
from .caffe2_proto import (
    CAFFE2_PROTO_FIELDS,
    TENSOR_DATA_TYPES,
    Argument,
    DeviceOption,
    NetDef,
    OperatorDef,
    TensorProto,
    arg_value,
    args_dict,
    load_net,
    make_arg,
    make_op,
    save_net,
)

__all__ = ["NetDef", "OperatorDef", "Argument", "TensorProto", "DeviceOption", "TENSOR_DATA_TYPES",
           "UnsupportedOnnxOp", "onnx_to_caffe2", "convert_onnx_file", "load_net", "save_net",
           "make_arg", "make_op", "arg_value", "args_dict", "CAFFE2_PROTO_FIELDS"]


def _fill_op(name: str, value: np.ndarray) -> OperatorDef:
    if value.dtype.kind == "f":
        return make_op("GivenTensorFill", [], [name], shape=list(value.shape),
                       values=np.ascontiguousarray(value, dtype=np.float32))
    if value.dtype == np.int64:
        return make_op("GivenTensorInt64Fill", [], [name], shape=list(value.shape), values=value.ravel().tolist())
    if value.dtype.kind in "iub":
        return make_op("GivenTensorIntFill", [], [name], shape=list(value.shape),
                       values=value.astype(np.int64).ravel().tolist())
    raise UnsupportedOnnxOp(f"constant {name!r} of dtype {value.dtype} has no Caffe2 fill op")


def onnx_to_caffe2(model, net_name: str | None = None):
    """Convert an ONNX ModelProto to (init_net, predict_net, value_info).

    value_info is the classic `{input_name: [onnx_elem_type, shape]}` with the batch set to 1.
    Raises UnsupportedOnnxOp naming the op and node for anything without a Caffe2 mapping.
    """
    converter = _Converter(model)
    outputs = converter.run()
    name = net_name or model.graph.name or "model"
    init_net = NetDef(name=f"{name}_init", type="simple")
    init_net.op.extend(_fill_op(blob, value) for blob, value in converter.weights.items())
    init_net.external_output.extend(converter.weights)
    predict_net = NetDef(name=name, type="simple")
    predict_net.op.extend(converter.ops)
    predict_net.external_input.extend(converter.data_inputs + list(converter.weights))
    predict_net.external_output.extend(outputs)
    value_info = {}
    for vi in model.graph.input:
        if vi.name in converter.data_inputs:
            shape = [d if isinstance(d, int) else 1 for d in converter.shapes.get(vi.name, [])]
            value_info[vi.name] = [vi.type.tensor_type.elem_type, shape]
    return init_net, predict_net, value_info


def _shape_doc(dims) -> list:
    return [d if isinstance(d, int) else "batch" if i == 0 else str(d) for i, d in enumerate(dims)]


def convert_onnx_file(onnx_path: str, out_dir: str) -> dict:
    """Convert ONNX_PATH into OUT_DIR/{init_net.pb, predict_net.pb, value_info.json} (each written
    atomically). Returns {"ops": histogram, "init_net_bytes", "predict_net_bytes", "weights",
    "parameters", "inputs", "outputs", "files"}."""
    import onnx

    from common.description import save_json_atomic

    model = onnx.load(onnx_path)
    init_net, predict_net, value_info = onnx_to_caffe2(model)
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in
             (("init_net", CAFFE2_INIT_NET), ("predict_net", CAFFE2_PREDICT_NET), ("value_info", CAFFE2_VALUE_INFO))}
    init_bytes = save_net(init_net, paths["init_net"])
    predict_bytes = save_net(predict_net, paths["predict_net"])
    outputs = []
    for vi in model.graph.output:
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param
                for d in vi.type.tensor_type.shape.dim]
        outputs.append({"name": vi.name, "elem_type": vi.type.tensor_type.elem_type, "shape": _shape_doc(dims)})
    inputs = []
    for vi in model.graph.input:
        if vi.name in value_info:
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param
                    for d in vi.type.tensor_type.shape.dim]
            inputs.append({"name": vi.name, "elem_type": value_info[vi.name][0], "shape": _shape_doc(dims),
                           "layout": "NCHW" if len(dims) == 4 else None})
    # Classic entries first (what Caffe2 loaders read: name -> [elem_type, shape]); the "_"-prefixed
    # key spells the same out, with the dynamic batch, outputs and layout.
    document = dict(value_info)
    document["_description"] = {"inputs": inputs, "outputs": outputs, "order": "NCHW",
                                "init_net": CAFFE2_INIT_NET, "predict_net": CAFFE2_PREDICT_NET}
    save_json_atomic(paths["value_info"], document)
    params = sum(int(np.prod(arg_value(a))) for op in init_net.op for a in op.arg if a.name == "shape")
    return {"ops": dict(collections.Counter(op.type for op in predict_net.op)),
            "init_net_bytes": init_bytes, "predict_net_bytes": predict_bytes,
            "weights": len(init_net.op), "parameters": params,
            "inputs": inputs, "outputs": outputs, "files": paths}


if __name__ == "__main__":  # python -m export.caffe2 MODEL.onnx OUT_DIR
    import sys
    if len(sys.argv) != 3:
        sys.exit("usage: python -m export.caffe2 MODEL.onnx OUT_DIR   (writes init_net.pb, "
                 "predict_net.pb, value_info.json)")
    try:
        print(json.dumps(convert_onnx_file(sys.argv[1], sys.argv[2]), indent=2))
    except UnsupportedOnnxOp as e:
        sys.exit(f"error: {e}")
