"""Option groups that `export` and `import` share: both write a model folder, with the same
precision variants and the same parity proof on real images."""
from __future__ import annotations

import click

from common.checks import data_spec, writable_output

out_option = click.option(
    "--out", "-o", "out_dir", required=True, metavar="MODEL_DIR",
    callback=writable_output("folder"),
    help="Folder to write (model.onnx, description.json, export.json, ...).")


def variant_and_parity_options(check_data_help: str):
    """--fp16, --int8, --calib, --check-data (its help given here), --parity-images and
    --overwrite, in that order in --help."""
    options = [
        click.option("--fp16", is_flag=True, help="Also write model.fp16.onnx (float32 in/out)."),
        click.option("--int8", is_flag=True,
                     help="Also write model.int8.onnx (static QDQ); needs --calib."),
        click.option("--calib", metavar="DATA", default=None, callback=data_spec,
                     help="Real images to calibrate --int8 and to measure the probe-accuracy "
                          "change (a folder or a built-in, e.g. fashion-mnist:per_class=30)."),
        click.option("--check-data", metavar="DATA", default=None, callback=data_spec,
                     help=check_data_help),
        click.option("--parity-images", type=click.IntRange(1, 512), default=16,
                     show_default=True, help="How many real images the parity checks use."),
        click.option("--overwrite", is_flag=True,
                     help="Replace an existing MODEL_DIR (atomically)."),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command
    return decorate
