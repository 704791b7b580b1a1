"""Import a foreign image ONNX into a model folder that the runtime reads like our own exports.

    import_onnx("convnext.onnx", "models/cx", input_size=224, resize_size=256,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic")
    import_onnx("vit.onnx", "models/vit", like="timm:vit_small_patch16_224")

MODEL_DIR gets what `export` writes (common.model_dir): model.onnx (input `image` float32
[batch, 3, S, S], output `embedding` [batch, D], the description in its metadata),
description.json, export.json, and model.fp16.onnx / model.int8.onnx when asked. So embed,
probe, serve, bulk jobs, evaluate and `export --format triton` take it unchanged, and the
runtime puts its uint8 front on it (normalisation inside the graph, runtime.prefix).

The preprocessing cannot be read off an ONNX file: it is given by options, or borrowed from an
architecture of our registry or timm's (`like`); options given beside `like` win. The graph
is rewritten by export.import_graph, then proven on real images against the original file in
onnxruntime: the rewritten fp32 graph at batch 1 and 7 (which also proves that a fixed batch
was opened correctly), and the graph with the runtime's uint8 front on the uint8 crops. Only
when every check passed is the folder renamed into place: a failed import leaves nothing.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from common.atomic import make_temp_dir
from common.description import INTERPOLATIONS, ModelDescription, Preprocessing, save_json_atomic
from common.model_dir import DESCRIPTION_FILE, MODEL_FILE

from . import import_graph as G
from . import import_taps as T
from . import parity as parity_mod
from . import variants as variants_mod
from .import_graph import ImportOnnxError
from .onnx_export import (
    EXPORT_FORMAT_VERSION,
    check_out_dir,
    fold_batchnorm,
    log,
    optimise_in_place,
)
from .onnx_files import (
    count_ops,
    file_info,
    graph_io,
    publish_model_folder,
    set_description_metadata,
)

IMPORT_EXPORTER = "import"
DEFAULT_CHECK_PHOTOS = 48     # the default parity images: crops of the photos packages ship
UINT8_FRONT_MIN_COSINE = 0.9999


@dataclass
class PreprocessingOptions:
    """What the user said about preprocessing; None: not given (borrowed or defaulted)."""

    input_size: int | None = None
    resize_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: str | None = None
    resize_rounding: str | None = None  # "round" | "truncate", where Preprocessing has it
    like: str | None = None
    given: dict = field(default_factory=dict)


def preprocessing_like(name: str) -> tuple[Preprocessing, str]:
    """The evaluation preprocessing of architecture `name`: `timm:NAME` from timm's resolved
    data config (timm must be installed), else an architecture of train.models' registry."""
    if name.startswith("timm:"):
        return _timm_preprocessing(name[len("timm:"):]), f"timm data config of {name[5:]}"
    try:
        from train.models import ARCHITECTURES, default_preprocessing
    except ImportError as e:
        raise ImportOnnxError(f"--like {name}: the architecture registry needs the training "
                              f"extras ({e}); give --input-size/--resize-size/--mean/--std "
                              "instead") from e
    unknown = (f"--like {name}: unknown architecture; choose from {', '.join(ARCHITECTURES)} "
               "or timm:NAME")
    if name not in ARCHITECTURES and not name.startswith("torchvision:"):
        raise ImportOnnxError(unknown)
    try:
        return default_preprocessing(name), f"architecture {name}"
    except KeyError as e:  # a registry without torchvision:NAME architectures
        raise ImportOnnxError(unknown) from e


