"""Reduced-precision variants of an exported fp32 graph, judged as embedding models.

model.fp16.onnx  float16 weights and activations, float32 input and output; the combination's
                 final normalisation (Abs/ReduceMax/Clip/Div/Concat) stays float32.
model.int8.onnx  static QDQ quantisation (per-channel QInt8 weights, QUInt8 activations),
                 calibrated on real images of the --calib data.

Each variant records its cosine drift against the fp32 graph (fresh sessions, batch 1 and 7) and
the change in linear-probe accuracy on a held-out half of a small labelled real set.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

from common.model_dir import VARIANT_FILES

from .onnx_files import ExportError, file_info, set_description_metadata
from .parity import (
    cosine_rows,
    decode_images,
    load_labelled_images,
    new_session,
    pick_samples,
    resolve_dataset,
    run_onnx,
)

# Ops of the graph's tail (after the last backbone op) kept in float32 / left unquantised.
TAIL_OPS = {"Abs", "ReduceMax", "Clip", "Max", "Div", "Concat", "Identity", "Cast"}
FP16_MIN_COSINE = 0.999   # below this the fp16 graph is broken, not just rounded
INT8_WARN_MEAN_COSINE = 0.98


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tail_nodes(model, output: str = "embedding") -> list[str]:
    """Names of the nodes between `output` and the backbones: walking back from the output
    through TAIL_OPS only (for combinations: the L-inf normalisation and the concatenation)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    names, stack, seen = [], [output], set()
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in seen or node.op_type not in TAIL_OPS:
            continue
        seen.add(node.name)
        names.append(node.name)
        stack.extend(node.input)
    return names


def _finish(model, path: str, desc_dict: dict, variant: str) -> None:
    import onnx

    set_description_metadata(model, dict(desc_dict, extra=dict(desc_dict.get("extra") or {},
                                                                variant=variant)))
    onnx.checker.check_model(model)
    onnx.save(model, path)


def separate_consumed_outputs(model) -> None:
    """Give each graph output that other nodes also read (the embedding feeding the logits
    heads) its own Identity, so that the fp16 converter's output casts do not hand float32 to
    those readers."""
    import onnx
    outputs = {o.name for o in model.graph.output}
    read = {i for n in model.graph.node for i in n.input}
    for name in sorted(outputs & read):
        inner = f"{name}__value"
        for node in model.graph.node:
            node.output[:] = [inner if o == name else o for o in node.output]
            node.input[:] = [inner if i == name else i for i in node.input]
        model.graph.node.append(onnx.helper.make_node("Identity", [inner], [name],
                                                      name=f"{name}_output"))


def restore_float_outputs(converted, original) -> None:
    """keep_io_types is not honoured for outputs whose producer is on the block list (the
    converter appends a Cast to float16): turn such final Casts into Casts to float32."""
    import onnx
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    wanted = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    producers = {o: n for n in converted.graph.node for o in n.output}
    for output in converted.graph.output:
        if wanted.get(output.name) != float32 or output.type.tensor_type.elem_type != float16:
            continue
        cast = producers.get(output.name)
        if cast is None or cast.op_type != "Cast":
            raise ValueError(f"fp16 conversion left output {output.name} in float16")
        for attr in cast.attribute:
            if attr.name == "to":
                attr.i = float32
        output.type.tensor_type.elem_type = float32


def make_fp16(fp32_path: str, out_path: str, desc_dict: dict) -> dict:
    import warnings

    import onnx
    from onnxconverter_common import float16
    model = onnx.load(fp32_path)
    separate_consumed_outputs(model)
    # Casts to float32 (attention scales in timm's and torch's ViT exports) stay float32: the
    # converter would retype their outputs to float16 while their `to` still says float
    keep = tail_nodes(model) + [n.name for n in model.graph.node if n.op_type == "Cast" and any(
        a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)]
    with warnings.catch_warnings():  # tiny weights flushed to fp16's range: expected, not news
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(model, keep_io_types=True,
                                                     node_block_list=keep)
    restore_float_outputs(converted, onnx.load(fp32_path, load_external_data=False))
    _finish(converted, out_path, desc_dict, "fp16")
    return {"kept_float32_nodes": keep}


