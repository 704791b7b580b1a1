"""The Open Inference Protocol (KServe v2) on the wire: request parsing and response encoding.

Pure functions over bytes and NumPy arrays (no web framework), so every rule is unit-tested:

    request = parse_infer_request(body, header_length)     # ProtocolError -> HTTP 400
    body, header_length = encode_infer_response(name, request.id, outputs, binary=...)

JSON tensors carry `data` (flat or nested, row-major). The binary-tensor extension: the JSON
header is followed by raw tensor bytes, its length is in the `Inference-Header-Content-Length`
HTTP header, and each binary tensor says `"parameters": {"binary_data_size": N}`. A BYTES element
in binary form is a 4-byte little-endian length followed by its bytes; in JSON, a BYTES element
is a string (this service reads image bytes from JSON as base64, see `decode_base64`).
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import UserError

HEADER_LENGTH = "Inference-Header-Content-Length"
# Shapes are checked against these before anything is allocated from them: a dimension is a
# count of elements that arrived in the body, so no real request comes near them, and NumPy
# refuses more than 64 dimensions or sizes past 2**63 with errors that are not the client's.
MAX_DIMS = 16
MAX_DIM = 2**31 - 1
MAX_ELEMENTS = 2**48

DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    "BYTES": object,
}


class ProtocolError(UserError, ValueError):
    """A request that does not follow the protocol; the message says what to fix (HTTP 400)."""


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray          # BYTES: an object array of `bytes`
    parameters: dict = field(default_factory=dict)


@dataclass
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: dict[str, bool]  # requested output name -> binary? (empty: all outputs)
    binary_outputs: bool      # default for outputs not listed (request parameter)
    parameters: dict = field(default_factory=dict)

    def input(self, name: str) -> Tensor | None:
        return next((t for t in self.inputs if t.name == name), None)


# ---------------------------------------------------------------------------------------------
# requests

def parse_infer_request(body: bytes, header_length: int | str | None = None) -> InferRequest:
    """The body of POST /v2/models/{name}/infer, JSON only or JSON header + binary tensors."""
    if header_length is not None and header_length != "":
        try:
            n = int(header_length)
        except (TypeError, ValueError):
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}"
                                ) from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
        header, binary = body[:n], memoryview(body)[n:]
    else:
        header, binary = body, memoryview(b"")
    doc = load_json(header)
    if not isinstance(doc, dict):
        raise ProtocolError("the request body must be a JSON object with an `inputs` list")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("the request needs a non-empty `inputs` list")
    params = _dict(doc.get("parameters"), "parameters")
    offset = 0
    tensors = []
    for k, spec in enumerate(inputs):
        tensor, used = _parse_input(spec, k, binary[offset:])
        offset += used
        tensors.append(tensor)
    if offset != len(binary):
        raise ProtocolError(f"the body has {len(binary) - offset} bytes after the last binary "
                            "tensor; check binary_data_size and " + HEADER_LENGTH)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ProtocolError(f"input names repeat: {names}")
    outputs: dict[str, bool] = {}
    binary_default = bool(params.get("binary_data_output", False))
    requested = doc.get("outputs") or []
    if not isinstance(requested, list):
        raise ProtocolError("`outputs` must be a list of {name, parameters?}")
    for spec in requested:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError("each entry of `outputs` needs a string `name`")
        p = _dict(spec.get("parameters"), f"outputs[{spec['name']}].parameters")
        outputs[spec["name"]] = bool(p.get("binary_data", binary_default))
    request_id = doc.get("id")
    return InferRequest(id=None if request_id is None else str(request_id), inputs=tensors,
                        outputs=outputs, binary_outputs=binary_default, parameters=params)


def load_json(text: bytes | memoryview) -> Any:
    """A JSON document from a request; ProtocolError for anything the client got wrong: bad
    syntax or encoding, nesting deeper than Python's recursion limit, an integer of more than
    4,300 digits (Python refuses to convert it)."""
    try:
        return json.loads(bytes(text))
    except RecursionError:
        raise ProtocolError("malformed JSON in the request body: it nests too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, the integer digit limit
        reason = str(e).split(";")[0][:200]
        raise ProtocolError(f"malformed JSON in the request body: {reason}") from None


def check_shape(shape: Any, name: str) -> list[int]:
    """A tensor's declared shape as a list of ints, or ProtocolError: non-negative integers,
    at most MAX_DIMS of them, each at most MAX_DIM (checked before any allocation)."""
    if (not isinstance(shape, (list, tuple)) or
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ProtocolError(f"input {name!r}: `shape` must be a list of non-negative integers, "
                            f"got {_short(shape)}")
    if (len(shape) > MAX_DIMS or any(d > MAX_DIM for d in shape)
            or math.prod(d for d in shape if d) > MAX_ELEMENTS):  # NumPy's size, zeros aside
        raise ProtocolError(f"input {name!r}: shape {_short(shape)} is out of range (at most "
                            f"{MAX_DIMS} dimensions of at most {MAX_DIM} each, {MAX_ELEMENTS} elements)")
    return [int(d) for d in shape]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _dict(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"`{where}` must be a JSON object")
    return value


def _parse_input(spec, k: int, binary: memoryview) -> tuple[Tensor, int]:
    """One entry of `inputs` -> (Tensor, binary bytes it used)."""
    if not isinstance(spec, dict):
        raise ProtocolError(f"inputs[{k}] must be an object with name, shape, datatype, data")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"inputs[{k}] needs a string `name`")
    datatype = spec.get("datatype")
    if not isinstance(datatype, str) or datatype not in DTYPES:
        raise ProtocolError(f"input {name!r}: unknown datatype {_short(datatype)}; the protocol's "
                            f"types are {', '.join(DTYPES)}")
    if not isinstance(spec.get("shape"), list):
        raise ProtocolError(f"input {name!r}: `shape` must be a list of non-negative integers, "
                            f"got {_short(spec.get('shape'))}")
    shape = check_shape(spec["shape"], name)
    count = math.prod(shape)
    params = _dict(spec.get("parameters"), f"inputs[{name}].parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in spec:
            raise ProtocolError(f"input {name!r} has both `data` and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
            raise ProtocolError(f"input {name!r}: binary_data_size {_short(size)} does not fit the "
                                f"{len(binary)} binary bytes left in the body")
        raw = binary[:size]
        if datatype == "BYTES":
            data = unpack_bytes(raw, count, name)
        else:
            dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
            if size != count * dtype.itemsize:
                raise ProtocolError(f"input {name!r}: shape {shape} of {datatype} needs "
                                    f"{count * dtype.itemsize} bytes, binary_data_size is {size}")
            data = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
        return Tensor(name, datatype, tuple(shape), data.reshape(shape), params), size
    if "data" not in spec:
        raise ProtocolError(f"input {name!r} has neither `data` nor binary_data_size")
    return Tensor(name, datatype, tuple(shape), _json_data(spec["data"], datatype, shape, name),
                  params), 0


def _json_data(data, datatype: str, shape: list[int], name: str) -> np.ndarray:
    flat = _flatten(data) if isinstance(data, list) else [data]
    if len(flat) != math.prod(shape):
        raise ProtocolError(f"input {name!r}: shape {shape} needs {math.prod(shape)} elements, "
                            f"`data` has {len(flat)}")
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise ProtocolError(f"input {name!r}: BYTES elements in JSON must be strings")
        out = np.empty(len(flat), dtype=object)
        try:
            out[:] = [x.encode() for x in flat]
        except UnicodeEncodeError:  # a lone surrogate (\ud800) is valid JSON, not UTF-8
            raise ProtocolError(f"input {name!r}: a BYTES string is not valid Unicode") from None
        return out.reshape(shape)
    dtype = DTYPES[datatype]
    if datatype == "BOOL":
        ok = all(isinstance(x, bool) for x in flat)
    elif datatype.startswith("FP"):
        ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat)
    else:
        ok = all(isinstance(x, int) and not isinstance(x, bool) for x in flat)
        if ok and flat:
            info = np.iinfo(dtype)
            ok = info.min <= min(flat) and max(flat) <= info.max
    if ok:
        try:  # an integer past float64's range (10**400) overflows on conversion
            return np.asarray(flat, dtype=dtype).reshape(shape)
        except (OverflowError, ValueError):
            pass
    raise ProtocolError(f"input {name!r}: `data` does not hold {datatype} values "
                        "(wrong type or out of range)")


def _flatten(data: list) -> list:
    out: list = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def unpack_bytes(raw, count: int, name: str = "input") -> np.ndarray:
    """Binary BYTES: `count` elements, each a 4-byte little-endian length and its bytes."""
    raw = memoryview(raw)
    if count > len(raw) // 4:  # every element needs its 4-byte length: check before allocating
        raise ProtocolError(f"input {name!r}: the shape says {count} BYTES elements but the "
                            f"{len(raw)} bytes of data hold at most {len(raw) // 4}")
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise ProtocolError(f"input {name!r}: binary BYTES data ends before element {i} "
                                f"of {count}")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ProtocolError(f"input {name!r}: element {i} says {n} bytes but only "
                                f"{len(raw) - pos} are left")
        out[i] = bytes(raw[pos:pos + n])
        pos += n
    if pos != len(raw):
        raise ProtocolError(f"input {name!r}: {len(raw) - pos} bytes left after {count} "
                            "BYTES elements; check the shape")
    return out


def pack_bytes(elements) -> bytes:
    """The binary form of BYTES elements (bytes or str)."""
    parts = []
    for x in elements:
        b = x.encode() if isinstance(x, str) else bytes(x)
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def decode_base64(value: bytes, where: str) -> bytes:
    """An image sent as a JSON BYTES string: base64 (plain or a data: URI)."""
    text = value.split(b",", 1)[1] if value.startswith(b"data:") else value
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{where}: a BYTES image in JSON must be base64 (or send it as "
                            "binary data)") from None


# ---------------------------------------------------------------------------------------------
# responses

def datatype_of(array: np.ndarray) -> str:
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    for name, dtype in DTYPES.items():
        if dtype is not object and np.dtype(dtype) == array.dtype:
            return name
    raise TypeError(f"no protocol datatype for {array.dtype}")


def encode_infer_response(model_name: str, request_id: str | None,
                          outputs: dict[str, np.ndarray], binary: dict[str, bool],
                          model_version: str | None = None) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when all outputs are JSON). NaN/inf become null in
    JSON (JSON has no NaN); in binary they stay as they are."""
    entries, blobs = [], []
    for name, array in outputs.items():
        datatype = datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary.get(name, False):
            if datatype == "BYTES":
                blob = pack_bytes(array.reshape(-1))
            else:
                blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
                             for x in array.reshape(-1)]
        elif array.dtype.kind == "f":
            flat = array.reshape(-1).astype(np.float64)
            entry["data"] = [None if not math.isfinite(x) else x for x in flat.tolist()]
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "outputs": entries}
    if model_version is not None:
        doc["model_version"] = model_version
    if request_id is not None:
        doc["id"] = request_id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
