"""The model service: `cli.py serve` (Open Inference Protocol over HTTP and gRPC, dynamic
batching, several models, API keys, TLS, Prometheus metrics), its Ray Serve deployment, and
nothing on `import runtime`'s path.

errors.py     the domain errors (not ready, unknown model, bad request, overloaded, ...)
dataplane.py  the transport-independent service: models, batchers, metadata, stats, infer
protocol.py   KServe v2 request/response parsing and the binary-tensor extension (pure)
batcher.py    the dynamic batcher (worker threads, bounded queue)
engine_adapter.py  the one module that calls the feature pipeline
model.py      the served model: probes, inputs/outputs, per-item results
repository.py which models to serve (MODEL_DIRs, --repository) and their probes
metrics.py    prometheus-client metrics
app.py        the HTTP transport: one route table on a bare ASGI app (errors -> HTTP status)
upload.py     POST /v1/embed (multipart, for curl)
grpc_server.py the gRPC transport (tritonclient's generated servicer; errors -> gRPC status)
runner.py     both transports in one event loop (uvicorn + grpc.aio)
commands.py   the `serve` command
ray_serve.py  the HTTP app as a Ray Serve deployment
"""
