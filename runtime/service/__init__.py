"""The model service: `cli.py serve` (Open Inference Protocol over HTTP, dynamic batching,
Prometheus metrics), its Ray Serve deployment, and nothing on `import runtime`'s path.

protocol.py   KServe v2 request/response parsing and the binary-tensor extension (pure)
batcher.py    the dynamic batcher (worker threads, bounded queue)
engine_adapter.py  the one module that calls the feature pipeline
model.py      the served model: probes, inputs/outputs, per-item results
metrics.py    prometheus-client metrics
app.py        the Starlette routes
commands.py   the `serve` command (uvicorn)
ray_serve.py  the same app as a Ray Serve deployment
"""
