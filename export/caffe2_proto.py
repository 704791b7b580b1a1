"""Caffe2's message definitions (NetDef, OperatorDef, Argument, TensorProto, DeviceOption),
built at run time from a FileDescriptorProto, and the helpers to make, read and save them.

No Caffe2 runtime installs on current Python, so this module carries the parts of
`caffe2/proto/caffe2.proto` a deployment needs (proto2, package `caffe2`, the original field
numbers) and lets the protobuf library build the message classes: no protoc, no generated code.
It is apart from the converter (`export.caffe2`) so that the reference executor
(`export.caffe2_exec`) and readers of `.pb` files need only the schema.
"""
from __future__ import annotations

import numpy as np

from common.atomic import write_bytes_atomic

__all__ = ["NetDef", "OperatorDef", "Argument", "TensorProto", "DeviceOption", "CAFFE2_PROTO_FIELDS",
           "TENSOR_DATA_TYPES", "make_arg", "make_op", "arg_value", "args_dict", "load_net", "save_net"]

# (field name, number, label, type, type name for messages/enums, default) per message, as in
# caffe2.proto. Kept as data so tests can check the wire numbers against an independent decode.
CAFFE2_PROTO_FIELDS: dict[str, list[tuple]] = {
    "TensorProto": [
        ("dims", 1, "repeated", "int64", None, None),
        ("data_type", 2, "optional", "enum", ".caffe2.TensorProto.DataType", "FLOAT"),
        ("float_data", 3, "repeated", "float", None, None),
        ("int32_data", 4, "repeated", "int32", None, None),
        ("byte_data", 5, "optional", "bytes", None, None),
        ("string_data", 6, "repeated", "bytes", None, None),
        ("name", 7, "optional", "string", None, None),
    ],
    "Argument": [
        ("name", 1, "optional", "string", None, None),
        ("f", 2, "optional", "float", None, None),
        ("i", 3, "optional", "int64", None, None),
        ("s", 4, "optional", "bytes", None, None),
        ("floats", 5, "repeated", "float", None, None),
        ("ints", 6, "repeated", "int64", None, None),
        ("strings", 7, "repeated", "bytes", None, None),
        ("n", 8, "optional", "message", ".caffe2.NetDef", None),
        ("nets", 9, "repeated", "message", ".caffe2.NetDef", None),
    ],
    "DeviceOption": [
        ("device_type", 1, "optional", "int32", None, "0"),
        ("device_id", 2, "optional", "int32", None, None),
        ("random_seed", 3, "optional", "uint32", None, None),
    ],
    "OperatorDef": [
        ("input", 1, "repeated", "string", None, None),
        ("output", 2, "repeated", "string", None, None),
        ("name", 3, "optional", "string", None, None),
        ("type", 4, "optional", "string", None, None),
        ("arg", 5, "repeated", "message", ".caffe2.Argument", None),
        ("device_option", 6, "optional", "message", ".caffe2.DeviceOption", None),
        ("engine", 7, "optional", "string", None, None),
        ("control_input", 8, "repeated", "string", None, None),
        ("is_gradient_op", 9, "optional", "bool", None, "false"),
    ],
    "NetDef": [
        ("name", 1, "optional", "string", None, None),
        ("op", 2, "repeated", "message", ".caffe2.OperatorDef", None),
        ("type", 3, "optional", "string", None, None),
        ("num_workers", 4, "optional", "int32", None, None),
        ("device_option", 5, "optional", "message", ".caffe2.DeviceOption", None),
        ("arg", 6, "repeated", "message", ".caffe2.Argument", None),
        ("external_input", 7, "repeated", "string", None, None),
        ("external_output", 8, "repeated", "string", None, None),
    ],
}
# Only TensorProto's numeric arrays are declared packed in caffe2.proto; Argument.floats/ints are not.
_PACKED = {("TensorProto", "float_data"), ("TensorProto", "int32_data")}
TENSOR_DATA_TYPES = {"UNDEFINED": 0, "FLOAT": 1, "INT32": 2, "BYTE": 3, "STRING": 4, "BOOL": 5,
                     "UINT8": 6, "INT8": 7, "UINT16": 8, "INT16": 9, "INT64": 10, "FLOAT16": 12,
                     "DOUBLE": 13}


