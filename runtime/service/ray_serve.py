"""The model service as a Ray Serve deployment: the same Starlette app in every replica.

    serve run runtime.service.ray_serve:app_builder model_dir=models/spe replicas=2 \
        probe=mnist=probes/mnist max_batch=32

or from Python:

    from ray import serve
    from runtime.service.ray_serve import deployment
    serve.run(deployment(replicas=2, num_cpus=1).bind("models/spe"), route_prefix="/")

Each replica loads and warms the model in its constructor (Ray routes to it only after that),
batches its own requests, and serves /v2/..., /v1/embed and /metrics (that replica's metrics).
Ray's HTTP proxy spreads requests over the replicas; on a cluster `ray start` first and
`serve run --address auto`.
"""
from __future__ import annotations

from typing import Any


def _replica_class():
    from ray import serve

    from .app import build_app
    from .dataplane import DataPlane, ModelEndpoint
    from .model import ServedModel

    @serve.ingress()
    class UnirepModel:
        def __init__(self, model_dir: str, name: str | None = None,
                     probes: dict[str, str] | None = None, workers: int = 1,
                     max_batch: int = 32, max_delay_ms: float = 2.0, max_queue: int = 256,
                     timeout_s: float = 30.0, max_body_mb: float = 64.0, device: str = "auto"):
            model = ServedModel(model_dir, name=name, probes=probes, device=device,
                                workers=workers, batch_size=max_batch)
            self.plane = DataPlane([ModelEndpoint(model, max_batch=max_batch,
                                                  max_delay_ms=max_delay_ms,
                                                  max_queue=max_queue, timeout_s=timeout_s)])
            self.max_body_mb = max_body_mb
            self.plane.load()  # the replica is ready only once the model is warm

        def __serve_build_asgi_app__(self):
            return build_app(self.plane, max_body_mb=self.max_body_mb, manage_plane=False)

    return UnirepModel


def deployment(*, replicas: int = 2, num_cpus: float = 1, num_gpus: float = 0,
               max_ongoing_requests: int = 256):
    """The deployment (bind it with ServedModel/Service arguments: model_dir, name=...,
    probes={name: dir}, workers=, max_batch=, max_delay_ms=, max_queue=, timeout_s=)."""
    from ray import serve
    return serve.deployment(
        _replica_class(), name="unirep", num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus})


def app_builder(args: dict[str, Any]):
    """For `serve run runtime.service.ray_serve:app_builder key=value ...`: model_dir
    (required), name, replicas, num_cpus, num_gpus, workers, max_batch, max_delay_ms,
    max_queue, timeout_s, probe=NAME=DIR (comma-separated for several)."""
    from .model import parse_probe_specs

    args = dict(args)
    if "model_dir" not in args:
        raise ValueError("app_builder needs model_dir=MODEL_DIR")
    probes = parse_probe_specs([p for p in str(args.pop("probe", "")).split(",") if p])
    dep = deployment(replicas=int(args.pop("replicas", 2)),
                     num_cpus=float(args.pop("num_cpus", 1)),
                     num_gpus=float(args.pop("num_gpus", 0)))
    numbers = {"workers": int, "max_batch": int, "max_delay_ms": float, "max_queue": int,
               "timeout_s": float, "max_body_mb": float}
    kwargs = {k: numbers[k](v) if k in numbers else v for k, v in args.items()}
    return dep.bind(probes=probes, **kwargs)
