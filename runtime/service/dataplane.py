"""The data plane: every model the server serves, behind one transport-independent API.

    plane = DataPlane([ModelEndpoint(ServedModel("models/spe"), max_batch=32)], api_key="k")
    plane.start()                                  # loads every model in its own thread
    plane.model_metadata("spe")                    # dicts in the protocol's JSON form
    endpoint, outputs = await plane.infer("spe", None, request)   # a parsed InferRequest

The HTTP routes (app.py) and the gRPC servicer (grpc_server.py) are thin transports over it:
they parse their wire format into `protocol.InferRequest`, call the plane and map the domain
errors it raises (errors.py) to their own status codes. Answers are plain dicts in the shape of
the Open Inference Protocol / Triton JSON (the gRPC side parses them into its messages), so both
transports give the same metadata, config, statistics and index.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .batcher import Batcher, Closed, Expired, QueueFull
from .errors import BadRequest, NotReady, Overloaded, TimedOut, Unauthenticated, UnknownModel
from .limits import return_memory
from .model import ItemResult, ServedModel
from .protocol import InferRequest, ProtocolError

log = logging.getLogger("unirep.serve")

SERVER_NAME = "unirep"
SERVER_VERSION = "1"
MODEL_VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics",
              "model_repository"]
RESERVED_NAMES = {"stats"}  # /v2/models/stats is every model's statistics
# A batch slower than this gave memory back to the system after it (malloc_trim costs ~15 ms
# on a fragmented heap, so not after every batch; big blocks go back by themselves, see
# limits.tune_allocator)
HEAVY_BATCH_S = 0.5


class _Stats:
    """Triton-style counters of one model (success/fail/queue/compute: count and ns)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inference_count = self.execution_count = 0
        self.last_inference_ms = 0
        self.durations = {k: [0, 0] for k in ("success", "fail", "queue", "compute_input",
                                              "compute_infer", "compute_output")}
        self.batches: dict[int, list[int]] = {}  # batch size -> [count, ns]

    def batch(self, size: int, seconds: float) -> None:
        with self.lock:
            self.execution_count += 1
            entry = self.batches.setdefault(size, [0, 0])
            entry[0] += 1
            entry[1] += int(seconds * 1e9)

    def request(self, ok: bool, images: int, total_s: float, queue_s: float = 0.0,
                compute_s: float = 0.0) -> None:
        with self.lock:
            self.last_inference_ms = int(time.time() * 1000)
            d = self.durations["success" if ok else "fail"]
            d[0] += 1
            d[1] += int(total_s * 1e9)
            if ok:
                self.inference_count += images
                for key, seconds in (("queue", queue_s), ("compute_infer", compute_s)):
                    self.durations[key][0] += 1
                    self.durations[key][1] += int(seconds * 1e9)

    def as_dict(self, name: str) -> dict:
        with self.lock:
            return {
                "name": name, "version": MODEL_VERSION,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {k: {"count": c, "ns": ns}
                                    for k, (c, ns) in self.durations.items()},
                "batch_stats": [{"batch_size": size,
                                 "compute_infer": {"count": c, "ns": ns}}
                                for size, (c, ns) in sorted(self.batches.items())],
            }


