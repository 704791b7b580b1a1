"""`import`: a foreign image ONNX -> a model folder (the logic is export.import_onnx)."""
from __future__ import annotations

import math

import click

from common.description import INTERPOLATIONS

from .options import out_option, variant_and_parity_options


def _three_floats(ctx, param, value):
    """A,B,C -> [A, B, C] (finite numbers, one per RGB channel)."""
    if value is None:
        return None
    parts = [p for p in value.replace(" ", "").split(",") if p]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 3 or not all(math.isfinite(x) for x in numbers):
        raise click.BadParameter(f"{value!r}: give three numbers A,B,C (one per RGB channel), "
                                 "e.g. 0.485,0.456,0.406", ctx, param)
    return numbers


@click.command("import")
@click.argument("model_file", metavar="MODEL.onnx")
@out_option
@click.option("--input-size", type=click.IntRange(1, 4096), default=None,
              help="Side S of the square crop the model takes (default: the graph's own, when "
                   "it fixes one).")
@click.option("--resize-size", type=click.IntRange(1, 8192), default=None,
              help="Shorter side the image is resized to before the centre crop.")
@click.option("--mean", callback=_three_floats, default=None, metavar="A,B,C",
              help="Per-channel mean on the [0, 1] scale, e.g. 0.485,0.456,0.406.")
@click.option("--std", callback=_three_floats, default=None, metavar="A,B,C",
              help="Per-channel std on the [0, 1] scale, e.g. 0.229,0.224,0.225.")
@click.option("--interpolation", type=click.Choice(INTERPOLATIONS), default=None,
              help="Resize filter (default: borrowed with --like, else bilinear).")
@click.option("--resize-rounding", type=click.Choice(["round", "truncate"]), default=None,
              help="How the long side's length is made whole after the resize: round (our "
                   "models) or truncate (torchvision's Resize, so timm's and torchvision's "
                   "transforms; borrowed with --like). Default: round.")
@click.option("--like", metavar="ARCH", default=None,
              help="Borrow the preprocessing of an architecture: one of our registry "
                   "(resnet50, efficientnet_lite0, ...) or timm:NAME (timm's resolved data "
                   "config; needs timm). Options given beside it win.")
@click.option("--output", "output", metavar="NAME", default=None,
              help="The graph output to use as the embedding (default: the only output, or "
                   "the one named like an embedding).")
@click.option("--taps", metavar="TENSOR,...", default=None,
              help="Multi-depth features: intermediate tensors of the graph (by name) and/or "
                   "final, each pooled (maps: global average; tokens: mean), L-infinity "
                   "normalised and concatenated into the embedding.")
@click.option("--name", metavar="NAME", default=None,
              help="Architecture name in the description (default: onnx:<file stem>).")
@variant_and_parity_options("Real images for the parity checks (default: crops of the photos "
                            "that matplotlib and scikit-learn ship).")
def import_model(model_file, out_dir, input_size, resize_size, mean, std, interpolation,
                 resize_rounding, like, output, taps, name, fp16, int8, calib, check_data,
                 parity_images, overwrite):
    """Import an image ONNX exported elsewhere into a model folder, proven on real images.

    \b
    The model must take one float32 image tensor [batch, 3, H, W], already normalised (as
    timm's and torchvision's models do). The folder written looks to embed, probe, serve,
    bulk jobs, evaluate and `export --format triton` exactly like one `export` wrote: input
    `image`, output `embedding`, a dynamic batch (a fixed one is opened when the graph
    allows it), the runtime's uint8 front, and fp16/int8 variants on request. The rewritten
    graph is proven against the original file in onnxruntime before anything is written.

    \b
    Examples:
      python cli.py import convnext.onnx --out models/cx --input-size 224 --resize-size 256 \\
          --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --interpolation bicubic
      python cli.py import vit.onnx --out models/vit --like timm:vit_small_patch16_224
      python cli.py import clip_visual.onnx --out models/clip --like timm:vit_base_patch16_clip_224 \\
          --output image_embeds --fp16
    """
    if int8 and not calib:
        raise click.UsageError("--int8 needs --calib DATA: real images to calibrate the "
                               "activation ranges (e.g. --calib fashion-mnist:per_class=30)")
    if calib and not int8:
        raise click.UsageError("--calib is only used with --int8")
    from .import_onnx import PreprocessingOptions, import_onnx
    options = PreprocessingOptions(input_size=input_size, resize_size=resize_size, mean=mean,
                                   std=std, interpolation=interpolation,
                                   resize_rounding=resize_rounding, like=like)
    report = import_onnx(model_file, out_dir, options, output=output, name=name,
                         check_data=check_data, parity_images=parity_images, fp16=fp16,
                         int8_calib=calib if int8 else None, overwrite=overwrite, taps=taps)
    click.echo(summary(out_dir, report))


def summary(out_dir: str, report: dict) -> str:
    from common.model_dir import ModelDir
    imported = report["imported_from"]
    pre = ModelDir(out_dir).description.preprocessing
    by_source: dict[str, list[str]] = {}
    for key, source in imported["preprocessing_from"].items():
        by_source.setdefault(source, []).append(key)
    lines = [f"{out_dir}: {report['architecture']} imported from {imported['file']} "
             f"(output {imported['embedding_output']!r}), {report['feature_dim']}-d embedding",
             f"  preprocessing: resize {pre.resize_size} ({pre.interpolation}), crop "
             f"{pre.input_size}, mean {pre.mean}, std {pre.std}; from "
             + "; ".join(f"{source} ({', '.join(keys)})" for source, keys in by_source.items())]
    taps = ModelDir(out_dir).description.extra.get("taps")
    if taps:
        lines.append("  taps: " + ", ".join(f"{t['tap']} ({t['dim']}-d)" for t in taps))
    rewrite = imported["rewrite"]
    if rewrite["batch_was"] != "dynamic":
        lines.append(f"  fixed batch {rewrite['batch_was']} opened to a dynamic batch"
                     + (f" ({rewrite['opened_reshapes']} Reshape targets rewritten)"
                        if rewrite["opened_reshapes"] else ""))
    fig = report["parity"]["onnxruntime"]["outputs"]["embedding"]
    lines.append(f"  parity vs the original file (batch 1 and 7): max abs diff "
                 f"{fig['max_abs_diff']:.2e}, min cosine {fig['min_cosine']:.7f}")
    front = report["parity"]["uint8_front"]
    lines.append(f"  parity of the runtime's uint8 front: min cosine {front['min_cosine']:.7f}")
    for variant, v in report.get("variants", {}).items():
        emb = v["drift_vs_fp32"]["outputs"]["embedding"]
        lines.append(f"  {variant}: {v['bytes'] / 1e6:.2f} MB, cosine to fp32 min "
                     f"{emb['min_cosine']:.5f}, probe accuracy {v['probe']['accuracy_fp32']:.3f}"
                     f" -> {v['probe']['accuracy']:.3f}")
    return "\n".join(lines)
