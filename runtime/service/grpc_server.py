"""The gRPC transport of the data plane: KServe v2 `inference.GRPCInferenceService` with the
Triton extensions tritonclient calls (ModelConfig, ModelStatistics, RepositoryIndex), on
grpcio's asyncio server in the same event loop as the HTTP server, with the same batchers.

    server = build_grpc_server(plane, host="127.0.0.1", port=8001, max_message_mb=64)
    await server.start() ... await server.stop(grace)

The service's messages and servicer base class are the generated modules that tritonclient
ships (`tritonclient.grpc.service_pb2`, `service_pb2_grpc`; tritonclient is BSD-3-Clause,
generated from Triton's public grpc_service.proto), so `tritonclient.grpc` talks to it
unchanged. Tensors come in `raw_input_contents` (the same bytes as the HTTP binary extension:
a BYTES element is a 4-byte little-endian length and its bytes) or in typed `contents`; outputs
go back in `raw_output_contents`, in the order of `outputs`. Domain errors map to status codes
in GRPC_STATUS; the API key travels as metadata `authorization: Bearer KEY` on every call but
ServerLive, ServerReady and ModelReady.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from .dataplane import MODEL_VERSION, DataPlane
from .errors import (
    BadRequest,
    NotReady,
    Overloaded,
    ServiceError,
    TimedOut,
    TooLarge,
    Unauthenticated,
    UnknownModel,
)
from .limits import BodyBudget
from .protocol import (
    DTYPES,
    InferRequest,
    ProtocolError,
    Tensor,
    check_shape,
    datatype_of,
    pack_bytes,
    unpack_bytes,
)

log = logging.getLogger("unirep.serve")

# the one mapping from domain errors to gRPC (most specific class first)
GRPC_STATUS: list[tuple[type[Exception], grpc.StatusCode]] = [
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED), (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (ProtocolError, grpc.StatusCode.INVALID_ARGUMENT), (UnknownModel, grpc.StatusCode.NOT_FOUND),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Overloaded, grpc.StatusCode.UNAVAILABLE), (NotReady, grpc.StatusCode.UNAVAILABLE),
    (TimedOut, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ServiceError, grpc.StatusCode.INVALID_ARGUMENT),
]

# typed `contents` fields of InferTensorContents by datatype
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents",
             "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def grpc_failure(e: Exception) -> tuple[grpc.StatusCode, str]:
    for cls, code in GRPC_STATUS:
        if isinstance(e, cls):
            return code, str(e)
    log.exception("gRPC call failed", exc_info=e)  # a bug costs one call, never the server
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}"


def _rpc(endpoint: str, *, public: bool = False):
    """A servicer method: the API key (unless public), domain errors -> status, metrics."""
    def wrap(method):
        @functools.wraps(method)
        async def call(self, request, context):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if not public and self.plane.api_key is not None:
                    self.plane.authenticate(_metadata(context, "authorization"))
                return await method(self, request, context)
            except Exception as e:
                code, message = grpc_failure(e)
                await context.abort(code, message)
            finally:
                self.plane.metrics.observe_request(f"grpc_{endpoint}", code.name,
                                                   time.perf_counter() - start)
        return call
    return wrap


def _metadata(context, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v
    return None


def request_from_proto(request) -> InferRequest:
    """A ModelInferRequest -> the protocol's InferRequest (BadRequest when malformed)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for "
                         f"{len(request.inputs)} inputs; send one per input, in order")
    tensors = []
    for k, spec in enumerate(request.inputs):
        name, datatype = spec.name, spec.datatype
        if datatype not in DTYPES or datatype == "FP16" and not raw:
            raise BadRequest(f"input {name!r}: unknown datatype {datatype!r:.40}; the "
                             f"protocol's types are {', '.join(DTYPES)}")
        shape = tuple(check_shape(list(spec.shape), name))  # before anything is allocated
        count = math.prod(shape)
        if raw:
            data = _from_raw(raw[k], datatype, shape, count, name)
        else:
            data = _from_contents(spec.contents, datatype, count, name)
        # BYTES elements arrive as bytes (not base64 as in JSON): mark them as binary
        tensors.append(Tensor(name, datatype, shape, data.reshape(shape),
                              {"binary_data_size": len(raw[k]) if raw else 0}))
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise BadRequest(f"input names repeat: {names}")
    outputs = {o.name: True for o in request.outputs}
    return InferRequest(id=request.id or None, inputs=tensors, outputs=outputs,
                        binary_outputs=True, parameters=_parameters(request.parameters))


def _parameters(params) -> dict:
    """A map of InferParameter -> plain values (an unset one is left out)."""
    out = {}
    for key, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(value, choice)
    return out


