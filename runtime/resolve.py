"""How a pipeline runs on this machine, as one pure function of the cores, the device and the
user's arguments (in the spirit of timm's resolve_data_config): nothing is opened or started,
so every rule can be tested by itself.

    config = resolve_pipeline_config(cores=16, gpu=True, batch_size=64)
    config.schedule        # "processes": decode processes beside the model on the GPU
    config.threads, config.decode_threads, config.buckets, ...

Schedules (runtime.schedules):
  interleaved  CPU, streams: workers each decode a batch, then run the model on it with
               threads // stream_workers onnxruntime threads (one thread per core at a time)
  threads      a decode thread pool beside the thread that runs the model (GPU, or asked for)
  processes    decode worker processes writing into a shared-memory ring (GPU with 4+ decode
               workers: threads would share one GIL)
  gpu          decode="gpu": JPEGs decoded on the device into the buffer the model reads
               (runtime.gpu), files read ahead by the thread pool; chosen only where the
               session is on a GPU, the model takes uint8 crops and cupy, nvImageCodec and a
               CUDA device are present (`gpu_decode_ready`); otherwise the CPU decodes and
               `decode_reason` says why
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SCHEDULES = ("interleaved", "threads", "processes", "gpu")
DECODES = ("cpu", "gpu")
NOT_CHECKED = (False, "its libraries were not checked (runtime.gpu.decoder.gpu_decode_available)")


@dataclass(frozen=True)
class PipelineConfig:
    """The resolved plan. threads: onnxruntime intra-op threads of the main session;
    decode_threads: decode workers per batch to start with; adaptive: whether that number may
    grow (up to max_decode) while the model waits for images; decode_processes: worker
    processes (0: threads); stream_workers / stream_threads: the interleaved CPU schedule
    (0 when not interleaving); buckets: batch sizes the GPU path pads to; decode: where
    images are decoded ("cpu" or "gpu"); decode_reason: why GPU decoding was asked for and
    not chosen ("" otherwise)."""

    gpu: bool
    batch_size: int
    prefetch: int
    threads: int
    decode_threads: int
    adaptive: bool
    max_decode: int
    decode_processes: int
    stream_workers: int
    stream_threads: int
    buckets: tuple[int, ...]
    schedule: str
    decode: str = "cpu"
    decode_reason: str = ""


def bucket_sizes(batch_size: int) -> list[int]:
    """Powers of two below `batch_size`, then `batch_size`: few distinct shapes to compile."""
    sizes, b = [], 1
    while b < batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [batch_size]


def resolve_buckets(batch_size: int, buckets: Sequence[int] | None = None) -> tuple[int, ...]:
    """The caller's buckets (sorted, deduplicated, with batch_size added when all are
    smaller), or powers of two up to batch_size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if buckets:
        if any(int(b) < 1 for b in buckets):
            raise ValueError(f"buckets must be at least 1, got {list(buckets)}")
        found = sorted({int(b) for b in buckets})
        return tuple(found + ([batch_size] if found[-1] < batch_size else []))
    return tuple(bucket_sizes(batch_size))


