"""The HTTP routes of the model service (Starlette; run by uvicorn or Ray Serve).

Starlette rather than FastAPI: the protocol is parsed by our own pure code (protocol.py), so
FastAPI's pydantic models would only duplicate it, and the routes need the raw body stream to
refuse an oversize request (413) before reading it.

    service = Service(ServedModel("models/spe"), max_batch=32, ...)
    app = build_app(service)          # loads the model in a thread on startup

Every error is {"error": "..."}: 400 malformed request, 404 unknown model, 413 body too large,
503 not ready or queue full (with Retry-After), 504 timed out, 500 a bug (the process lives on).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from .batcher import Batcher, Closed, QueueFull
from .model import ServedModel
from .protocol import HEADER_LENGTH, ProtocolError, encode_infer_response, parse_infer_request

log = logging.getLogger("unirep.serve")

SERVER_NAME = "unirep"
PROTOCOL_EXTENSIONS = ["binary_tensor_data"]


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Service:
    """The served model, its batcher and metrics; loading happens in `start()`'s thread."""

    def __init__(self, model: ServedModel, *, max_batch: int = 32, max_delay_ms: float = 2.0,
                 max_queue: int = 256, timeout_s: float = 30.0, max_body_mb: float = 64.0,
                 on_fatal: Callable[[str], None] | None = None):
        from .metrics import ServiceMetrics
        self.model = model
        self.max_batch, self.max_delay_ms, self.max_queue = max_batch, max_delay_ms, max_queue
        self.timeout_s, self.max_body = timeout_s, int(max_body_mb * 1024 * 1024)
        self.on_fatal = on_fatal
        self.batcher: Batcher | None = None
        self.failure_: str | None = None
        self.metrics = ServiceMetrics(lambda: self.batcher.depth_ if self.batcher else 0)
        self._started = False

    @property
    def ready(self) -> bool:
        return self.batcher is not None

    def load(self) -> None:
        """Load and warm the model, then open the batcher (ready from then on)."""
        self._started = True  # a caller that loads first (Ray replicas): startup must not reload
        self.model.load()
        self.batcher = Batcher(self._run_batch, max_batch=self.max_batch,
                               max_delay_s=self.max_delay_ms / 1000, max_queue=self.max_queue,
                               workers=self.model.workers, on_batch=self.metrics.observe_batch)
        log.info("model %s ready (%s, %d-d, %d probes)", self.model.name,
                 self.model.adapter_.provider_, self.model.adapter_.feature_dim_,
                 len(self.model.probes_))

    def start(self) -> None:
        if self._started:
            return
        self._started = True

        def run():
            try:
                self.load()
            except Exception as e:  # reported, and the server told to stop: it cannot serve
                self.failure_ = f"{self.model.model_dir}: the model did not load: {e}"
                log.error("%s", self.failure_)
                if self.on_fatal:
                    self.on_fatal(self.failure_)
        threading.Thread(target=run, name="unirep-load", daemon=True).start()

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.model.close()

    def _run_batch(self, items: list) -> list:
        results = self.model.run_batch(items)
        failed = sum(1 for r in results if r.error)
        self.metrics.count_images(len(results) - failed, failed)
        return results

    async def embed(self, items: list) -> list:
        """Items -> per-item results through the batcher, with the per-request timeout."""
        if not self.ready:
            raise HTTPError(503, self.failure_ or "the model is still loading; retry when "
                            "/v2/health/ready says so", {"Retry-After": "1"})
        assert self.batcher is not None
        if not items:
            raise HTTPError(400, "the request holds no images")
        try:
            future = self.batcher.submit(items)
        except QueueFull as e:
            raise HTTPError(503, f"the server is overloaded: {e}; retry later",
                            {"Retry-After": "1"}) from None
        except Closed as e:
            raise HTTPError(503, str(e), {"Retry-After": "1"}) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPError(504, f"the request took longer than --timeout-s "
                            f"{self.timeout_s:g} s") from None


_INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")


def check_model(service: Service, name: str, version: str | None) -> ServedModel:
    if name != service.model.name or version not in (None, "1"):
        raise HTTPError(404, f"unknown model {name!r}"
                        + (f" version {version!r}" if version else "")
                        + f"; this server serves {service.model.name!r} (version 1)")
    return service.model