class ModelEndpoint:
    """One served model with its own batcher, readiness and statistics.

    `compute_infer` in the statistics is the batch's decode + model time (the pipeline runs
    them as one step); `queue` is the wait from submission to the start of its batch."""

    def __init__(self, model: ServedModel, *, max_batch: int = 32, max_delay_ms: float = 2.0,
                 max_queue: int = 256, timeout_s: float = 30.0):
        self.model = model
        self.max_batch, self.max_delay_ms, self.max_queue = max_batch, max_delay_ms, max_queue
        self.timeout_s = timeout_s
        self.batcher: Batcher | None = None
        self.failure_: str | None = None
        self.stats = _Stats()
        self.metrics: Any = None  # ServiceMetrics, set by the DataPlane
        self.search_index: Any = None  # a runtime.search.SearchIndex (`serve --index`)
        self._started = False

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def ready(self) -> bool:
        return self.batcher is not None

    @property
    def queue_depth(self) -> int:
        return self.batcher.depth_ if self.batcher else 0

    def load(self) -> None:
        """Load and warm the model, then open the batcher (ready from then on)."""
        self._started = True  # a caller that loads first (Ray replicas): start() must not reload
        self.model.load()
        self.batcher = Batcher(self._run_batch, max_batch=self.max_batch,
                               max_delay_s=self.max_delay_ms / 1000, max_queue=self.max_queue,
                               workers=self.model.workers, on_batch=self._on_batch)
        log.info("model %s ready (%s, %d-d, %d probes)", self.name,
                 self.model.adapter_.provider_, self.model.adapter_.feature_dim_,
                 len(self.model.probes_))

    def start(self, on_fatal: Callable[[str], None] | None = None) -> None:
        """Load in a thread of its own; a failure is kept in failure_ and reported."""
        if self._started:
            return
        self._started = True

        def run():
            try:
                self.load()
            except Exception as e:  # reported, and the server told to stop: it cannot serve
                self.failure_ = f"{self.model.model_dir}: the model did not load: {e}"
                log.error("%s", self.failure_)
                if on_fatal:
                    on_fatal(self.failure_)
        threading.Thread(target=run, name=f"unirep-load-{self.name}", daemon=True).start()

    def stop(self, timeout: float | None = None) -> bool:
        """Close the batcher (queued requests are refused once `timeout` s have passed) and
        the model; False when a batch was still running at the deadline (left to the process
        exit: onnxruntime cannot be interrupted)."""
        done = True
        if self.batcher is not None:
            done = self.batcher.close(timeout)
        if done:
            self.model.close()
        return done

    def _on_batch(self, size: int, seconds: float) -> None:
        self.stats.batch(size, seconds)
        if self.metrics is not None:
            self.metrics.observe_batch(size, seconds)

    def _run_batch(self, items: list) -> list[ItemResult]:
        start = time.perf_counter()
        try:
            results = self.model.run_batch(items)
        finally:
            if time.perf_counter() - start > HEAVY_BATCH_S:  # big decodes: give memory back
                return_memory()
        seconds = time.perf_counter() - start
        for r in results:
            r.batch_start, r.batch_seconds = start, seconds
        if self.metrics is not None:
            failed = sum(1 for r in results if r.error)
            self.metrics.count_images(len(results) - failed, failed)
        return results

    def require_ready(self) -> None:
        if not self.ready:
            raise NotReady(self.failure_ or f"model {self.name!r} is still loading; retry "
                           "when /v2/health/ready says so")

    async def embed(self, items: list) -> list[ItemResult]:
        """Items -> per-item results through the batcher, with the per-request timeout."""
        self.require_ready()
        assert self.batcher is not None
        if not items:
            raise BadRequest("the request holds no images")
        start = time.perf_counter()
        try:  # past its timeout a request is dropped unrun, even if nobody cancels it
            future = self.batcher.submit(items, deadline=time.monotonic() + self.timeout_s)
        except QueueFull as e:
            self.stats.request(False, len(items), 0.0)
            raise Overloaded(f"the server is overloaded: {e}; retry later") from None
        except Closed as e:
            raise NotReady(str(e)) from None
        try:
            results = await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except (asyncio.TimeoutError, Expired):
            future.cancel()  # still queued: it never runs (the batcher drops cancelled ones)
            self.stats.request(False, len(items), time.perf_counter() - start)
            raise TimedOut(f"the request took longer than --timeout-s {self.timeout_s:g} s"
                           ) from None
        except Closed as e:  # the server stopped before this request's batch ran
            self.stats.request(False, len(items), time.perf_counter() - start)
            raise NotReady(str(e)) from None
        except Exception:
            self.stats.request(False, len(items), time.perf_counter() - start)
            raise
        first = results[0]
        self.stats.request(True, len(items), time.perf_counter() - start,
                           queue_s=max(0.0, first.batch_start - start),
                           compute_s=first.batch_seconds)
        return results

    def config(self) -> dict:
        """The model configuration in Triton's JSON form (tritonclient's get_model_config).

        max_batch_size 0 with explicit -1 batch dimensions: a request may carry any number of
        images (more than --max-batch run alone); the dynamic batcher groups requests."""
        meta = self.model.metadata()
        types = {"BYTES": "TYPE_STRING", "UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32"}

        def tensors(specs):
            return [{"name": s["name"], "data_type": types[s["datatype"]], "dims": s["shape"]}
                    for s in specs]
        return {
            "name": self.name, "platform": meta["platform"], "backend": "unirep",
            "max_batch_size": 0, "input": tensors(meta["inputs"]),
            "output": tensors(meta["outputs"]),
            "dynamic_batching": {
                "preferred_batch_size": [self.max_batch],
                "max_queue_delay_microseconds": int(self.max_delay_ms * 1000),
                "default_queue_policy": {"max_queue_size": self.max_queue,
                                         "default_timeout_microseconds":
                                             int(self.timeout_s * 1e6)}},
            "instance_group": [{"name": self.name, "count": self.model.workers,
                                "kind": "KIND_CPU" if self.model.device == "cpu"
                                else "KIND_AUTO"}],
            "parameters": {"probes": {"string_value": ",".join(
                p.name for p in self.model.probes_)}},
        }


