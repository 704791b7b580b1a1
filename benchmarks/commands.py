"""`bench`: the runtime against PyTorch, side by side, in one run (torch imported lazily)."""
from __future__ import annotations

import os

import click

from runtime.cli.options import PipelineOptions, pipeline_options


@click.command("bench")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--images", metavar="DIR", type=click.Path(exists=True, file_okay=False),
              default=None, help="Folder of image files (class folders for torchvision's "
              "ImageFolder, or flat). Default: 512 real JPEG photos of 500x375, built once "
              "under $UNIREP_CACHE/bench-corpus.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True,
              help="Timed passes per configuration; figures are medians.")
@click.option("--target", metavar="DATA", default="fashion-mnist:per_class=60",
              show_default=True, help="Labelled real data for probe accuracy (held-out test "
              "split) and the latency probe; 'none' to skip.")
@click.option("--int8/--no-int8", default=None,
              help="--int8: make model.int8.onnx if missing (calibrated on the images); "
              "--no-int8: leave INT8 out. Default: INT8 if the file exists.")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Use only the first N images (quick runs).")
@click.option("--latency-images", type=click.IntRange(5), default=100, show_default=True)
@pipeline_options(decode="fast", device=False, variant=False, decode_processes=False)
@click.option("--out", "out_path", metavar="REPORT.json", default=None,
              help="Write all figures as JSON, and a bar chart beside it (REPORT.png).")
def bench(model_dir, images, repeats, target, int8, limit, latency_images, out_path,
          pipeline: PipelineOptions):
    """Benchmark MODEL_DIR: onnxruntime against PyTorch eager, same model, batch and threads.

    \b
    Prints (medians of --repeats, configurations timed round robin):
      1. model-only images/s: onnxruntime vs PyTorch eager (the source runs rebuilt)
      2. end-to-end images/s from files: our pipeline vs ImageFolder + DataLoader(2 workers)
         + torchvision transforms + eager model; and as a fraction of model-only
      3. single-image latency p50/p99 (file -> embedding -> probe)
      4. INT8 vs FP32: speed, and probe accuracy on --target
    and PASS/MISS against the issue's floors (set for resnet18 at 224 px, batch 32).

    \b
    Example:
      python cli.py bench models/r18 --int8 --out reports/bench-r18.json
      python cli.py bench models/small --repeats 1 --limit 64 --target none
    """
    from common.description import save_json_atomic

    from . import runtime_bench as rb

    target = None if target and target.lower() == "none" else target
    if target:
        from common.data import DataError, load_dataset
        try:
            load_dataset(target)
        except (DataError, FileNotFoundError, OSError) as e:
            raise click.UsageError(f"--target {target}: {e}")
    from common.model_dir import ModelDir, ModelError
    try:
        ModelDir(model_dir).check_model("fp32")
    except ModelError as e:
        raise click.UsageError(str(e)) from e
    try:
        report = rb.run_benchmark(model_dir, images=images, batch_size=pipeline.batch_size,
                                  threads=pipeline.threads,
                                  decode_threads=pipeline.decode_threads,
                                  repeats=repeats, target=target, int8=int8, limit=limit,
                                  latency_images=latency_images,
                                  fast_decode=pipeline.fast_decode)
    except FileNotFoundError as e:
        raise click.UsageError(str(e))
    click.echo(rb.format_report(report))
    if out_path:
        save_json_atomic(out_path, report)
        chart = os.path.splitext(out_path)[0] + ".png"
        rb.write_chart(report, chart)
        click.echo(f"wrote {out_path} and {chart}")
