"""Export trained runs to one ONNX graph, prove it matches PyTorch, and write MODEL_DIR atomically.

MODEL_DIR/model.onnx         input `image` [batch, 3, S, S] float32 (already normalised), output
                             `embedding` [batch, D] (+ `logits_<head>` with logits=True); the model
                             description in metadata_props[ONNX_METADATA_KEY]
MODEL_DIR/description.json   the same description
MODEL_DIR/export.json        how it was made: exporter, optimisation, parity, variants, sizes
MODEL_DIR/model.fp16.onnx, model.int8.onnx, init_net.pb, predict_net.pb, value_info.json: optional

Several runs become one graph running every backbone: each penultimate vector is L-infinity
normalised (x / max|x|), then all are concatenated (MuCaLe-Net, SpeFiNet, MulDiP-Net).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
import warnings
from datetime import datetime, timezone

import numpy as np

from common.atomic import make_temp_dir
from common.description import ModelDescription, save_json_atomic
from common.model_dir import DESCRIPTION_FILE, MODEL_FILE

from . import parity as parity_mod
from . import variants as variants_mod
from .onnx_files import (  # ExportError is also imported from here by callers
    ExportError,
    count_ops,
    graph_io,
    publish_model_folder,
    set_description_metadata,
)
from .sources import Member, load_members, load_runs  # noqa: F401  (load_runs: imported from here too)

LINF_EPS = 1e-12
# Preprocessing fields that must agree for runs to share one input tensor.
SHARED_PREPROCESSING = ("input_size", "resize_size", "mean", "std", "background", "interpolation",
                        "resize_rounding")
MIN_OPSET = 17
DYNAMO_MIN_OPSET = 18
EXPORT_FORMAT_VERSION = 1


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Loading and checking runs

def check_shared_preprocessing(descs: list[ModelDescription], run_dirs: list[str]) -> None:
    """Runs combined into one graph read one input tensor, so their preprocessing must agree."""
    first = vars(descs[0].preprocessing)
    problems = []
    for desc, run_dir in zip(descs[1:], run_dirs[1:]):
        other = vars(desc.preprocessing)
        for key in SHARED_PREPROCESSING:
            if first[key] != other[key]:
                problems.append(f"{key}: {first[key]} ({run_dirs[0]}) vs {other[key]} ({run_dir})")
    if problems:
        raise ExportError("runs cannot be combined: their preprocessing differs -> "
                          + "; ".join(problems)
                          + ". Train them with the same input size and normalisation.")


def sanitise(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", str(name)).strip("_") or "head"


def output_names_for(descs: list[ModelDescription], logits: bool) -> tuple[list[str], list[dict]]:
    """['embedding', 'logits_<head>'...] and, per logits output, which run/head it comes from."""
    names, heads = ["embedding"], []
    if not logits:
        return names, heads
    for i, desc in enumerate(descs):
        for head in desc.heads:
            base = f"logits_{sanitise(head['name'])}" if len(descs) == 1 else \
                f"logits_{i}_{sanitise(head['name'])}"
            name, k = base, 2
            while name in names:
                name, k = f"{base}_{k}", k + 1
            names.append(name)
            heads.append({"output": name, "component": i, "name": head["name"],
                          "classes": list(head["classes"])})
    if len(names) == 1:
        raise ExportError("--logits asked, but none of the runs has a classification head")
    return names, heads


def build_export_module(networks, logits: bool):
    """The torch module that becomes the ONNX graph (see module docstring)."""
    import torch
    from torch import nn

    class ExportGraph(nn.Module):
        def __init__(self):
            super().__init__()
            self.networks = nn.ModuleList(networks)
            self.combine = len(networks) > 1
            self.logits = logits

        def forward(self, image):
            feats = [net.forward_features(image) for net in self.networks]
            if self.combine:
                normalised = [f / f.abs().amax(dim=1, keepdim=True).clamp_min(LINF_EPS)
                              for f in feats]
                embedding = torch.cat(normalised, dim=1)
            else:
                embedding = feats[0]
            outputs = [embedding]
            if self.logits:
                for net, f in zip(self.networks, feats):
                    outputs += [head(f) for head in net.heads]
            return tuple(outputs)

    return ExportGraph().eval()


# ---------------------------------------------------------------------------------------------
# Description and versions

def export_versions(opset: int, exporter: str) -> dict:
    import onnx
    import onnxruntime
    import torch
    out = {"torch": torch.__version__, "onnx": onnx.__version__,
           "onnxruntime": onnxruntime.__version__, "opset": opset, "exporter": exporter}
    try:
        import onnxscript
        out["onnxscript"] = onnxscript.__version__
    except ImportError:
        pass
    return out


def combined_description(descs: list[ModelDescription], run_dirs: list[str], feature_dim: int,
                         logits_heads: list[dict]) -> ModelDescription:
    """The exported model's description: the single run's, or one made for a combination."""
    sources = [os.path.abspath(r) if os.path.isdir(r) else r for r in run_dirs]
    if len(descs) == 1:
        desc = ModelDescription.from_dict(descs[0].to_dict())
        desc.combination = "single"
        desc.components = []
    else:
        first = descs[0]
        desc = ModelDescription(
            architecture="+".join(d.architecture for d in descs),
            feature_dim=feature_dim,
            preprocessing=first.preprocessing,
            levels=first.levels,
            heads=[],
            method="+".join(d.method for d in descs),
            data=first.data if all(d.data == first.data for d in descs) else {},
            combination="concat-linf",
            components=[dict(d.to_dict(), source_run=s) for d, s in zip(descs, sources)],
            versions=dict(first.versions))
    desc.feature_dim = feature_dim
    desc.source_runs = sources
    if logits_heads:
        desc.heads = [{"name": h["name"], "classes": h["classes"], "output": h["output"],
                       "component": h["component"]} for h in logits_heads]
    return desc


# ---------------------------------------------------------------------------------------------
# ONNX graph production

def torch_to_onnx(module, example, path: str, output_names: list[str], opset: int) -> dict:
    """torch.onnx.export: the dynamo exporter first, the legacy TorchScript one if it fails."""
    import torch
    info = {"exporter": None, "dynamo_error": None}
    if opset >= DYNAMO_MIN_OPSET:
        try:
            batch = torch.export.Dim("batch")
            torch.onnx.export(module, (example,), path, dynamo=True, opset_version=opset,
                              input_names=["image"], output_names=output_names,
                              dynamic_shapes={"image": {0: batch}}, optimize=True,
                              verbose=False, external_data=False)
            info["exporter"] = "dynamo"
            return info
        except Exception as e:  # any dynamo failure: record it, then try the legacy exporter
            info["dynamo_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            if os.path.exists(path):
                os.unlink(path)
    with warnings.catch_warnings():  # the legacy exporter is deprecated; we know, and record it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (example,), path, dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=output_names,
                          dynamic_axes={n: {0: "batch"} for n in ["image"] + output_names},
                          do_constant_folding=True)
    info["exporter"] = "torchscript"
    return info


def fold_batchnorm(model) -> int:
    """Fold each BatchNormalization that follows a Conv (weights in initializers) into the Conv.

    The exporters fold BN in eval mode already; this is the safety net. Returns how many it folded.
    """
    from onnx import numpy_helper
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    graph_outputs = {o.name for o in graph.output}
    folded, remove = 0, []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or consumers.get(conv.output[0], 0) != 1 \
                or conv.output[0] in graph_outputs:
            continue
        if not all(name in inits for name in list(bn.input[1:5]) + [conv.input[1]]):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64)
                                  for n in bn.input[1:5])
        weight = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        if len(conv.input) > 2 and conv.input[2]:
            if conv.input[2] not in inits:
                continue
            bias = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
        else:
            bias = np.zeros(weight.shape[0])
        factor = scale / np.sqrt(var + eps)
        new_w = (weight * factor.reshape(-1, *[1] * (weight.ndim - 1))).astype(np.float32)
        new_b = ((bias - mean) * factor + beta).astype(np.float32)
        stem = conv.name or conv.output[0]
        w_name, b_name = f"{stem}_bnfold_w", f"{stem}_bnfold_b"
        graph.initializer.extend([numpy_helper.from_array(new_w, w_name),
                                  numpy_helper.from_array(new_b, b_name)])
        del conv.input[1:]
        conv.input.extend([w_name, b_name])
        conv.output[0] = bn.output[0]
        remove.append(bn)
        folded += 1
    for bn in remove:
        graph.node.remove(bn)
    if folded:  # drop initializers nothing reads any more
        used = {i for n in graph.node for i in n.input}
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return folded


def ort_basic_optimise(src: str, dst: str) -> dict:
    """onnxruntime's BASIC (provider-independent) offline optimisation, kept only if the result
    stays plain ONNX (default domain only) and passes the checker."""
    import onnx
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = dst
    try:
        ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        optimised = onnx.load(dst)
        domains = {n.domain for n in optimised.graph.node} - {"", "ai.onnx"}
        if domains:
            return {"applied": False, "reason": f"non-standard ops from {sorted(domains)}"}
        onnx.checker.check_model(optimised)
        return {"applied": True}
    except Exception as e:
        return {"applied": False, "reason": f"{type(e).__name__}: {str(e)[:200]}"}
    finally:
        if os.path.exists(dst) and not os.path.getsize(dst):
            os.unlink(dst)


def optimise_in_place(path: str, *, quiet: bool = False):
    """onnxruntime's BASIC optimisation of the file at `path`, kept when it stays plain ONNX;
    then only the opset domains the nodes use, and a name for every node. Returns (the
    optimisation's report, the loaded model); the caller checks and saves the model. `quiet`
    silences onnxruntime's notes (foreign graphs make it list every unused constant)."""
    import onnx
    import onnxruntime as ort
    optimised = path + ".opt"
    if quiet:
        ort.set_default_logger_severity(3)
    try:
        applied = ort_basic_optimise(path, optimised)
    finally:
        if quiet:
            ort.set_default_logger_severity(2)  # onnxruntime's default: warnings
    if applied["applied"]:
        os.replace(optimised, path)
    elif os.path.exists(optimised):
        os.unlink(optimised)
    model = onnx.load(path)
    # onnxruntime's saved model imports every domain it knows; keep only those the nodes use.
    used_domains = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used_domains]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    for k, node in enumerate(model.graph.node):  # fp16 block lists and error messages use names
        if not node.name:
            node.name = f"{node.op_type}_{k}"
    return applied, model


