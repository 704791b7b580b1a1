"""The Ray Data engine of a bulk job: the same shards and manifest, computed by actors.

The driver reads the Source and writes the shards exactly as the local engine does
(`runtime.bulk.job.run_job`); only the embedding moves to Ray: windows of (seq, id, path or
bytes) rows go through `ray.data.from_items(...).map_batches(EmbedActor, concurrency=N,
num_cpus=C, num_gpus=G)`, where each actor holds one FeaturePipeline for its life. Rows carry
their position in the input stream, so Ray's order does not matter and a task retried after an
actor died cannot duplicate a row. A dead actor is restarted and its tasks retried: Ray Data's actor pool
sets max_restarts=-1 and max_task_retries=-1 unless told otherwise (Ray 2.60; passing them to
map_batches is deprecated there).

On a cluster (`ray start --head` on one node, `ray start --address HEAD:6379` on the others,
then `--address auto` on the head or `ray://HEAD:10001` elsewhere) every node needs this
project importable (installed, or the same path on a shared file system: the driver passes its
own root as PYTHONPATH) and the input paths readable; tables with bytes and tar shards travel
inside the job.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from .job import Batch, embed_items

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class EmbedActor:
    """One FeaturePipeline per Ray actor; a batch of rows in, their embeddings out."""

    def __init__(self, model_dir: str, pipeline: dict):
        from runtime.pipeline import FeaturePipeline
        self.pipe = FeaturePipeline(model_dir, **pipeline)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["id"]]
        items = [bytes(d) if len(d) else str(p) for p, d in zip(batch["path"], batch["data"])]
        vectors, errors = embed_items(self.pipe, ids, items)
        return {"seq": np.asarray(batch["seq"], np.int64), "embedding": vectors,
                "error": np.array([errors.get(i, "") for i in range(len(ids))], dtype=object),
                "pid": np.full(len(ids), os.getpid(), np.int64)}


class RayEngine:
    """Callable engine for run_job; a context manager that starts (and then stops) a local Ray
    instance when none is running and no address is given."""

    def __init__(self, model_dir: str, pipeline: dict, *, address: str | None = None,
                 actors: int | None = None, cpus_per_actor: float = 1.0,
                 gpus_per_actor: float = 0.0, num_cpus: int | None = None,
                 window_items: int = 100_000, window_bytes: int = 512 << 20):
        import ray
        self.model_dir = model_dir
        self.cpus_per_actor, self.gpus_per_actor = cpus_per_actor, gpus_per_actor
        self.window_items, self.window_bytes = window_items, window_bytes
        self._started = False
        self.actor_pids_: set[int] = set()  # every actor process that returned rows
        if not ray.is_initialized():
            runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
                p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}}
            if address is None:  # a local instance: on 127.0.0.1 only (runtime/local_ray.py)
                from runtime.local_ray import init_local_ray
                init_local_ray(num_cpus=num_cpus, runtime_env=runtime_env)
            else:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         runtime_env=runtime_env)
            self._started = True
        resources = ray.cluster_resources()
        if actors is None:
            if gpus_per_actor > 0:
                actors = max(1, int(resources.get("GPU", 0) // gpus_per_actor))
            else:
                actors = max(1, int(resources.get("CPU", 1) // cpus_per_actor))
        self.actors = actors
        # one onnxruntime thread per reserved CPU: actors side by side must not oversubscribe
        self.pipeline = dict(pipeline)
        if self.pipeline.get("threads") is None:
            self.pipeline["threads"] = max(1, int(cpus_per_actor))
        if cpus_per_actor < 2 and gpus_per_actor == 0:
            # one core per actor: decode a batch, then run it (a decode thread beside the model
            # thread would put two busy threads on the core, which costs about what decoding
            # does; the same reason the local pipeline interleaves its CPU workers)
            for key, value in (("prefetch", 0), ("decode_threads", 1)):
                if self.pipeline.get(key) is None:
                    self.pipeline[key] = value
        if gpus_per_actor == 0 and self.pipeline.get("device", "auto") == "auto":
            self.pipeline["device"] = "cpu"
        self.batch_size = int(self.pipeline.get("batch_size", 32))

    def describe(self) -> str:
        import ray
        cpus = ray.cluster_resources().get("CPU", 0)
        return (f"ray: {self.actors} actors x {self.cpus_per_actor:g} CPU"
                + (f" + {self.gpus_per_actor:g} GPU" if self.gpus_per_actor else "")
                + f", pipeline threads {self.pipeline['threads']}, batch {self.batch_size}; "
                f"cluster {cpus:g} CPUs")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        import ray
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False

    def _windows(self, stream: Iterator[tuple[int, str, Any]]) -> Iterator[list[dict]]:
        rows: list[dict] = []
        size = 0
        for seq, item_id, item in stream:
            data = item if isinstance(item, (bytes, bytearray)) else b""
            rows.append({"seq": seq, "id": item_id, "path": "" if data else str(item),
                         "data": bytes(data)})
            size += len(data) + 100
            if len(rows) >= self.window_items or size >= self.window_bytes:
                yield rows
                rows, size = [], 0
        if rows:
            yield rows

    def _blocks(self, n: int) -> int:
        """Blocks of about four model batches, and enough to keep every actor busy."""
        per_block = self.batch_size * 4
        return max(1, min(math.ceil(n / self.batch_size),
                          max(2 * self.actors, math.ceil(n / per_block))))

    def __call__(self, stream: Iterator[tuple[int, str, Any]]) -> Iterator[Batch]:
        import ray
        from ray.data import ActorPoolStrategy, DataContext
        DataContext.get_current().enable_progress_bars = False
        for rows in self._windows(stream):
            items = ray.data.from_items(rows, override_num_blocks=self._blocks(len(rows)))
            ds = items.map_batches(
                EmbedActor, fn_constructor_kwargs={"model_dir": self.model_dir,
                                                   "pipeline": self.pipeline},
                batch_size=self.batch_size, batch_format="numpy",
                compute=ActorPoolStrategy(size=self.actors),
                num_cpus=self.cpus_per_actor, num_gpus=self.gpus_per_actor or None)
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                errors = {j: str(e) for j, e in enumerate(out["error"]) if e}
                self.actor_pids_.update(int(p) for p in np.unique(out["pid"]))
                yield [int(s) for s in out["seq"]], np.asarray(out["embedding"]), errors
