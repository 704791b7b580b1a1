"""The HTTP transport of the data plane: one route table, answered by a bare ASGI application
(run by uvicorn or Ray Serve).

    plane = DataPlane([ModelEndpoint(ServedModel("models/spe"))])
    app = build_app(plane)            # loads the models on startup (lifespan)

Why no web framework: the protocol is parsed by our own pure code (protocol.py) and the data
plane answers in dicts, so a framework would only add layers. Infer is the hot path (on a small
model a request costs the event loop about half a CPU millisecond, and Starlette's middleware,
router and Response layers were a fifth of it); every route is dispatched the same lean way:
static paths by a dict, model paths by one regex and a dict of suffixes.

Errors are {"error": "..."} with the status from HTTP_STATUS (errors.py says what each means);
an exception that is none of them is a bug: 500, logged, and the process lives on.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .dataplane import DataPlane
from .errors import (
    BadRequest,
    ClientTimeout,
    NotReady,
    Overloaded,
    ServiceError,
    TimedOut,
    TooLarge,
    Unauthenticated,
    UnknownModel,
)
from .limits import BodyBudget, Limits
from .protocol import (
    HEADER_LENGTH,
    ProtocolError,
    encode_infer_response,
    load_json,
    parse_infer_request,
)

log = logging.getLogger("unirep.serve")

# the one mapping from domain errors to HTTP (most specific class first)
HTTP_STATUS: list[tuple[type[Exception], int]] = [
    (TooLarge, 413), (ClientTimeout, 408), (BadRequest, 400), (ProtocolError, 400), (UnknownModel, 404),
    (Unauthenticated, 401), (Overloaded, 503), (NotReady, 503), (TimedOut, 504),
    (ServiceError, 400),
]


def http_failure(e: Exception, path: str) -> tuple[int, str, dict[str, str]]:
    """An exception from a handler -> (status, message, extra headers)."""
    for cls, status in HTTP_STATUS:
        if isinstance(e, cls):
            headers = {}
            retry = getattr(e, "retry_after", None)
            if retry is not None:
                headers["retry-after"] = f"{retry:g}"
            if status == 401:
                headers["www-authenticate"] = 'Bearer realm="unirep"'
            return status, str(e), headers
    log.exception("%s failed", path, exc_info=e)  # a bug costs one request, never the server
    return 500, f"internal error: {type(e).__name__}", {}


async def read_limited_body(max_body: int, declared: str | None, receive,
                            budget: BodyBudget | None = None, timeout_s: float | None = None,
                            held: list[int] | None = None) -> bytes | None:
    """The request body from ASGI `receive`, refused (TooLarge) as soon as it is known to exceed
    --max-body-mb: from Content-Length before reading anything, else while streaming. None if
    the client disconnected first.

    With a `budget`, the bytes are taken from it (Content-Length up front, else chunk by chunk)
    and added to held[0], for the caller to give back once the request is answered; Overloaded
    when all bodies in flight would exceed it. `timeout_s`: the longest wait for a chunk."""
    size = None
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest(f"Content-Length is not a number: {declared[:40]!r}") from None
        if size > max_body:
            raise TooLarge(f"the body has {size} bytes, more than --max-body-mb "
                           f"{max_body / 2**20:g} MiB allows; send fewer or smaller images")
        _take(budget, max(0, size), held)
    chunks, total = [], 0
    while True:
        try:
            async with asyncio.timeout(timeout_s):  # a timer, no task (wait_for makes one)
                message = await receive()
        except TimeoutError:
            raise ClientTimeout(f"the body did not arrive within {timeout_s:g} s of its last "
                                "part; send it at once") from None
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > max_body:
            raise TooLarge(f"the body exceeds --max-body-mb {max_body / 2**20:g} MiB; "
                           "send fewer or smaller images")
        if size is None or total > size:
            _take(budget, len(chunk), held)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _take(budget: BodyBudget | None, n: int, held: list[int] | None) -> None:
    if budget is None:
        return
    if not budget.reserve(n):
        raise Overloaded(f"the server holds {budget.used / 2**20:.0f} MiB of request bodies "
                         f"(--max-buffered-mb {budget.limit / 2**20:g}); retry later")
    if held is not None:
        held[0] += n


@dataclass
class Request:
    """What a handler sees of one HTTP request."""
    scope: dict
    receive: Any
    headers: dict[str, str]
    name: str = ""               # model name (model routes)
    version: str | None = None
    limits: Limits = field(default_factory=Limits)
    budget: BodyBudget | None = None
    held: list[int] = field(default_factory=lambda: [0])  # bytes taken from the budget

    @property
    def max_body(self) -> int:
        return self.limits.max_body

    async def body(self) -> bytes:
        body = await read_limited_body(self.limits.max_body, self.headers.get("content-length"),
                                       self.receive, self.budget, self.limits.body_timeout_s,
                                       self.held)
        if body is None:
            raise _Disconnected()
        return body


def _int_or_zero(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0  # parse_infer_request says what is wrong with it


class _Disconnected(Exception):
    """The client went away before sending its whole body: nobody to answer."""


Reply = tuple[int, bytes, dict[str, str]]
Handler = Callable[[Request], Awaitable[Reply]]


def _json(doc: Any, status: int = 200) -> Reply:
    return status, json.dumps(doc, separators=(",", ":")).encode(), \
        {"content-type": "application/json"}


@dataclass
class Route:
    method: str
    path: str         # a static path, or a model path suffix after /v2/models/NAME[/versions/V]
    endpoint: str     # the name in metrics
    handler: Handler
    public: bool = False  # served without the API key (liveness, readiness)
    model: bool = False   # under /v2/models/NAME[/versions/V]


async def _infer(plane: DataPlane, r: Request) -> Reply:
    """KServe v2 inference: parse (off the event loop when big), run, encode."""
    body = await r.body()
    declared = r.headers.get(HEADER_LENGTH.lower())
    json_bytes = len(body) if not declared else min(len(body), _int_or_zero(declared))
    if json_bytes > r.limits.max_json:
        raise TooLarge(f"the JSON part of the body has {json_bytes} bytes, more than "
                       f"--max-json-mb {r.limits.max_json / 2**20:g} MiB allows; send big "
                       "tensors as binary data (the binary tensor extension)")

    def prepare():
        request = parse_infer_request(body, declared)
        return (request, *plane.prepare(r.name, r.version, request))
    if len(body) > r.limits.offload_bytes:  # parsing must not stall the event loop
        parsed, endpoint, items = await asyncio.to_thread(prepare)
    else:
        parsed, endpoint, items = prepare()
    outputs = await plane.run(endpoint, items, parsed)
    binary = {n: parsed.outputs.get(n, parsed.binary_outputs) for n in outputs}
    encode = functools.partial(encode_infer_response, endpoint.name, parsed.id, outputs,
                               binary, model_version="1")
    elements = sum(int(v.size) for v in outputs.values())
    payload, header_length = (await asyncio.to_thread(encode) if elements > 1 << 16
                              else encode())  # a big JSON answer, off the event loop
    if header_length is None:
        return 200, payload, {"content-type": "application/json"}
    return 200, payload, {"content-type": "application/octet-stream",
                          HEADER_LENGTH.lower(): str(header_length)}


async def _search(plane: DataPlane, r: Request) -> Reply:
    """{"image": [base64 images], "k": 10} -> each image's nearest indexed ids."""
    from .protocol import decode_base64
    try:
        doc = json.loads(await r.body())
        images, k = doc["image"], int(doc.get("k", 10))
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError):
        raise BadRequest('send JSON {"image": [base64 images], "k": 10}') from None
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images) \
            or not 1 <= k <= 10_000:
        raise BadRequest('"image" must be a list of base64 strings and "k" in 1..10000')
    items = [decode_base64(x.encode(), f"image[{i}]") for i, x in enumerate(images)]
    return _json(await plane.search(r.name, r.version, items, k))