class DataPlane:
    """The served models, readiness, access control and the protocol's answers."""

    def __init__(self, endpoints: list[ModelEndpoint], *, api_key: str | None = None,
                 metrics_public: bool = False):
        from .metrics import ServiceMetrics
        names = [e.name for e in endpoints]
        if not endpoints:
            raise ValueError("the data plane needs at least one model")
        if len(set(names)) != len(names):
            raise ValueError(f"model names repeat: {names}; give each folder its own name")
        reserved = RESERVED_NAMES.intersection(names)
        if reserved:
            raise ValueError(f"model name {sorted(reserved)[0]!r} is reserved by the protocol "
                             "(/v2/models/stats); rename it")
        self.endpoints = {e.name: e for e in endpoints}
        self.api_key = api_key or None
        self.metrics_public = metrics_public
        self.metrics = ServiceMetrics(lambda: sum(e.queue_depth for e in endpoints))
        for e in endpoints:
            e.metrics = self.metrics
        self.on_fatal: Callable[[str], None] | None = None

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        for e in self.endpoints.values():
            e.start(self.on_fatal)

    def load(self) -> None:
        """Load every model in this thread (Ray replicas: ready only once warm)."""
        for e in self.endpoints.values():
            e.load()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop every endpoint within `timeout` seconds in all; False when some batch was
        still running then."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = True
        for e in self.endpoints.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done = e.stop(left) and done
        return done

    @property
    def failure_(self) -> str | None:
        return next((e.failure_ for e in self.endpoints.values() if e.failure_), None)

    # -- access --------------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> None:
        """`authorization` is the HTTP header or the gRPC metadata value: `Bearer KEY`."""
        if self.api_key is None:
            return
        if not authorization:
            raise Unauthenticated("this server needs an API key: send the header "
                                  "'authorization: Bearer KEY'")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()):
            raise Unauthenticated("the API key is wrong (send 'authorization: Bearer KEY')")

    def endpoint(self, name: str, version: str | None = None) -> ModelEndpoint:
        e = self.endpoints.get(name)
        if e is None or version not in (None, "", MODEL_VERSION):
            served = ", ".join(repr(n) for n in self.endpoints)
            raise UnknownModel(f"unknown model {name!r}"
                               + (f" version {version!r}" if version else "")
                               + f"; this server serves {served} (version {MODEL_VERSION})")
        return e

    # -- health and metadata -------------------------------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return all(e.ready for e in self.endpoints.values())

    def require_ready(self) -> None:
        for e in self.endpoints.values():
            e.require_ready()

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return self.endpoint(name, version).ready

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str | None = None) -> dict:
        e = self.endpoint(name, version)
        meta = e.model.metadata()
        if e.search_index is not None:
            from .neighbours import neighbour_specs
            meta["outputs"] = [*meta["outputs"], *neighbour_specs()]
        return meta

    def model_config(self, name: str, version: str | None = None) -> dict:
        return self.endpoint(name, version).config()

    def model_statistics(self, name: str = "", version: str | None = None) -> dict:
        chosen = [self.endpoint(name, version)] if name else list(self.endpoints.values())
        return {"model_stats": [e.stats.as_dict(e.name) for e in chosen]}

    def repository_index(self, ready_only: bool = False) -> list[dict]:
        out = []
        for e in self.endpoints.values():
            state = "READY" if e.ready else ("UNAVAILABLE" if e.failure_ else "LOADING")
            if ready_only and state != "READY":
                continue
            out.append({"name": e.name, "version": MODEL_VERSION, "state": state,
                        "reason": e.failure_ or ""})
        return out

    # -- similarity search (`serve --index`: an index of this model's embeddings) --------------
    async def search(self, name: str, version: str | None, items: list,
                     k: int) -> dict[str, Any]:
        """Embed `items` with the model and list each one's k nearest indexed ids, as `cli.py
        search --format jsonl` does: {"model", "results": [{"neighbours": [{"id", "score"}]}
        or {"error"}]}."""
        import numpy as np
        e = self.endpoint(name, version)
        if e.search_index is None:
            raise BadRequest(f"model {e.name!r} has no similarity index; start the server with "
                             f"--index {e.name}=INDEX_DIR (made by `cli.py index build`)")
        results = await e.embed(items)
        ok = [i for i, r in enumerate(results) if not r.error]
        found = []
        if ok:
            queries = np.stack([results[i].vector for i in ok])
            found = await asyncio.get_running_loop().run_in_executor(
                None, e.search_index.neighbours, queries, k)
        by_row = dict(zip(ok, found))
        rows = [{"error": f"item {i}: {r.error}"} if r.error else
                {"neighbours": [{"id": n, "score": s} for n, s in by_row[i]]}
                for i, r in enumerate(results)]
        return {"model": e.name, "k": int(k), "results": rows}

    # -- inference -----------------------------------------------------------------------------
    def prepare(self, name: str, version: str | None,
                request: InferRequest) -> tuple[ModelEndpoint, list]:
        """A parsed request -> (its endpoint, the images it carries); BadRequest when its
        tensors do not fit the model. Pure CPU work: the transports run it in a worker thread
        for big requests."""
        e = self.endpoint(name, version)
        try:
            return e, e.model.items_from_request(request)
        except ProtocolError as err:
            raise BadRequest(str(err)) from None

    async def run(self, e: ModelEndpoint, items: list,
                  request: InferRequest) -> dict[str, Any]:
        """The prepared images through the endpoint's batcher -> the output tensors the request
        asked for, in order."""
        results = await e.embed(items)
        failed = [f"item {i}: {r.error}" for i, r in enumerate(results) if r.error]
        if failed and len(failed) == len(results):
            raise BadRequest("; ".join(failed[:3]) + (f" (and {len(failed) - 3} more)"
                                                      if len(failed) > 3 else ""))
        outputs = e.model.outputs(results)
        if request.outputs:
            outputs.update(await self._neighbours(e, results, request))
            unknown = [n for n in request.outputs if n not in outputs]
            if unknown:
                raise BadRequest(f"unknown output(s) {unknown}; this model gives "
                                 f"{', '.join(outputs)}")
            outputs = {n: outputs[n] for n in request.outputs}
        return outputs

    async def _neighbours(self, e: ModelEndpoint, results: list[ItemResult],
                          request: InferRequest) -> dict[str, Any]:
        """The neighbour outputs when the request names them (runtime/service/neighbours.py)."""
        from . import neighbours
        if not neighbours.wanted(request.outputs):
            return {}
        if e.search_index is None:
            raise BadRequest(f"model {e.name!r} has no similarity index, so no "
                             f"{' or '.join(neighbours.NEIGHBOUR_OUTPUTS)}; start the server "
                             f"with --index {e.name}=INDEX_DIR (made by `cli.py index build`)")
        k = neighbours.k_from(request.parameters)
        vectors = [None if r.error else r.vector for r in results]
        return await asyncio.get_running_loop().run_in_executor(
            None, neighbours.neighbour_outputs, e.search_index, vectors, k)

    async def infer(self, name: str, version: str | None,
                    request: InferRequest) -> tuple[ModelEndpoint, dict[str, Any]]:
        """A parsed request -> (its endpoint, the output tensors it asked for, in order)."""
        e, items = self.prepare(name, version, request)
        return e, await self.run(e, items, request)