async def read_limited_body(service: Service, declared: str | None, receive) -> bytes | None:
    """The request body from ASGI `receive`, refused (413) as soon as it is known to exceed
    --max-body-mb: from Content-Length before reading anything, else while streaming. None if
    the client disconnected first."""
    limit = service.max_body
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPError(400, f"Content-Length is not a number: {declared!r}") from None
        if size > limit:
            raise HTTPError(413, f"the body has {size} bytes, more than --max-body-mb "
                            f"{limit / 2**20:g} MiB allows; send fewer or smaller images")
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise HTTPError(413, f"the body exceeds --max-body-mb {limit / 2**20:g} MiB; "
                            "send fewer or smaller images")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def failure(e: Exception, path: str) -> tuple[int, str, dict]:
    """An exception from a handler -> (status, message, headers) of the error answer."""
    if isinstance(e, HTTPError):
        return e.status, e.message, e.headers
    if isinstance(e, ProtocolError):
        return 400, str(e), {}
    log.exception("%s failed", path, exc_info=e)  # a bug costs one request, never the server
    return 500, f"internal error: {type(e).__name__}: {e}", {}


async def infer(service: Service, name: str, version: str | None, body: bytes,
                header_length: str | None) -> tuple[bytes, dict[str, str]]:
    """One infer request -> (response body, response headers); errors raise HTTPError or
    ProtocolError."""
    model = check_model(service, name, version)
    parsed = parse_infer_request(body, header_length)
    items = model.items_from_request(parsed)
    results = await service.embed(items)
    failed = [f"item {i}: {r.error}" for i, r in enumerate(results) if r.error]
    if failed and len(failed) == len(results):
        raise HTTPError(400, "; ".join(failed[:3]) + (f" (and {len(failed) - 3} more)"
                                                      if len(failed) > 3 else ""))
    outputs = model.outputs(results)
    if parsed.outputs:
        unknown = [n for n in parsed.outputs if n not in outputs]
        if unknown:
            raise HTTPError(400, f"unknown output(s) {unknown}; this model gives "
                            f"{', '.join(outputs)}")
        outputs = {n: outputs[n] for n in parsed.outputs}
    binary = {n: parsed.outputs.get(n, parsed.binary_outputs) for n in outputs}
    payload, header_length_out = encode_infer_response(model.name, parsed.id, outputs, binary,
                                                       model_version="1")
    if header_length_out is None:
        return payload, {"content-type": "application/json"}
    return payload, {"content-type": "application/octet-stream",
                     HEADER_LENGTH.lower(): str(header_length_out)}