def write_onnx(module, example, path: str, output_names: list[str], opset: int) -> dict:
    """Export, fold BatchNorm, check, optimise (portable), name every node. Returns a report."""
    import onnx
    report = torch_to_onnx(module, example, path, output_names, opset)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    report["batchnorm_folded_after_export"] = fold_batchnorm(model)
    report["nodes_exported"] = len(model.graph.node)
    onnx.save(model, path)
    report["ort_basic_optimisation"], model = optimise_in_place(path)
    left = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    if left:
        raise ExportError(f"BatchNormalization left unfolded in the graph: {left[:5]}")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    report["nodes"] = len(model.graph.node)
    report["ops"] = count_ops(model)
    return report


# ---------------------------------------------------------------------------------------------
# Atomic MODEL_DIR

def check_out_dir(out_dir: str, run_dirs: list[str], overwrite: bool) -> None:
    out = os.path.realpath(out_dir)
    for run_dir in run_dirs:
        run = os.path.realpath(run_dir)
        if out == run or run.startswith(out + os.sep):
            raise ExportError(f"--out {out_dir} would replace the run folder {run_dir}; "
                              "choose another folder")
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ExportError(f"{out_dir} exists and is not a folder")
        if os.listdir(out_dir) and not overwrite:
            raise ExportError(f"{out_dir} already exists and is not empty; pass --overwrite to "
                              "replace it, or choose another --out")


