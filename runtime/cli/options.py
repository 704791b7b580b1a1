"""One set of pipeline options for every command that embeds images (embed, probe fit/predict,
evaluate, bench): the same names, types, ranges and help everywhere.

    @click.command()
    @pipeline_options(decode="fast")
    def embed(..., pipeline: PipelineOptions):
        pipe = FeaturePipeline(model_dir, **pipeline.pipeline_kwargs())

Values are checked by click before any work starts (ranges, devices, a sane thread cap), and
resolve through runtime.resolve like the library's arguments. Only click is imported at module
level (the pipeline itself is imported by `open_pipeline`, when a command runs).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
VARIANTS = ("fp32", "fp16", "int8")
DECODES = ("exact", "fast", "gpu")
MAX_BATCH_SIZE = 65536
THREADS_PER_CORE = 4  # more onnxruntime or decode threads than this per core only thrash


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class DeviceType(click.ParamType):
    """auto | cpu | cuda | cuda:N | tensorrt | tensorrt:N -> (device, device_id)."""

    name = "device"

    def get_metavar(self, param: Any, ctx: Any = None) -> str:
        return "[auto|cpu|cuda|cuda:N|tensorrt]"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        text = str(value).strip().lower()
        name, _, index = text.partition(":")
        if name not in DEVICES or (index and name in ("auto", "cpu")):
            self.fail(f"{value!r} is not a device; choose auto, cpu, cuda, cuda:N (N = GPU "
                      "number) or tensorrt", param, ctx)
        if index and not index.isdigit():
            self.fail(f"{value!r}: the GPU number after ':' must be 0 or more, as in cuda:1",
                      param, ctx)
        return name, int(index or 0)


class CappedInt(click.IntRange):
    """An int from `min`, capped at THREADS_PER_CORE x the usable cores, with a message that
    says why (100000 threads would hang the machine rather than speed anything up)."""

    def __init__(self, min: int):
        super().__init__(min=min)

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        n = super().convert(value, param, ctx)
        cap = THREADS_PER_CORE * usable_cores()
        if n > cap:
            self.fail(f"{n} is more than {THREADS_PER_CORE} per usable core ({cap} here); "
                      "leave it out to fit the cores", param, ctx)
        return n


@dataclass(frozen=True)
class PipelineOptions:
    """The pipeline options of one command line, checked."""

    device: str = "auto"
    device_id: int = 0
    batch_size: int = 32
    threads: int | None = None
    decode_threads: int | None = None
    decode_processes: int | None = None
    variant: str = "fp32"
    decode: str = "fast"

    @property
    def fast_decode(self) -> bool:
        return self.decode != "exact"  # gpu: items the GPU cannot take use the fast CPU path

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for runtime.FeaturePipeline."""
        return dict(device=self.device, device_id=self.device_id, batch_size=self.batch_size,
                    threads=self.threads, decode_threads=self.decode_threads,
                    decode_processes=self.decode_processes, variant=self.variant,
                    fast_decode=self.fast_decode, decode="gpu" if self.decode == "gpu" else "cpu")

    def resolve(self, *, cores: int, gpu: bool):
        """The plan these options give on `cores` cores (runtime.resolve), without opening
        anything."""
        from runtime.resolve import resolve_pipeline_config
        return resolve_pipeline_config(cores=cores, gpu=gpu, batch_size=self.batch_size,
                                       threads=self.threads, decode_threads=self.decode_threads,
                                       decode_processes=self.decode_processes)


def pipeline_options(*, decode: str = "fast", device: bool = True, variant: bool = True,
                     decode_processes: bool = True) -> Callable[[Callable], Callable]:
    """Add the pipeline options to a click command; it receives them as `pipeline`
    (PipelineOptions). `decode`: this command's default decode mode; `device`, `variant`,
    `decode_processes`: whether the command offers those (a benchmark on the CPU does not)."""
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}")

    def decorate(f: Callable) -> Callable:
        names = ["batch_size", "threads", "decode", "exact_decode", "fast_decode",
                 "decode_threads"]
        options = [
            click.option("--device", type=DeviceType(), default="auto", show_default=True,
                         help="Where the model runs: auto tries TensorRT, then CUDA, then the "
                              "CPU (and says when it fell back); cuda:N picks GPU N."),
            click.option("--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=32,
                         show_default=True, help="Images per model call."),
            click.option("--threads", type=CappedInt(1), default=None,
                         help="onnxruntime threads (default: from the cores available)."),
            click.option("--decode", type=click.Choice(DECODES), default=decode,
                         show_default=True,
                         help="exact: decode JPEGs like training (PIL); fast: libjpeg-turbo's "
                              "DCT-downscaled path, faster, about one grey level apart; gpu: "
                              "nvImageCodec + CUDA resize on the GPU (extra `gpu`; falls back "
                              "to fast with a warning where it cannot run)."),
            click.option("--exact-decode", "exact_decode", is_flag=True, hidden=True,
                         help="Same as --decode exact (kept for old scripts)."),
            click.option("--fast-decode", "fast_decode", is_flag=True, hidden=True,
                         help="Same as --decode fast (kept for old scripts)."),
            click.option("--decode-threads", type=CappedInt(1), default=None,
                         help="Image decoding threads, overlapped with inference "
                              "(default: from the cores)."),
        ]
        if device:
            names.append("device")
        else:
            options.pop(0)
        if decode_processes:
            names.append("decode_processes")
            options += [
                click.option("--decode-processes", type=CappedInt(0), default=None,
                             help="Decode in N worker processes instead of threads (0: "
                                  "threads). Default: processes on a GPU with 4+ decode "
                                  "workers, where threads share one GIL."),
            ]
        if variant:
            names.append("variant")
            options.append(click.option("--variant", type=click.Choice(VARIANTS),
                                        default="fp32", show_default=True,
                                        help="Which exported model file to run (model.onnx, "
                                             "model.fp16.onnx, model.int8.onnx)."))

        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {n: kwargs.pop(n, None) for n in names}
            if values["exact_decode"] and values["fast_decode"]:
                raise click.UsageError("--exact-decode and --fast-decode contradict each other; "
                                       "use --decode exact or --decode fast")
            chosen = ("exact" if values["exact_decode"] else
                      "fast" if values["fast_decode"] else values["decode"])
            where, device_id = values.get("device") or ("cpu", 0)
            kwargs["pipeline"] = PipelineOptions(
                device=where, device_id=device_id, batch_size=values["batch_size"],
                threads=values["threads"], decode_threads=values["decode_threads"],
                decode_processes=values.get("decode_processes"),
                variant=values.get("variant") or "fp32", decode=chosen)
            return f(*args, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper
    return decorate


def open_pipeline(model_dir: str, pipeline: PipelineOptions):
    """runtime.FeaturePipeline for a command: a bad model folder is a ModelError (one line,
    exit status 1, through cli.py), other refusals of the options are usage errors."""
    from common.model_dir import ModelError
    from runtime.pipeline import FeaturePipeline
    try:
        return FeaturePipeline(model_dir, **pipeline.pipeline_kwargs())
    except ModelError:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise click.UsageError(str(e)) from e