class InferEndpoint:
    """POST /v2/models/NAME[/versions/V]/infer as a bare ASGI handler, in front of Starlette.

    Why not a Starlette route: this is the one hot path. On a small model a request costs the
    event loop about half a CPU millisecond, and Starlette's middleware, router and Response
    layers were a fifth of it; every other endpoint goes through Starlette as before."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        match = (_INFER_PATH.match(scope["path"]) if scope["type"] == "http"
                 and scope["method"] == "POST" else None)
        if match is None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        service = self.service
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        try:
            body = await read_limited_body(service, headers.get("content-length"), receive)
            if body is None:
                return  # the client went away: nobody to answer
            payload, extra = await infer(service, match.group(1), match.group(2), body,
                                         headers.get(HEADER_LENGTH.lower()))
            status = 200
        except Exception as e:
            status, message, error_headers = failure(e, scope["path"])
            payload = _error_body(message)
            extra = {"content-type": "application/json",
                     **{k.lower(): v for k, v in error_headers.items()}}
        response_headers = [(b"content-length", str(len(payload)).encode())] + [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status,
                    "headers": response_headers})
        await send({"type": "http.response.body", "body": payload})
        service.metrics.observe_request("infer", status, time.perf_counter() - start)


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def build_app(service: Service):
    """The Starlette application of `service` (starts loading the model on startup)."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def error(status: int, message: str, headers: dict | None = None) -> Response:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def observed(endpoint: str):
        def wrap(handler):
            async def route(request: Request) -> Response:
                start = time.perf_counter()
                try:
                    response = await handler(request)
                except Exception as e:
                    response = error(*failure(e, request.url.path))
                service.metrics.observe_request(endpoint, response.status_code,
                                                time.perf_counter() - start)
                return response
            return route
        return wrap

    def model_of(request: Request) -> ServedModel:
        return check_model(service, request.path_params["name"],
                           request.path_params.get("version"))

    async def read_body(request: Request) -> bytes:
        body = await read_limited_body(service, request.headers.get("content-length"),
                                       request.receive)
        if body is None:
            raise HTTPError(400, "the client disconnected before sending its whole body")
        return body

    @observed("live")
    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    @observed("ready")
    async def ready(request: Request) -> Response:
        if not service.ready:
            raise HTTPError(503, service.failure_ or "loading and warming up the model")
        return JSONResponse({"ready": True})

    @observed("server_metadata")
    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": SERVER_NAME, "version": "1",
                             "extensions": PROTOCOL_EXTENSIONS})

    @observed("model_metadata")
    async def model_metadata(request: Request) -> Response:
        model = model_of(request)
        return JSONResponse(model.metadata())

    @observed("model_ready")
    async def model_ready(request: Request) -> Response:
        model_of(request)
        if not service.ready:
            raise HTTPError(503, service.failure_ or "loading and warming up the model")
        return JSONResponse({"name": service.model.name, "ready": True})

    @observed("embed")
    async def embed_upload(request: Request) -> Response:
        """curl -F image=@cat.jpg http://127.0.0.1:8000/v1/embed (several -F for several)."""
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartParser

        body = await read_body(request)
        if "multipart/form-data" not in request.headers.get("content-type", ""):
            raise HTTPError(400, "send images as multipart/form-data, e.g. "
                            "curl -F image=@photo.jpg URL/v1/embed")

        async def stream():
            yield body

        try:
            form = await MultiPartParser(request.headers, stream(), max_files=1024,
                                         max_fields=16, max_part_size=service.max_body).parse()
        except Exception as e:
            raise HTTPError(400, f"malformed multipart body: {e}") from None
        files = [(key, value) for key, value in form.multi_items()
                 if isinstance(value, UploadFile)]
        if not files:
            raise HTTPError(400, "no file in the upload; use curl -F image=@photo.jpg")
        names = [f.filename or key for key, f in files]
        items = [await f.read() for _, f in files]
        results = await service.embed(items)
        model = service.model
        outputs = model.outputs(results)
        rows: list[dict[str, Any]] = []
        for i, (name, r) in enumerate(zip(names, results)):
            row: dict[str, Any] = {"file": name,
                                   "error": f"{name}: {r.error}" if r.error else None}
            row["embedding"] = None if r.error else [float(v) for v in r.vector]
            if model.probes_ and not r.error:
                row["probes"] = {p.name: {
                    "label": outputs[f"{p.name}_label"][i].decode(),
                    "score": float(outputs[f"{p.name}_score"][i]),
                    "top_k": [[lab.decode(), float(s)] for lab, s in zip(
                        outputs[f"{p.name}_topk_label"][i], outputs[f"{p.name}_topk_score"][i])],
                } for p in model.probes_}
            rows.append(row)
        status = 400 if all(r.error for r in results) else 200
        return JSONResponse({"model": model.name, "results": rows}, status_code=status)

    async def infer_elsewhere(request: Request) -> Response:
        raise RuntimeError("infer requests are answered by InferEndpoint")

    async def metrics(request: Request) -> Response:
        payload, content_type = service.metrics.render()
        return Response(payload, media_type=content_type)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return error(status, f"{request.method} {request.url.path}: "
                     + ("no such endpoint" if status == 404 else str(exc)))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            # in-flight requests have been answered by now (uvicorn waits for them on SIGTERM)
            await asyncio.get_running_loop().run_in_executor(None, service.stop)

    model_path = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    routes = [
        Route("/v2/health/live", live), Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route(model_path, model_metadata), Route(versioned, model_metadata),
        Route(model_path + "/ready", model_ready), Route(versioned + "/ready", model_ready),
        # POSTs never get here (InferEndpoint answers them); other methods get Starlette's 405
        Route(model_path + "/infer", infer_elsewhere, methods=["POST"]),
        Route(versioned + "/infer", infer_elsewhere, methods=["POST"]),
        Route("/v1/embed", embed_upload, methods=["POST"]),
        Route("/metrics", metrics),
    ]
    from starlette.middleware import Middleware
    return Starlette(routes=routes, lifespan=lifespan,
                     middleware=[Middleware(InferEndpoint, service=service)],
                     exception_handlers={404: not_found, 405: not_found})