def default_threads(cores: int, gpu: bool, threads: int | None, decode_threads: int | None
                    ) -> tuple[int, int]:
    """(onnxruntime intra-op threads, decode threads).

    CPU: the model gets every core and one decode worker per 4 cores (at least one) runs beside
    it. Decoding costs about a tenth of a CNN's compute, onnxruntime's threads do not spin
    (allow_spinning=0) and the worker mostly waits on the bounded queue, so on 2 cores 2+1 keeps
    both cores busy where 1+1 would leave half of the model's throughput unused (measured by
    `bench`); the adaptive gate adds decode workers only when the model waits for images.
    That is the overlapped schedule (one batch; stream_workers=0); CPU streams of several
    batches are interleaved instead, which oversubscribes nothing.
    GPU: the model needs one host thread; decode gets the rest."""
    if gpu:
        return threads or 1, decode_threads or max(1, cores - 1)
    return threads or cores, decode_threads or max(1, min(8, cores // 4))


def check_decode(decode: str) -> str:
    """A `decode` option ('cpu' or 'gpu'), checked."""
    if decode not in DECODES:
        raise ValueError(f"unknown decode mode {decode!r}; choose from {', '.join(DECODES)}")
    return decode


def resolve_decode(decode: str, *, gpu: bool, uint8_front: bool,
                   gpu_decode_ready: tuple[bool, str] = NOT_CHECKED) -> tuple[str, str]:
    """(where images are decoded, why not on the GPU when that was asked for). The GPU
    decoder writes uint8 crops on the device into the buffer the session reads, so it needs
    the session on a GPU, the model's uint8 front, and its libraries and a CUDA device
    (`gpu_decode_ready`: runtime.gpu.decoder.gpu_decode_available())."""
    if check_decode(decode) == "cpu":
        return "cpu", ""
    if not gpu:
        return "cpu", "the model's session is not on a GPU (CUDA or TensorRT provider)"
    if not uint8_front:
        return "cpu", ("the model has no uint8 input front (runtime.prefix), which GPU "
                       "decoding feeds")
    ready, why = gpu_decode_ready
    return ("gpu", "") if ready else ("cpu", why or "GPU decoding is not available")


def resolve_pipeline_config(*, cores: int, gpu: bool, batch_size: int = 32, prefetch: int = 2,
                            threads: int | None = None, decode_threads: int | None = None,
                            decode_processes: int | None = None,
                            stream_workers: int | None = None,
                            buckets: Sequence[int] | None = None, decode: str = "cpu",
                            uint8_front: bool = True,
                            gpu_decode_ready: tuple[bool, str] = NOT_CHECKED) -> PipelineConfig:
    """Resolve the plan for a session that runs on a GPU (`gpu`) or the CPU, on `cores` cores.
    None means "choose for me"; given values are kept (and checked). decode="gpu" is a wish:
    see resolve_decode for when it is granted; then the threads read files ahead of the GPU
    decoder (no decode processes, no streams)."""
    if cores < 1:
        raise ValueError(f"cores must be at least 1, got {cores}")
    for name, value in (("threads", threads), ("decode_threads", decode_threads)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    bucket_list = resolve_buckets(batch_size, buckets)
    decode_on, decode_reason = resolve_decode(decode, gpu=gpu, uint8_front=uint8_front,
                                              gpu_decode_ready=gpu_decode_ready)
    intra, workers_decode = default_threads(cores, gpu, threads, decode_threads)
    # Decode parallelism adapts only when not fixed by the caller: while the model thread
    # waits for decoded images the model's cores are idle, so decoding may borrow them.
    adaptive = decode_threads is None
    max_decode = max(workers_decode, cores) if adaptive else workers_decode
    if decode_on == "gpu":  # the device decodes; the pool only reads files ahead of it
        decode_processes, stream_workers = 0, 0
    if decode_processes is None:
        decode_processes = workers_decode if gpu and workers_decode >= 4 else 0
    decode_processes = max(0, decode_processes)
    if stream_workers is None:  # a decode pool asked for by size: the overlapped schedule
        stream_workers = 0 if decode_threads or decode_processes else min(4, intra)
    workers = stream_workers if not gpu and stream_workers >= 2 else 0
    stream_threads = max(1, intra // workers) if workers else 0
    if workers:
        max_decode = max(max_decode, workers)
    schedule = ("gpu" if decode_on == "gpu" else "interleaved" if workers
                else "processes" if decode_processes else "threads")
    return PipelineConfig(gpu=gpu, batch_size=batch_size, prefetch=max(0, prefetch),
                          threads=intra, decode_threads=workers_decode, adaptive=adaptive,
                          max_decode=max_decode, decode_processes=decode_processes,
                          stream_workers=workers, stream_threads=stream_threads,
                          buckets=bucket_list, schedule=schedule, decode=decode_on,
                          decode_reason=decode_reason)