# ---------------------------------------------------------------------------------------------
# The export

def export_runs(sources: list, out_dir: str, formats=("onnx",), logits: bool = False,
                fp16: bool = False, int8_calib: str | None = None, opset: int = 18,
                parity_images: int = 16, check_data: str | None = None, overwrite: bool = False,
                variant_images: int = 300, calib_images: int = 200,
                taps: list[str] | None = None) -> dict:
    """Export sources (run folders, named architectures with their weights, model folders: see
    export.sources) into MODEL_DIR (see module docstring). Returns export.json's content.

    taps: multi-depth features instead of each member's penultimate ones (train.taps).
    Raises ExportError with a message naming the problem (bad run, mismatched preprocessing,
    existing out_dir, failed parity with its figures); nothing is left in out_dir then.
    """
    import torch

    started = time.perf_counter()
    sources = list(sources)
    formats = tuple(dict.fromkeys(formats or ("onnx",)))
    unknown = set(formats) - {"onnx", "caffe2"}
    if not sources:
        raise ExportError("give at least one RUN_DIR (or --arch)")
    if unknown:
        raise ExportError(f"unknown format(s) {sorted(unknown)}; choose onnx and/or caffe2")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old; use {MIN_OPSET} or newer (default 18)")
    if logits and taps:
        raise ExportError("--logits and --taps do not go together: the heads read the "
                          "penultimate features, which --taps replaces")
    folders = [s for s in sources if isinstance(s, str) and os.path.isdir(s)]
    check_out_dir(out_dir, folders, overwrite)
    if "caffe2" in formats:
        caffe2_modules()  # fail now, before minutes of work, if the converter is missing

    members = load_members(sources, taps)
    descs, labels = [m.desc for m in members], [m.label for m in members]
    if len(descs) > 1:
        check_shared_preprocessing(descs, labels)
    if len(members) == 1 and members[0].is_onnx:
        raise ExportError(f"{labels[0]} is a model folder already; give it with other sources to "
                          "combine them, or use --format triton to write its Triton repository")
    if any(m.is_onnx for m in members):
        return export_composed(members, out_dir, formats=formats, fp16=fp16,
                               int8_calib=int8_calib, opset=opset, parity_images=parity_images,
                               check_data=check_data, overwrite=overwrite, folders=folders,
                               variant_images=variant_images, calib_images=calib_images,
                               logits=logits, started=started)
    output_names, logits_heads = output_names_for(descs, logits)
    module = build_export_module([m.network for m in members], logits)

    log(f"export: loading real images to check parity ({parity_images})")
    check_data = check_data or parity_mod.default_check_data(descs)
    images, image_source = parity_mod.load_check_images(descs, check_data, parity_images)
    with torch.no_grad():
        feature_dim = int(module(torch.from_numpy(images[:1]))[0].shape[1])
    desc = combined_description(descs, labels, feature_dim, logits_heads)

    # batch 2: an example batch of 1 would let the exporter specialise the batch dimension
    example = torch.from_numpy(np.concatenate([images, images])[:2])
    return write_model_dir(
        out_dir, desc, descs, images, image_source,
        make_graph=lambda path: write_onnx(module, example, path, output_names, opset),
        reference=lambda: parity_mod.torch_outputs(module, images, output_names),
        folders=folders, overwrite=overwrite, formats=formats, opset=opset, fp16=fp16,
        int8_calib=int8_calib, check_data=check_data, variant_images=variant_images,
        calib_images=calib_images, started=started)


