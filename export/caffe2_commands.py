"""`python cli.py caffe2-run`: embeddings from the real Caffe2 runtime, for Caffe2 deployments.

The images get the model's own preprocessing (`common.images.preprocess`, the transform every
stage shares) and run through MODEL_DIR's `init_net.pb`/`predict_net.pb` in `.venv-caffe2`.
"""
from __future__ import annotations

import os
import sys

import click

from common.checks import writable_output

BATCHES_PER_PROCESS = 16


def _image_items(inputs: tuple[str, ...]) -> list[str]:
    from runtime.inputs import iter_folder
    items: list[str] = []
    for arg in inputs:
        if os.path.isdir(arg):
            found = list(iter_folder(arg))
            if not found:
                raise click.UsageError(f"{arg}: folder holds no image files")
            items += found
        else:  # a file, or a missing one: reported as a failed row, rows stay aligned
            items.append(arg)
    return items


def _preprocessed(paths: list[str], pre) -> tuple[list[int], list, dict[int, str]]:
    """(rows that decoded, their arrays, {row: error}) for a slice of paths."""
    from common.images import preprocess
    good, arrays, errors = [], [], {}
    for row, path in enumerate(paths):
        try:
            arrays.append(preprocess(path, pre))
            good.append(row)
        except (OSError, ValueError) as e:  # ImageDecodeError is a ValueError
            message = " ".join(str(e).split())
            errors[row] = message if message.startswith(path) else f"{path}: {message}"
    return good, arrays, errors


@click.command("caffe2-run")
@click.argument("model_dir")
@click.argument("inputs", nargs=-1, required=True, metavar="IMAGE_OR_FOLDER...")
@click.option("--out", "-o", required=True, type=click.Path(), callback=writable_output("file"),
              help="FEATURES.npy; the ids go to FEATURES.ids.json and failures to FEATURES.errors.json.")
@click.option("--output", "output_name", default="embedding", show_default=True,
              help="Which external output of the predict net to save.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--timeout", type=click.FloatRange(1), default=600.0, show_default=True,
              help="Seconds one Caffe2 runtime process may take (it runs up to 16 batches).")
def caffe2_run(model_dir, inputs, out, output_name, batch_size, timeout):
    """Embed images with the exported Caffe2 nets in the real Caffe2 runtime.

    \b
    MODEL_DIR must have been exported with --format caffe2. The runtime is the `caffe2`
    package of torch 1.8.1 in .venv-caffe2 (`make caffe2-env`; Python 3.8), or the interpreter
    named by $UNIREP_CAFFE2_PYTHON. Rows are aligned with the inputs; an image that cannot be
    decoded gets a NaN row and an entry in FEATURES.errors.json.

    \b
    Example:
      python cli.py export runs/spe --out models/spe --format caffe2
      python cli.py caffe2-run models/spe photos/ --out caffe2-features.npy
    """
    import numpy as np
    from tqdm import tqdm

    from common.description import save_json_atomic
    from common.model_dir import ModelDir, ModelError
    from export.caffe2_runtime import find_caffe2_python, run_real_caffe2
    from runtime.cli.embed import save_npy_atomic, sidecar_paths

    md = ModelDir(model_dir)
    if not md.has_caffe2():
        raise ModelError(f"{model_dir}: no Caffe2 nets here; export with --format caffe2")
    python = find_caffe2_python()
    paths = _image_items(inputs)
    if not paths:
        raise click.UsageError("no images: the inputs named none")
    pre = md.description.preprocessing
    init_net, predict_net = md.caffe2_paths()
    vectors: np.ndarray | None = None
    errors: dict[int, str] = {}
    # One runtime process per chunk of batches: starting caffe2 costs seconds, and a chunk keeps
    # the preprocessed arrays in memory bounded.
    chunk = batch_size * BATCHES_PER_PROCESS
    with tqdm(total=len(paths), unit="img", file=sys.stderr, desc="caffe2-run", disable=None) as bar:
        for start in range(0, len(paths), chunk):
            rows, arrays, bad = _preprocessed(paths[start:start + chunk], pre)
            errors.update({start + r: m for r, m in bad.items()})
            batches = [np.stack(arrays[i:i + batch_size]) for i in range(0, len(arrays), batch_size)]
            if batches:
                results, _ = run_real_caffe2(init_net, predict_net, batches, timeout=timeout, python=python)
                if output_name not in results[0]:
                    raise click.UsageError(f"the predict net has no output {output_name!r}; "
                                           f"it has {', '.join(results[0])}")
                got = np.concatenate([r[output_name].reshape(len(b), -1) for r, b in zip(results, batches)])
                if vectors is None:
                    vectors = np.full((len(paths), got.shape[1]), np.nan, np.float32)
                vectors[[start + r for r in rows]] = got
            bar.update(len(rows) + len(bad))
    if vectors is None:
        raise click.ClickException(f"all {len(paths)} images failed, e.g. {next(iter(errors.values()))}")
    ids_path, errors_path = sidecar_paths(out)
    save_npy_atomic(out, vectors)
    save_json_atomic(ids_path, paths)
    save_json_atomic(errors_path, {str(k): v for k, v in sorted(errors.items())})
    for k in sorted(errors)[:50]:
        click.echo(f"error: {errors[k]}", err=True)
    click.echo(f"caffe2: embedded {len(paths) - len(errors)}/{len(paths)} images ({vectors.shape[1]}-d); "
               f"wrote {out} and {ids_path}", err=True)