def routes(plane: DataPlane) -> list[Route]:
    """The route table: every endpoint of the HTTP API, in one place."""

    async def live(r: Request) -> Reply:
        return _json({"live": plane.live()})

    async def ready(r: Request) -> Reply:
        plane.require_ready()
        return _json({"ready": True})

    async def server_metadata(r: Request) -> Reply:
        return _json(plane.server_metadata())

    async def model_metadata(r: Request) -> Reply:
        return _json(plane.model_metadata(r.name, r.version))

    async def model_ready(r: Request) -> Reply:
        plane.endpoint(r.name, r.version).require_ready()
        return _json({"name": r.name, "ready": True})

    async def model_config(r: Request) -> Reply:
        return _json(plane.model_config(r.name, r.version))

    async def model_stats(r: Request) -> Reply:
        return _json(plane.model_statistics(r.name, r.version))

    async def all_stats(r: Request) -> Reply:
        return _json(plane.model_statistics())

    async def repository_index(r: Request) -> Reply:
        body = await r.body()
        ready_only = False
        if body.strip():
            doc = load_json(body)
            ready_only = bool(isinstance(doc, dict) and doc.get("ready"))
        return _json(plane.repository_index(ready_only))

    async def infer(r: Request) -> Reply:
        return await _infer(plane, r)

    async def embed_upload(r: Request) -> Reply:
        from .upload import embed_upload as run
        return _json(*await run(plane, r.scope, r.headers, await r.body(), r.max_body,
                                r.limits.offload_bytes))

    async def search(r: Request) -> Reply:
        return await _search(plane, r)

    async def metrics(r: Request) -> Reply:
        payload, content_type = plane.metrics.render()
        return 200, payload, {"content-type": content_type}

    return [
        Route("GET", "/v2/health/live", "live", live, public=True),
        Route("GET", "/v2/health/ready", "ready", ready, public=True),
        Route("GET", "/v2", "server_metadata", server_metadata),
        Route("GET", "/v2/models/stats", "statistics", all_stats),
        Route("POST", "/v2/repository/index", "repository_index", repository_index),
        Route("POST", "/v1/embed", "embed", embed_upload),
        Route("GET", "/metrics", "metrics", metrics, public=plane.metrics_public),
        Route("POST", "/infer", "infer", infer, model=True),
        Route("POST", "/search", "search", search, model=True),
        Route("GET", "", "model_metadata", model_metadata, model=True),
        Route("GET", "/ready", "model_ready", model_ready, public=True, model=True),
        Route("GET", "/config", "model_config", model_config, model=True),
        Route("GET", "/stats", "statistics", model_stats, model=True),
    ]