def _from_raw(blob: bytes, datatype: str, shape: tuple, count: int, name: str) -> np.ndarray:
    if datatype == "BYTES":
        return unpack_bytes(blob, count, name)
    dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
    if len(blob) != count * dtype.itemsize:
        raise BadRequest(f"input {name!r}: shape {list(shape)} of {datatype} needs "
                         f"{count * dtype.itemsize} bytes, raw_input_contents has {len(blob)}")
    return np.frombuffer(blob, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)


def _from_contents(contents, datatype: str, count: int, name: str) -> np.ndarray:
    values = getattr(contents, _CONTENTS[datatype])
    if len(values) != count:
        raise BadRequest(f"input {name!r}: the shape needs {count} elements, contents has "
                         f"{len(values)} (or send raw_input_contents)")
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out
    dtype = DTYPES[datatype]
    array = np.asarray(values)
    if dtype is not np.bool_ and array.size and np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise BadRequest(f"input {name!r}: values out of range for {datatype}")
    return array.astype(dtype)


def response_to_proto(model_name: str, request_id: str | None,
                      outputs: dict[str, np.ndarray]):
    response = pb.ModelInferResponse(model_name=model_name, model_version=MODEL_VERSION,
                                     id=request_id or "")
    for name, array in outputs.items():
        datatype = datatype_of(array)
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if datatype == "BYTES":
            response.raw_output_contents.append(pack_bytes(array.reshape(-1)))
        else:
            response.raw_output_contents.append(
                np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    return response


def _parse(doc: Any, message):
    return json_format.ParseDict(doc, message, ignore_unknown_fields=True)


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The data plane behind tritonclient's generated servicer base class. The methods it
    does not override (shared memory, tracing, logging, load/unload, streaming) answer
    UNIMPLEMENTED, as the base class does."""

    def __init__(self, plane: DataPlane, *, offload_bytes: int = 64 << 10,
                 budget: BodyBudget | None = None):
        self.plane = plane
        self.offload_bytes = offload_bytes  # bigger requests are parsed in a worker thread
        self.budget = budget  # shared with HTTP: request bytes held at once, both transports

    @_rpc("live", public=True)
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.plane.live())

    @_rpc("ready", public=True)
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.plane.ready())

    @_rpc("model_ready", public=True)
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name,
                                                                  request.version))

    @_rpc("server_metadata")
    async def ServerMetadata(self, request, context):
        return _parse(self.plane.server_metadata(), pb.ServerMetadataResponse())

    @_rpc("model_metadata")
    async def ModelMetadata(self, request, context):
        return _parse(self.plane.model_metadata(request.name, request.version),
                      pb.ModelMetadataResponse())

    @_rpc("model_config")
    async def ModelConfig(self, request, context):
        return _parse({"config": self.plane.model_config(request.name, request.version)},
                      pb.ModelConfigResponse())

    @_rpc("statistics")
    async def ModelStatistics(self, request, context):
        return _parse(self.plane.model_statistics(request.name, request.version),
                      pb.ModelStatisticsResponse())

    @_rpc("repository_index")
    async def RepositoryIndex(self, request, context):
        return _parse({"models": self.plane.repository_index(request.ready)},
                      pb.RepositoryIndexResponse())

    @_rpc("infer")
    async def ModelInfer(self, request, context):
        size = request.ByteSize()
        if self.budget is not None and not self.budget.reserve(size):
            raise Overloaded(f"the server holds {self.budget.used / 2**20:.0f} MiB of requests "
                             f"(--max-buffered-mb {self.budget.limit / 2**20:g}); retry later")
        try:
            return await self._infer(request, size)
        finally:
            if self.budget is not None:
                self.budget.release(size)

    async def _infer(self, request, size: int):
        def prepare():
            parsed = request_from_proto(request)
            return (parsed, *self.plane.prepare(request.model_name, request.model_version,
                                                parsed))
        if size > self.offload_bytes:  # off the event loop that answers liveness
            parsed, endpoint, items = await asyncio.to_thread(prepare)
        else:
            parsed, endpoint, items = prepare()
        outputs = await self.plane.run(endpoint, items, parsed)
        return response_to_proto(endpoint.name, parsed.id, outputs)


def build_grpc_server(plane: DataPlane, *, host: str = "127.0.0.1", port: int = 8001,
                      max_message_mb: float = 64.0, tls: tuple[bytes, bytes] | None = None,
                      offload_bytes: int = 64 << 10, budget: BodyBudget | None = None):
    """A grpc.aio server for `plane` on host:port (not started); `tls` = (key PEM, cert PEM).
    Messages over max_message_mb are refused by grpcio with RESOURCE_EXHAUSTED."""
    limit = int(max_message_mb * 1024 * 1024)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", max(limit, 64 * 1024 * 1024)),
        ("grpc.so_reuseport", 0),  # a second server on a busy port fails instead of sharing
    ])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(plane, offload_bytes=offload_bytes, budget=budget), server)
    address = f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
    except RuntimeError:
        bound = 0
    if port and bound != port:
        raise OSError(f"gRPC could not bind {address} (in use?); choose another --grpc-port")
    return server
