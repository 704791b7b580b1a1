"""runtime.resolve: the pipeline's plan from the cores, the device and the arguments, without
opening a session; and the shared click options that feed it."""
import click
import pytest
from click.testing import CliRunner

from runtime.cli.options import PipelineOptions, pipeline_options
from runtime.resolve import bucket_sizes, resolve_buckets, resolve_pipeline_config


def test_cpu_defaults_interleave_streams():
    c = resolve_pipeline_config(cores=2, gpu=False)
    assert (c.schedule, c.threads, c.decode_threads) == ("interleaved", 2, 1)
    assert (c.stream_workers, c.stream_threads, c.decode_processes) == (2, 1, 0)
    assert c.adaptive and c.max_decode == 2 and c.buckets == (1, 2, 4, 8, 16, 32)
    big = resolve_pipeline_config(cores=16, gpu=False, batch_size=64)
    assert (big.threads, big.decode_threads, big.stream_workers, big.stream_threads) == (16, 4, 4, 4)
    assert big.max_decode == 16 and big.buckets[-1] == 64


def test_gpu_defaults_decode_in_processes_beside_one_model_thread():
    c = resolve_pipeline_config(cores=16, gpu=True)
    assert (c.schedule, c.threads, c.decode_threads, c.decode_processes) == ("processes", 1, 15, 15)
    assert c.stream_workers == 0 and c.stream_threads == 0
    small = resolve_pipeline_config(cores=4, gpu=True)  # 3 decode workers: threads suffice
    assert (small.schedule, small.decode_processes) == ("threads", 0)
    assert resolve_pipeline_config(cores=16, gpu=True, decode_processes=0).schedule == "threads"
    assert resolve_pipeline_config(cores=1, gpu=True).decode_threads == 1


def test_given_values_are_kept_and_fix_the_schedule():
    c = resolve_pipeline_config(cores=8, gpu=False, threads=3, decode_threads=2)
    # a decode pool asked for by size: the overlapped schedule, not adapting
    assert (c.schedule, c.threads, c.decode_threads, c.adaptive, c.max_decode) == (
        "threads", 3, 2, False, 2)
    c = resolve_pipeline_config(cores=8, gpu=False, stream_workers=3)
    assert (c.schedule, c.stream_workers, c.stream_threads) == ("interleaved", 3, 2)
    assert resolve_pipeline_config(cores=8, gpu=False, stream_workers=1).schedule == "threads"
    assert resolve_pipeline_config(cores=8, gpu=True, stream_workers=4).stream_workers == 0
    c = resolve_pipeline_config(cores=2, gpu=False, decode_processes=2)
    assert (c.schedule, c.decode_processes) == ("processes", 2)
    assert resolve_pipeline_config(cores=2, gpu=False, prefetch=-3).prefetch == 0


def test_buckets():
    assert bucket_sizes(32) == [1, 2, 4, 8, 16, 32] and bucket_sizes(24) == [1, 2, 4, 8, 16, 24]
    assert bucket_sizes(1) == [1]
    assert resolve_buckets(32, [8, 4, 8]) == (4, 8, 32)
    assert resolve_buckets(16, [32, 16]) == (16, 32)
    assert resolve_pipeline_config(cores=2, gpu=True, batch_size=12, buckets=[4]).buckets == (4, 12)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        resolve_buckets(0)
    with pytest.raises(ValueError, match="buckets must be at least 1"):
        resolve_buckets(8, [0, 8])
    with pytest.raises(ValueError, match="threads must be at least 1"):
        resolve_pipeline_config(cores=2, gpu=False, threads=0)
    with pytest.raises(ValueError, match="cores must be at least 1"):
        resolve_pipeline_config(cores=0, gpu=False)


@click.command()
@pipeline_options(decode="exact")
def _show(pipeline: PipelineOptions):
    click.echo(repr(pipeline))
    click.echo(repr(pipeline.resolve(cores=2, gpu=False)))


def _run(*args):
    return CliRunner().invoke(_show, list(args))


def test_shared_options_parse_and_check():
    ok = _run("--device", "cuda:1", "--batch-size", "8", "--threads", "2", "--decode", "fast",
              "--variant", "int8", "--decode-threads", "1")
    assert ok.exit_code == 0, ok.output
    assert ("device='cuda', device_id=1, batch_size=8, threads=2, decode_threads=1, "
            "decode_processes=None, variant='int8', decode='fast'") in ok.output
    assert "schedule='threads'" in ok.output  # decode threads given: the overlapped schedule
    default = _run()
    assert "device='auto', device_id=0" in default.output and "decode='exact'" in default.output
    assert "decode='fast'" in _run("--fast-decode").output  # the old flag still works
    assert PipelineOptions(decode="exact").pipeline_kwargs()["fast_decode"] is False
    for args, message in [(("--device", "tpu"), "is not a device"),
                          (("--device", "cuda:x"), "GPU number"),
                          (("--device", "cpu:1"), "is not a device"),
                          (("--threads", "100000"), "per usable core"),
                          (("--threads", "0"), "x>=1"),
                          (("--batch-size", "0"), "1<=x<=65536"),
                          (("--decode-processes", "-1"), "x>=0"),
                          (("--decode", "turbo"), "'turbo' is not one of"),
                          (("--exact-decode", "--fast-decode"), "contradict")]:
        result = _run(*args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