def _timm_preprocessing(name: str) -> Preprocessing:
    """timm's eval transform: Resize(floor(S / crop_pct)) with torchvision's truncated long
    side, CenterCrop(S), timm's interpolation, mean and std."""
    try:
        import timm
        import timm.data
        from timm.models import get_pretrained_cfg
    except ImportError as e:
        raise ImportOnnxError(f"--like timm:{name} needs timm (pip install timm); or give "
                              "--input-size/--resize-size/--mean/--std") from e
    if not timm.is_model(name):
        raise ImportOnnxError(f"--like timm:{name}: timm has no architecture {name!r} (see "
                              "timm.list_models())")
    cfg = get_pretrained_cfg(name)
    data = timm.data.resolve_data_config({}, pretrained_cfg=cfg.to_dict() if cfg else None)
    _, height, width = data["input_size"]
    if height != width:
        raise ImportOnnxError(f"--like timm:{name}: its input is {height}x{width}; the runtime "
                              "feeds square crops (give --input-size S and the rest instead)")
    interpolation = data.get("interpolation", "bilinear")
    # from_dict: keeps only the fields this build's Preprocessing knows (resize_rounding is new)
    return Preprocessing.from_dict({
        "input_size": int(height),
        "resize_size": int(math.floor(height / float(data.get("crop_pct") or 1.0))),
        "mean": [float(x) for x in data["mean"]], "std": [float(x) for x in data["std"]],
        "interpolation": interpolation if interpolation in INTERPOLATIONS else "bilinear",
        "resize_rounding": "truncate"})


def resolve_preprocessing(opts: PreprocessingOptions, graph_size: int | None, path: str
                          ) -> tuple[Preprocessing, dict]:
    """The Preprocessing of the import and where each field came from."""
    base, source = (preprocessing_like(opts.like) if opts.like else (None, None))
    values: dict = {}
    origin: dict = {}
    known = Preprocessing.__dataclass_fields__
    if opts.resize_rounding is not None and "resize_rounding" not in known:
        raise ImportOnnxError("--resize-rounding: this build's preprocessing always rounds the "
                              "long side; drop the option")
    for key in ("input_size", "resize_size", "mean", "std", "interpolation", "resize_rounding"):
        given = getattr(opts, key)
        if given is not None:
            values[key], origin[key] = given, "option"
        elif base is not None and key in known:
            values[key], origin[key] = getattr(base, key), source
    if "input_size" not in values and graph_size:
        values["input_size"], origin["input_size"] = graph_size, "the graph's input shape"
    if graph_size and values.get("input_size") not in (None, graph_size):
        raise ImportOnnxError(f"{path}: the model takes {graph_size}x{graph_size} images but "
                              f"the input size is {values['input_size']} "
                              f"({origin['input_size']}); drop --input-size or give "
                              f"{graph_size}")
    if "interpolation" not in values:
        values["interpolation"], origin["interpolation"] = "bilinear", "default"
    missing = [f"--{k.replace('_', '-')}" for k in ("input_size", "resize_size", "mean", "std")
               if k not in values]
    if missing:
        raise ImportOnnxError(f"{path}: the preprocessing the model expects is not in the ONNX "
                              f"file: give {', '.join(missing)} (or --like ARCH, e.g. "
                              "--like timm:resnet50)")
    merged = dict(vars(base)) if base is not None else {}  # background, resize convention...
    merged.update(values)
    pre = Preprocessing(**{k: v for k, v in merged.items() if k in known})
    problem = pre.problem()
    if problem:
        raise ImportOnnxError(f"{path}: {problem}")
    return pre, origin


# ---------------------------------------------------------------------------------------------
# Real images: uint8 crops (what the runtime decodes) and the normalised floats made from them

def default_check_data() -> str:
    """A folder of real photos (crops of the photos matplotlib and scikit-learn ship), cached."""
    from benchmarks.corpus import ensure_corpus
    return ensure_corpus(count=DEFAULT_CHECK_PHOTOS)