def write_model_dir(out_dir: str, desc: ModelDescription, descs: list[ModelDescription],
                    images: np.ndarray, image_source: dict, *, make_graph, reference, folders,
                    overwrite: bool, formats, opset: int, fp16: bool, int8_calib: str | None,
                    check_data: str | None, variant_images: int, calib_images: int,
                    started: float) -> dict:
    """Long because it is the one sequence every export goes through, in a temporary folder
    renamed into place at the end: the graph (`make_graph(path)` -> its report), the description,
    parity against `reference()` (the outputs the graph must reproduce), the variants, Caffe2,
    export.json. Nothing is left behind when any step fails."""
    feature_dim = desc.feature_dim
    parent, base = os.path.split(os.path.abspath(out_dir))
    tmp_dir = make_temp_dir(parent, tag=base)
    try:
        model_path = os.path.join(tmp_dir, MODEL_FILE)
        log(f"export: {desc.architecture} -> ONNX (opset {opset})")
        t0 = time.perf_counter()
        graph_report = make_graph(model_path)
        export_seconds = time.perf_counter() - t0
        desc.versions = dict(desc.versions, export=export_versions(opset, graph_report["exporter"]))
        desc_dict = desc.to_dict()

        import onnx
        model = onnx.load(model_path)
        set_description_metadata(model, desc_dict)
        onnx.save(model, model_path)
        save_json_atomic(os.path.join(tmp_dir, DESCRIPTION_FILE), desc_dict)

        log("export: parity onnxruntime vs PyTorch")
        parity = {"images": len(images), "image_source": image_source,
                  "onnxruntime": parity_mod.check_parity(model_path, reference(), images)}

        variants = {}
        if fp16 or int8_calib:
            variants = variants_mod.make_variants(
                model_path, tmp_dir, desc_dict, descs, images, fp16=fp16, int8_calib=int8_calib,
                check_data=check_data, variant_images=variant_images, calib_images=calib_images)

        if "caffe2" in formats:
            parity["caffe2"] = export_caffe2(model_path, tmp_dir, images)

        report = {
            "format_version": EXPORT_FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source_runs": desc.source_runs,
            "combination": desc.combination,
            "architecture": desc.architecture,
            "feature_dim": feature_dim,
            "formats": ["onnx"] + [f for f in formats if f != "onnx"],
            "opset": opset,
            **{k: graph_report[k] for k in ("exporter", "dynamo_error")},
            "graph": {k: v for k, v in graph_report.items()
                      if k not in ("exporter", "dynamo_error")},
            "io": graph_io(model_path),
            "parity": parity,
            "variants": variants,
            "versions": desc.versions["export"],
            "timings_s": {"onnx_export": round(export_seconds, 3),
                          "total": round(time.perf_counter() - started, 3)},
        }
        publish_model_folder(tmp_dir, out_dir, report,
                             lambda: check_out_dir(out_dir, folders, overwrite))
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    log(f"export: wrote {out_dir} ({report['timings_s']['total']:.1f} s)")
    return report


