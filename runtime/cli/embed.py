"""`python cli.py embed`: images -> FEATURES.npy with the onnxruntime feature pipeline.

Heavy imports (numpy, onnxruntime) happen inside the command so `cli.py --help` stays instant.
"""
from __future__ import annotations

import time

import click

from common.checks import writable_output
from runtime.cli.bulk import bulk_options
from runtime.cli.items import collect_items, embed_items

from .options import PipelineOptions, open_pipeline, pipeline_options

MAX_ERRORS_SHOWN = 50


def save_npy_atomic(path: str, array) -> None:
    import numpy as np

    from common.atomic import atomic_open
    with atomic_open(path, "wb") as f:
        np.save(f, array)


def sidecar_paths(features_path: str) -> tuple[str, str]:
    """FEATURES.npy -> (FEATURES.ids.json, FEATURES.errors.json)."""
    stem = features_path[:-4] if features_path.endswith(".npy") else features_path
    return stem + ".ids.json", stem + ".errors.json"


def model_record_path(features_path: str) -> str:
    """FEATURES.npy -> FEATURES.model.json: which model made the rows (read by `index build`)."""
    return sidecar_paths(features_path)[0][: -len(".ids.json")] + ".model.json"


def model_record(pipe, model_dir: str, variant: str) -> dict:
    """The model of an output as `probe` and `index` read it: fingerprint, folder, dimension."""
    import os

    from runtime.probes import description_fingerprint
    return {"fingerprint": description_fingerprint(pipe.description_),
            "architecture": pipe.description_.architecture, "variant": variant,
            "dim": int(pipe.feature_dim_), "model_dir": os.path.abspath(model_dir)}


def describe_pipeline(pipe) -> str:
    """One line: the model, its size and input, and where and with how many threads it runs."""
    note = f" (fell back: {pipe.fallback_reason_})" if pipe.fell_back_ else ""
    return (f"model {pipe.model_path_}: {pipe.description_.architecture}, "
            f"{pipe.feature_dim_}-d, input {pipe.input_shape_[1]} px; provider "
            f"{pipe.provider_}{note}; threads {pipe.threads_} + "
            + (f"{pipe.decode_processes_} decode processes" if pipe.decode_processes_
               else f"{pipe.decode_threads_} decode"))


@click.command("embed")
@click.argument("model_dir")  # checked by common.model_dir, which says what is wrong
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--out", "-o", required=True, type=click.Path(),
              callback=writable_output("file or folder"),
              help="FEATURES.npy (ids go to FEATURES.ids.json beside it), or a folder: "
                   "Parquet shards + _manifest.json, updated by a rerun (see Bulk jobs below).")
@pipeline_options(decode="fast")
@click.option("--probe", "probe_dirs", multiple=True, type=click.Path(exists=True,
              file_okay=False), help="Folder output: add <probe>_label and <probe>_score "
                                     "columns from this fitted probe (repeatable).")
@bulk_options
def embed(model_dir, inputs, out, pipeline: PipelineOptions, probe_dirs, **bulk):
    """Embed images with an exported model (onnxruntime; no torch needed).

    \b
    INPUT is any mix of:
      an image file or a folder (searched recursively, sorted),
      a text file listing image paths, one per line (list.txt or @list),
      a built-in dataset (fashion-mnist, mnist, digits, emoji[:...]): all splits,
      ids are paths relative to the dataset root.

    \b
    Writes FEATURES.npy (float32, one row per image; NaN rows for images that failed),
    FEATURES.ids.json (the ids, aligned with the rows), FEATURES.errors.json
    ({row: message}) and FEATURES.model.json (the model's fingerprint and folder).
    Failures are listed on stderr; the exit code is 0 unless every
    image failed.

    \b
    Bulk jobs: when --out is a folder, rows go to OUT/shard-NNNNNN.parquet (columns id,
    embedding, error, input_stamp; probe columns with --probe) and OUT/_manifest.json lists the
    complete shards; the folder reads as one Parquet dataset. Rerunning the same command
    embeds only new or changed inputs (after a crash too: it resumes); --prune removes the
    rows of inputs that are gone; another job's folder is refused
    (--overwrite replaces it). INPUT may then also be a Parquet/CSV table (--column) or
    WebDataset tar shards; --engine ray runs the job on Ray Data.

    \b
    Examples:
      python cli.py embed models/spe photos/ --out features.npy --batch-size 64
      python cli.py embed models/spe /data/photos catalog.parquet --out feats/ --shard-size 5000
      python cli.py embed models/spe shards/*.tar --out feats/ --engine ray --address auto
    """
    if not out.endswith(".npy"):
        from runtime.cli.bulk import run_bulk
        return run_bulk(model_dir, inputs, out, probe_dirs=probe_dirs,
                        pipeline=pipeline.pipeline_kwargs(), **bulk)
    if probe_dirs:
        raise click.UsageError("--probe needs a folder --out (Parquet shards); for a .npy "
                               "use `probe predict`")
    from common.description import save_json_atomic

    items = collect_items(inputs)
    if not items:
        raise click.UsageError("no images to embed: the inputs named none")
    pipe = open_pipeline(model_dir, pipeline)
    click.echo(describe_pipeline(pipe), err=True)
    ids = [i for i, _ in items]
    start = time.perf_counter()
    with pipe:
        vectors, errors = embed_items(pipe, items)
    elapsed = time.perf_counter() - start

    ids_path, errors_path = sidecar_paths(out)
    save_npy_atomic(out, vectors)
    save_json_atomic(ids_path, ids)
    save_json_atomic(errors_path, {str(k): v for k, v in sorted(errors.items())})
    save_json_atomic(model_record_path(out), model_record(pipe, model_dir, pipeline.variant))
    for k in sorted(errors)[:MAX_ERRORS_SHOWN]:
        click.echo(f"error: {errors[k]}", err=True)
    if len(errors) > MAX_ERRORS_SHOWN:
        click.echo(f"... and {len(errors) - MAX_ERRORS_SHOWN} more in {errors_path}", err=True)
    done = len(items) - len(errors)
    click.echo(f"embedded {done}/{len(items)} images in {elapsed:.1f} s "
               f"({len(items) / max(elapsed, 1e-9):.1f} img/s); {len(errors)} failed; "
               f"wrote {out} and {ids_path}", err=True)
    if done == 0:
        raise click.ClickException(f"all {len(items)} images failed; see the errors above")