class _ImageReader:
    """onnxruntime.quantization CalibrationDataReader over preprocessed real images."""

    def __init__(self, images: np.ndarray, batch_size: int = 16):
        self.batches = iter([images[i:i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {"image": batch}


def make_int8(fp32_path: str, out_path: str, desc_dict: dict, calib_images: np.ndarray) -> dict:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out_path)) as tmp:
        prepared = os.path.join(tmp, "prepared.onnx")
        try:
            quant_pre_process(fp32_path, prepared, skip_symbolic_shape=False)
        except Exception:  # symbolic shape inference misses some ops; ONNX's own inference will do
            quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
        exclude = tail_nodes(onnx.load(prepared))
        quantize_static(prepared, os.path.join(tmp, "int8.onnx"), _ImageReader(calib_images),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=exclude)
        model = onnx.load(os.path.join(tmp, "int8.onnx"))
    _finish(model, out_path, desc_dict, "int8")
    return {"calibration_images": int(len(calib_images)), "unquantised_nodes": exclude,
            "quant_format": "QDQ", "per_channel": True, "activations": "QUInt8",
            "weights": "QInt8"}


# ---------------------------------------------------------------------------------------------
# Judging a variant

PROBE_NAME = "runtime.probes.LogisticRegressionProbe(C=1)"


def probe_accuracy(features: np.ndarray, labels: np.ndarray, train_idx, test_idx
                   ) -> tuple[float, str]:
    """Test accuracy of the project's probe. C is fixed: both precisions get the same probe,
    and no C sweep (seconds, not minutes)."""
    from runtime.probes import LogisticRegressionProbe
    probe = LogisticRegressionProbe(C=1.0, max_iter=300)
    probe.fit(features[train_idx], labels[train_idx])
    predicted = np.asarray(probe.predict(features[test_idx]))
    return float((predicted == labels[test_idx]).mean()), PROBE_NAME


def drift(fp32_outputs: dict[str, np.ndarray], variant_path: str, images: np.ndarray,
          batch_sizes=(1, 7)) -> dict:
    """Cosine and abs-diff figures of the variant against fp32, per output, worst over fresh
    sessions at each batch size (batch 1 on the first max(batch_sizes) images)."""
    figures: dict[str, dict] = {}
    for bs in batch_sizes:
        # one batch's worth at batch size 1 (a reduced-precision CPU graph can be slow), all at 7
        count = max(batch_sizes) if bs == 1 else len(images)
        got = run_onnx(variant_path, images[:count], bs)
        for name, full_ref in fp32_outputs.items():
            ref = full_ref[:count]
            cos = cosine_rows(ref, got[name])
            f = figures.setdefault(name, {"min_cosine": 1.0, "mean_cosine": 1.0,
                                          "max_abs_diff": 0.0, "finite": True})
            f["min_cosine"] = min(f["min_cosine"], float(cos.min()))
            f["mean_cosine"] = min(f["mean_cosine"], float(cos.mean()))
            f["max_abs_diff"] = max(f["max_abs_diff"], float(np.abs(ref - got[name]).max()))
            f["finite"] = f["finite"] and bool(np.isfinite(got[name]).all())
    return {"batch_sizes": list(batch_sizes), "outputs": figures}


def make_variants(model_path: str, out_dir: str, desc_dict: dict, descs, parity_images: np.ndarray,
                  fp16: bool = False, int8_calib: str | None = None, check_data: str | None = None,
                  variant_images: int = 300, calib_images: int = 200) -> dict:
    """Write the asked variants beside `model_path` and return their export.json entries."""
    pre = descs[0].preprocessing
    if int8_calib:
        spec = int8_calib
    else:
        _, spec = resolve_dataset(descs, check_data)
    _log(f"variants: labelled real images of {spec} for drift and probes")
    probe_images, labels = load_labelled_images(spec, variant_images, pre)
    train_idx, test_idx = _probe_split(labels)
    session = new_session(model_path)
    fp32_parity = run_onnx(model_path, parity_images, 7, session=session)
    fp32_probe = run_onnx(model_path, probe_images, 16, session=session,
                          progress="fp32 embeddings")["embedding"]
    fp32_acc, probe_name = probe_accuracy(fp32_probe, labels, train_idx, test_idx)

    results = {}
    plans = []
    if fp16:
        plans.append(("fp16", VARIANT_FILES["fp16"], lambda p: make_fp16(model_path, p, desc_dict)))
    if int8_calib:
        from common.data import load_dataset
        calib_dataset = load_dataset(int8_calib)
        calib_paths = [p for p, _ in pick_samples(calib_dataset, calib_images, seed=2)]
        calib, _ = decode_images(calib_paths, pre, "calibration images")
        plans.append(("int8", VARIANT_FILES["int8"],
                      lambda p: make_int8(model_path, p, desc_dict, calib)))
    for variant, filename, build in plans:
        path = os.path.join(out_dir, filename)
        _log(f"variants: {variant}")
        t0 = time.perf_counter()
        info = build(path)
        build_s = time.perf_counter() - t0
        figures = drift(fp32_parity, path, parity_images)
        variant_probe = run_onnx(path, probe_images, 16,
                                 progress=f"{variant} embeddings")["embedding"]
        probe_cos = cosine_rows(fp32_probe, variant_probe)
        acc, _ = probe_accuracy(variant_probe, labels, train_idx, test_idx)
        entry = {
            "file": filename, "bytes": file_info(path)["bytes"], "build_s": round(build_s, 3),
            **info, "drift_vs_fp32": figures,
            "embedding_cosine_on_probe_set": {"min": float(probe_cos.min()),
                                              "mean": float(probe_cos.mean())},
            "probe": {"name": probe_name, "data": spec, "train": int(len(train_idx)),
                      "test": int(len(test_idx)), "classes": int(len(np.unique(labels))),
                      "accuracy_fp32": fp32_acc, "accuracy": acc, "change": acc - fp32_acc},
            "warnings": [],
        }
        emb = figures["outputs"]["embedding"]
        if not all(f["finite"] for f in figures["outputs"].values()):
            raise ExportError(f"{variant} variant produces non-finite outputs; nothing written")
        if variant == "fp16" and emb["min_cosine"] < FP16_MIN_COSINE:
            raise ExportError(f"fp16 variant drifts too far from fp32: min cosine "
                              f"{emb['min_cosine']:.5f} < {FP16_MIN_COSINE}; nothing written")
        if variant == "int8" and emb["mean_cosine"] < INT8_WARN_MEAN_COSINE:
            entry["warnings"].append(f"int8 mean cosine to fp32 is {emb['mean_cosine']:.4f}; "
                                     "check the probe accuracy change before deploying it")
        results[variant] = entry
    return results


def _probe_split(labels: np.ndarray):
    from common.data import stratified_split
    return stratified_split(labels, 0.5, seed=0)