def load_crops(check_data: str, n: int, pre: Preprocessing) -> tuple[np.ndarray, np.ndarray, dict]:
    """(uint8 crops NxSxSx3, normalised floats Nx3xSxS, source facts): the reference transform
    of common.images on n real images of `check_data`, spread over its classes."""
    from common.data import load_dataset
    from common.images import ImageDecodeError, normalize, open_image, resize_and_crop
    try:
        dataset = load_dataset(check_data)
    except Exception as e:  # DataError, missing folder or data package
        raise ImportOnnxError(f"--check-data {check_data}: {G._one_line(e)}") from e
    samples = parity_mod.pick_samples(dataset, n)
    crops, classes = [], set()
    for path, label in samples:
        try:
            img = resize_and_crop(open_image(path, pre.background), pre)
        except ImageDecodeError as e:
            log(f"skipped: {e}")
            continue
        crops.append(np.asarray(img, dtype=np.uint8))
        classes.add(label)
    if not crops:
        raise ImportOnnxError(f"--check-data {check_data}: none of the images could be decoded")
    batch = np.stack(crops)
    floats = np.stack([normalize(c, pre) for c in batch]).astype(np.float32)
    return batch, floats, {"data": check_data, "count": len(batch), "classes": len(classes)}


# ---------------------------------------------------------------------------------------------
# Running the original and the rewritten graph

def original_outputs(path: str, facts: G.InputFacts, output: str, images: np.ndarray
                     ) -> np.ndarray:
    """The chosen output of the ORIGINAL file on `images`: one image at a time when its batch
    is open, in batches of its fixed size otherwise (the last one padded)."""
    step = facts.batch or 1
    chunks = []
    try:
        session = parity_mod.new_session(path)
        for start in range(0, len(images), step):
            batch = images[start:start + step]
            padded = np.concatenate([batch, np.repeat(batch[-1:], step - len(batch), 0)]) \
                if len(batch) < step else batch
            y = session.run([output], {facts.name: padded})[0]
            chunks.append(np.asarray(y, np.float32)[:len(batch)])
    except Exception as e:  # onnxruntime's own errors: an IR version or operator it lacks...
        raise ImportOnnxError(f"{path}: onnxruntime cannot run the original file on "
                              f"{facts.batch or 1}x3x{images.shape[-1]}x{images.shape[-1]} "
                              f"images ({G._one_line(e)})") from e
    reference = np.concatenate(chunks)
    if reference.ndim == 4 and reference.shape[2:] == (1, 1):
        reference = reference.reshape(len(reference), -1)
    if reference.ndim != 2:
        raise ImportOnnxError(f"{path}: the output {output} gives {list(reference.shape[1:])} "
                              "per image, not a vector; choose a pooled output with --output")
    return reference


def prove_rewritten(model_path: str, reference: np.ndarray, images: np.ndarray,
                    facts: G.InputFacts, src: str) -> dict:
    """Parity of the rewritten graph against the original, fresh sessions at batch 1 and 7:
    this is where a batch that only looks dynamic, or a fixed one that could not be opened,
    is found."""
    fixed = (f"{src}: the model has a fixed batch of {facts.batch} that cannot be made "
             "dynamic ({}); export it with a dynamic batch dimension "
             "(torch.onnx.export(..., dynamic_axes={{'input': {{0: 'batch'}}}}))")
    try:
        _runs_quietly(model_path, images[:7])  # onnxruntime's refusal, without its log lines
    except Exception as e:  # onnxruntime's own error types
        if facts.batch:
            raise ImportOnnxError(fixed.format(f"at batch 7: {G._one_line(e)}")) from e
        raise ImportOnnxError(f"{src}: the input declares a dynamic batch, but the graph "
                              f"fails at batch 7 ({G._one_line(e)}); re-export it with a "
                              "truly dynamic batch") from e
    try:
        result = parity_mod.check_parity(model_path, {G.OUTPUT_NAME: reference}, images)
    except ImportOnnxError:
        raise
    except Exception as e:  # the figures are off (ExportError), or a run failed
        detail = G._one_line(e).replace("onnxruntime vs PyTorch ", "")
        if facts.batch:
            raise ImportOnnxError(fixed.format(f"other batch sizes give other embeddings: "
                                               f"{detail}")) from e
        raise ImportOnnxError(f"{src}: the imported graph does not compute what the original "
                              f"does image by image ({detail})") from e
    result["reference"] = "the original ONNX file"
    return result