_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/[a-z]+)?$")


class HttpApp:
    """The ASGI application: lifespan (start/stop the plane) and the route table."""

    def __init__(self, plane: DataPlane, *, max_body_mb: float = 64.0,
                 manage_plane: bool = True, limits: Limits | None = None,
                 budget: BodyBudget | None = None):
        self.plane = plane
        self.limits = limits or Limits(max_body=int(max_body_mb * 1024 * 1024),
                                       max_buffered=max(4 * int(max_body_mb * 2**20), 256 << 20))
        self.max_body = self.limits.max_body
        self.budget = budget or BodyBudget(self.limits.max_buffered)
        self.manage_plane = manage_plane
        self.static: dict[str, dict[str, Route]] = {}
        self.model: dict[str, dict[str, Route]] = {}
        for route in routes(plane):
            table = self.model if route.model else self.static
            table.setdefault(route.path, {})[route.method] = route

    def _match(self, path: str) -> tuple[dict[str, Route] | None, str, str | None]:
        by_method = self.static.get(path)
        if by_method is not None:
            return by_method, "", None
        m = _MODEL_PATH.match(path)
        if m is None:
            return None, "", None
        return self.model.get(m.group(3) or ""), m.group(1), m.group(2)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        start = time.perf_counter()
        by_method, name, version = self._match(scope["path"])
        route = by_method.get(scope["method"]) if by_method else None
        endpoint = route.endpoint if route else "unknown"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        request = Request(scope, receive, headers, name, version, self.limits, self.budget)
        try:
            if route is None:
                status, payload, extra = self._no_route(scope, by_method)
            else:
                if not route.public and self.plane.api_key is not None:
                    self.plane.authenticate(headers.get("authorization"))
                status, payload, extra = await route.handler(request)
        except _Disconnected:
            self.budget.release(request.held[0])
            return
        except Exception as e:
            status, message, error_headers = http_failure(e, scope["path"])
            payload = json.dumps({"error": message}).encode()
            extra = {"content-type": "application/json", **error_headers}
        response_headers = [(b"content-length", str(len(payload)).encode())] + [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
        try:
            await send({"type": "http.response.start", "status": status,
                        "headers": response_headers})
            await send({"type": "http.response.body", "body": payload})
        finally:
            self.budget.release(request.held[0])
        self.plane.metrics.observe_request(endpoint, status, time.perf_counter() - start)

    @staticmethod
    def _no_route(scope, by_method: dict[str, Route] | None) -> Reply:
        where = f"{scope['method']} {scope['path']}"
        if by_method:
            allowed = ", ".join(sorted(by_method))
            status, payload, headers = _json({"error": f"{where}: method not allowed; use "
                                                       f"{allowed}"}, 405)
            return status, payload, {**headers, "allow": allowed}
        return _json({"error": f"{where}: no such endpoint"}, 404)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.manage_plane:
                    self.plane.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # in-flight requests have been answered by now (uvicorn waits on SIGTERM)
                if self.manage_plane:
                    with contextlib.suppress(Exception):
                        await asyncio.get_running_loop().run_in_executor(None, self.plane.stop)
                await send({"type": "lifespan.shutdown.complete"})
                return


def build_app(plane: DataPlane, *, max_body_mb: float = 64.0,
              manage_plane: bool = True, limits: Limits | None = None,
              budget: BodyBudget | None = None) -> HttpApp:
    """The HTTP application of `plane` (with manage_plane, it starts loading the models on
    startup and stops them on shutdown; `serve` does that itself, around both transports)."""
    return HttpApp(plane, max_body_mb=max_body_mb, manage_plane=manage_plane, limits=limits,
                   budget=budget)
