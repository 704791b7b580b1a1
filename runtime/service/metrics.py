"""Prometheus metrics of one service (its own registry, so several apps can live in a process).

    unirep_requests_total{endpoint, status}        requests by endpoint and HTTP status
    unirep_request_seconds{endpoint}               latency, from body read to response
    unirep_batch_size                              images per model batch
    unirep_batch_seconds                           time to decode and run one batch
    unirep_queue_depth                             requests waiting for a batch
    unirep_images_total{outcome}                   images embedded (ok / failed): rate() = img/s
"""
from __future__ import annotations

from collections.abc import Callable


class ServiceMetrics:
    def __init__(self, queue_depth: Callable[[], float]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("unirep_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram(
            "unirep_request_seconds", "Request latency (body read to response)", ["endpoint"],
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
            registry=self.registry)
        self.batch_size = Histogram("unirep_batch_size", "Images per model batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                                    registry=self.registry)
        self.batch_seconds = Histogram("unirep_batch_seconds", "Decode + model time per batch",
                                       registry=self.registry)
        self.queue_depth = Gauge("unirep_queue_depth", "Requests waiting for a batch",
                                 registry=self.registry)
        self.queue_depth.set_function(queue_depth)
        self.images = Counter("unirep_images", "Images processed, by outcome", ["outcome"],
                              registry=self.registry)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def count_images(self, ok: int, failed: int) -> None:
        if ok:
            self.images.labels("ok").inc(ok)
        if failed:
            self.images.labels("failed").inc(failed)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