def export_composed(members: list[Member], out_dir: str, *, formats, fp16: bool,
                    int8_calib: str | None, opset: int, parity_images: int,
                    check_data: str | None, overwrite: bool, folders, variant_images: int,
                    calib_images: int, logits: bool, started: float) -> dict:
    """export_runs for sources that include model folders (see the module docstring)."""
    import tempfile

    import torch
    from torch import nn

    from .compose import compose_graph, composed_reference
    if logits:
        raise ExportError("--logits is not available when a model folder is a member (its "
                          "graph exposes only its embedding)")
    descs = [m.desc for m in members]
    torch_members = [m for m in members if not m.is_onnx]
    torch_outputs = [f"member{k}" for k in range(len(torch_members))]

    class Members(nn.Module):
        def __init__(self):
            super().__init__()
            self.networks = nn.ModuleList(m.network for m in torch_members)

        def forward(self, image):
            return tuple(net.forward_features(image) for net in self.networks)

    module = Members().eval()
    check_data = check_data or parity_mod.default_check_data(descs)
    log(f"export: loading real images to check parity ({parity_images})")
    images, image_source = parity_mod.load_check_images(descs, check_data, parity_images)
    reference = composed_reference(members, module, torch_outputs, images)
    desc = combined_description(descs, [m.label for m in members],
                                int(reference["embedding"].shape[1]), [])

    def make_graph(path: str) -> dict:
        with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as scratch:
            torch_path = None
            report: dict = {}
            if torch_members:
                torch_path = os.path.join(scratch, "members.onnx")
                example = torch.from_numpy(np.concatenate([images, images])[:2])
                report = write_onnx(module, example, torch_path, torch_outputs, opset)
            composed = compose_graph(members, torch_path, torch_outputs, path, opset)
            return dict(composed, torch_members=report)

    return write_model_dir(
        out_dir, desc, descs, images, image_source, make_graph=make_graph,
        reference=lambda: reference, folders=folders, overwrite=overwrite, formats=formats,
        opset=opset, fp16=fp16, int8_calib=int8_calib, check_data=check_data,
        variant_images=variant_images, calib_images=calib_images, started=started)


# ---------------------------------------------------------------------------------------------
# Caffe2 (converter and NumPy executor live in export.caffe2 / export.caffe2_exec)

def caffe2_modules():
    try:
        from . import caffe2, caffe2_exec
    except ImportError as e:
        raise ExportError(f"--format caffe2 is not available in this build ({e}); export with "
                          "--format onnx only") from e
    for mod, fn in ((caffe2, "convert_onnx_file"), (caffe2_exec, "run_caffe2")):
        if not hasattr(mod, fn):
            raise ExportError(f"--format caffe2 is not available: {mod.__name__}.{fn} is missing")
    return caffe2, caffe2_exec


def export_caffe2(model_path: str, out_dir: str, images: np.ndarray) -> dict:
    """Convert the fp32 ONNX graph to Caffe2 nets and prove them against onnxruntime, with the
    NumPy reference executor and, where `make caffe2-env` built it, the real Caffe2 runtime."""
    caffe2_modules()
    from .caffe2_proof import prove_caffe2
    log("export: Caffe2 conversion and parity (reference executor and real Caffe2 runtime vs onnxruntime)")
    result = prove_caffe2(model_path, out_dir, images)
    real = result["real_runtime"]
    log("export: Caffe2 proven by " + " and ".join(result["proved_by"])
        + ("" if real.get("available") else f" ({real['reason']})"))
    return result