def _runs_quietly(model_path: str, batch: np.ndarray) -> None:
    """One run of `batch`, onnxruntime's own logging off (its failure is raised, and said
    once, by the caller)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4
    session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    session.run([G.OUTPUT_NAME], {G.INPUT_NAME: batch}, run_options)


def prove_uint8_front(model_path: str, desc: ModelDescription, crops: np.ndarray,
                      reference: np.ndarray) -> dict:
    """The runtime's uint8 front (runtime.prefix) on the imported graph, fed uint8 crops,
    against the original file fed the floats: what embed and serve will compute."""
    import onnxruntime as ort

    from runtime.prefix import PrefixError, uint8_input_model
    try:
        front = uint8_input_model(model_path, desc)
    except PrefixError as e:
        raise ImportOnnxError(f"the runtime's uint8 front does not fit the imported graph "
                              f"({e})") from e
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(front.model, opts, providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run([G.OUTPUT_NAME], {front.input_name: crops[i:i + 7]})[0]
                          for i in range(0, len(crops), 7)])
    figures = parity_mod.compare(reference, got)
    figures["ok"] = bool(figures.get("finite")) and figures["min_cosine"] >= UINT8_FRONT_MIN_COSINE
    figures["min_cosine_required"] = UINT8_FRONT_MIN_COSINE
    if not figures["ok"]:
        raise ImportOnnxError(f"uint8 front parity failed, nothing written: min cosine "
                              f"{figures['min_cosine']:.6f} < {UINT8_FRONT_MIN_COSINE}")
    return figures


def optimise(model_path: str) -> dict:
    """The portable clean-up our export applies: BatchNorm folded into Convs, onnxruntime's
    BASIC optimisation kept when it stays plain ONNX. The parity run judges the result."""
    import onnx
    model = onnx.load(model_path)
    report = {"batchnorm_folded": fold_batchnorm(model), "nodes_imported": len(model.graph.node)}
    onnx.save(model, model_path)
    report["ort_basic_optimisation"], model = optimise_in_place(model_path, quiet=True)
    onnx.checker.check_model(model)
    onnx.save(model, model_path)
    report["nodes"], report["ops"] = len(model.graph.node), count_ops(model)
    return report


# ---------------------------------------------------------------------------------------------
# The import

def _description(src: str, pre: Preprocessing, feature_dim: int, name: str | None,
                 imported: dict) -> ModelDescription:
    import onnx
    import onnxruntime
    stem = os.path.splitext(os.path.basename(src))[0]
    return ModelDescription(
        architecture=name or f"onnx:{stem}", feature_dim=feature_dim, preprocessing=pre,
        method="imported", combination="single",
        versions={"export": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                             "opset": imported["opset"], "exporter": IMPORT_EXPORTER}},
        extra={"imported": imported})


def _source_facts(src: str, model, facts: G.InputFacts) -> dict:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"file": os.path.abspath(src), "sha256": file_info(src)["sha256"],
            "producer": f"{model.producer_name} {model.producer_version}".strip(),
            "opset": opset, "input": facts.name,
            "outputs": [o.name for o in model.graph.output]}


def _check_out(src: str, out_dir: str, overwrite: bool) -> None:
    out, source = os.path.realpath(out_dir), os.path.realpath(src)
    if source.startswith(out + os.sep):
        raise ImportOnnxError(f"--out {out_dir} holds the file being imported ({src}); "
                              "choose another folder")
    check_out_dir(out_dir, [], overwrite)


def import_onnx(src: str, out_dir: str, preprocessing: PreprocessingOptions | None = None, *,
                output: str | None = None, name: str | None = None,
                check_data: str | None = None, parity_images: int = 16, fp16: bool = False,
                int8_calib: str | None = None, overwrite: bool = False,
                taps: str | list[str] | None = None,
                variant_images: int = 300, calib_images: int = 200) -> dict:
    """Import the ONNX file `src` into MODEL_DIR `out_dir` (see the module docstring); returns
    export.json's content. Raises ImportOnnxError (one line) and writes nothing when the file
    cannot be imported or a proof fails.

    Long because it is the import's one sequence (read, check, resolve, rewrite, prove,
    variants, write), kept in order so that what is proven before the rename reads top down."""
    import onnx
    started = time.perf_counter()
    _check_out(src, out_dir, overwrite)
    model = G.read_foreign(src)
    facts = G.image_input(model, src)
    chosen = G.choose_output(model, output, src)
    tap_names = T.parse_taps(taps)
    T.check_names(model, tap_names, src)
    pre, origin = resolve_preprocessing(preprocessing or PreprocessingOptions(), facts.size, src)
    imported = _source_facts(src, model, facts)
    imported.update(embedding_output=chosen, preprocessing_from=origin)
    rewrite = G.rewrite(model, facts, chosen, pre.input_size, src,
                        keep=[t for t in tap_names if t != T.FINAL])
    imported["rewrite"] = rewrite.to_dict()

    check_data = check_data or default_check_data()
    log(f"import: real images of {check_data} for parity ({parity_images})")
    crops, images, image_source = load_crops(check_data, parity_images, pre)
    if tap_names:
        reference, tap_info = T.tapped_reference(src, facts, chosen, tap_names, images)
        T.add_tap_head(model, tap_names, tap_info)
    else:
        reference = original_outputs(src, facts, chosen, images)
    desc = _description(src, pre, int(reference.shape[1]), name, imported)
    if tap_names:
        desc.extra["taps"] = [{"tap": t["tap"], "dim": t["dim"]} for t in tap_info]
    desc_dict = desc.to_dict()

    parent, base = os.path.split(os.path.abspath(out_dir))
    tmp_dir = make_temp_dir(parent, tag=base)
    try:
        model_path = os.path.join(tmp_dir, MODEL_FILE)
        try:
            onnx.save(model, model_path)
            del model
            graph_report = optimise(model_path)
        except Exception as e:  # the checker, or protobuf, on a graph the rewrite broke
            raise ImportOnnxError(f"{src}: the rewritten graph is not valid ONNX "
                                  f"({G._one_line(e)}); please report this file") from e
        final = onnx.load(model_path)
        set_description_metadata(final, desc_dict)
        onnx.save(final, model_path)
        del final
        save_json_atomic(os.path.join(tmp_dir, DESCRIPTION_FILE), desc_dict)

        log("import: parity of the imported graph vs the original file (onnxruntime)")
        parity = {"images": len(images), "image_source": image_source,
                  "onnxruntime": prove_rewritten(model_path, reference, images, facts, src),
                  "uint8_front": prove_uint8_front(model_path, desc, crops, reference)}
        variants = {}
        if fp16 or int8_calib:
            variants = variants_mod.make_variants(
                model_path, tmp_dir, desc_dict, [desc], images, fp16=fp16,
                int8_calib=int8_calib, check_data=check_data, variant_images=variant_images,
                calib_images=calib_images)
        report = {
            "format_version": EXPORT_FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source_runs": [], "imported_from": imported,
            "combination": "single", "architecture": desc.architecture,
            "feature_dim": desc.feature_dim, "formats": ["onnx"], "opset": imported["opset"],
            "exporter": IMPORT_EXPORTER, "dynamo_error": None, "graph": graph_report,
            "io": graph_io(model_path), "parity": parity, "variants": variants,
            "versions": desc.versions["export"],
            "timings_s": {"total": round(time.perf_counter() - started, 3)},
        }
        publish_model_folder(tmp_dir, out_dir, report,
                             lambda: _check_out(src, out_dir, overwrite))
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    log(f"import: wrote {out_dir} ({report['timings_s']['total']:.1f} s)")
    return report