def _build_messages() -> dict:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    types = {"int64": F.TYPE_INT64, "int32": F.TYPE_INT32, "uint32": F.TYPE_UINT32,
             "float": F.TYPE_FLOAT, "bytes": F.TYPE_BYTES, "string": F.TYPE_STRING,
             "bool": F.TYPE_BOOL, "message": F.TYPE_MESSAGE, "enum": F.TYPE_ENUM}
    labels = {"optional": F.LABEL_OPTIONAL, "repeated": F.LABEL_REPEATED}
    file = descriptor_pb2.FileDescriptorProto(name="caffe2/proto/caffe2.proto", package="caffe2",
                                              syntax="proto2")
    for msg_name, fields in CAFFE2_PROTO_FIELDS.items():
        msg = file.message_type.add(name=msg_name)
        if msg_name == "TensorProto":
            enum = msg.enum_type.add(name="DataType")
            for name, number in TENSOR_DATA_TYPES.items():
                enum.value.add(name=name, number=number)
        for name, number, label, ftype, type_name, default in fields:
            field = msg.field.add(name=name, number=number, label=labels[label], type=types[ftype])
            if type_name:
                field.type_name = type_name
            if default is not None:
                field.default_value = default
            if (msg_name, name) in _PACKED:
                field.options.packed = True
    # A private pool: never clashes with another copy of caffe2.proto loaded in the process.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe2.{name}"))
            for name in CAFFE2_PROTO_FIELDS}


_MESSAGES = _build_messages()
NetDef = _MESSAGES["NetDef"]
OperatorDef = _MESSAGES["OperatorDef"]
Argument = _MESSAGES["Argument"]
TensorProto = _MESSAGES["TensorProto"]
DeviceOption = _MESSAGES["DeviceOption"]


def make_arg(name: str, value) -> Argument:
    """An Argument from a Python value: int -> i, float -> f, str/bytes -> s, lists -> ints/floats/strings."""
    arg = Argument(name=name)
    if isinstance(value, (bool, int, np.integer)):
        arg.i = int(value)
    elif isinstance(value, (float, np.floating)):
        arg.f = float(value)
    elif isinstance(value, str):
        arg.s = value.encode()
    elif isinstance(value, bytes):
        arg.s = value
    elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
        arg.floats.extend(value.ravel().tolist())
    else:
        values = list(np.asarray(value).ravel().tolist()) if isinstance(value, np.ndarray) else list(value)
        if all(isinstance(v, (bool, int, np.integer)) for v in values):
            arg.ints.extend(int(v) for v in values)
        elif all(isinstance(v, (int, float, np.integer, np.floating)) for v in values):
            arg.floats.extend(float(v) for v in values)
        elif all(isinstance(v, (str, bytes)) for v in values):
            arg.strings.extend(v.encode() if isinstance(v, str) else v for v in values)
        else:
            raise TypeError(f"argument {name!r}: cannot encode {value!r}")
    return arg


def make_op(op_type: str, inputs, outputs, name: str = "", **args) -> OperatorDef:
    op = OperatorDef(type=op_type, input=list(inputs), output=list(outputs), name=name)
    op.arg.extend(make_arg(k, v) for k, v in args.items() if v is not None)
    return op


def arg_value(arg: Argument):
    """The Python value of an Argument (whichever field is set; lists for repeated fields)."""
    for scalar in ("f", "i", "s", "n"):
        if arg.HasField(scalar):
            return getattr(arg, scalar)
    for repeated in ("floats", "ints", "strings", "nets"):
        if len(getattr(arg, repeated)):
            return list(getattr(arg, repeated))
    return []


def args_dict(op: OperatorDef) -> dict:
    return {a.name: arg_value(a) for a in op.arg}


def load_net(path: str) -> NetDef:
    with open(path, "rb") as f:
        return NetDef.FromString(f.read())


def save_net(net: NetDef, path: str) -> int:
    """Serialise NET to PATH atomically; returns the size in bytes."""
    data = net.SerializeToString()
    write_bytes_atomic(path, data)
    return len(data)
