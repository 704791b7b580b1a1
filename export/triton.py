"""A Triton Inference Server model repository from an exported model folder.

    write_triton_repository("models/spe", "triton-repo")   # -> triton-repo/spe/config.pbtxt
                                                            #    triton-repo/spe/1/model.onnx

The ONNX model gets the uint8 front of runtime/prefix.py, so Triton takes what a client can
send cheaply: centre-cropped SxSx3 uint8 crops (NHWC), normalised inside the graph exactly as
the pipeline does. Triton does not decode or resize JPEGs; a client resizes and crops as the
model description says (`inspect` prints it), or uses `cli.py serve`, which does. config.pbtxt
declares max_batch_size, dynamic batching and the `embedding` output; it parses into
tritonclient's ModelConfig protobuf (tests check that). Triton's ONNX Runtime backend can use
TensorRT: see `gpu_execution_accelerator` in the README.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile

from common.atomic import replace_folder

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
KINDS = ("KIND_AUTO", "KIND_CPU", "KIND_GPU")


def triton_config(name: str, *, input_name: str, size: int, feature_dim: int,
                  max_batch_size: int = 32, max_queue_delay_us: int = 2000,
                  instances: int = 1, kind: str = "KIND_AUTO", tensorrt: bool = False) -> str:
    """The text of config.pbtxt (protobuf text format of Triton's ModelConfig)."""
    if kind not in KINDS:
        raise ValueError(f"instance kind {kind!r}: choose from {', '.join(KINDS)}")
    accelerator = ""
    if tensorrt:  # Triton's ORT backend hands the graph to TensorRT on GPUs
        accelerator = ('optimization {\n  execution_accelerators {\n'
                       '    gpu_execution_accelerator: [ { name: "tensorrt" } ]\n  }\n}\n')
    return (
        f'name: "{name}"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n  {\n"
        f'    name: "{input_name}"\n'
        "    data_type: TYPE_UINT8\n"
        "    format: FORMAT_NHWC\n"
        f"    dims: [ {size}, {size}, 3 ]\n"
        "  }\n]\n"
        "output [\n  {\n"
        '    name: "embedding"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {feature_dim} ]\n"
        "  }\n]\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
        "}\n"
        f"instance_group [ {{ count: {instances} kind: {kind} }} ]\n"
        + accelerator
    )


def write_triton_repository(model_dir: str, repo: str, *, name: str | None = None,
                            variant: str = "fp32", max_batch_size: int = 32,
                            max_queue_delay_us: int = 2000, instances: int = 1,
                            kind: str = "KIND_AUTO", tensorrt: bool = False,
                            overwrite: bool = False) -> str:
    """Write <repo>/<name>/{config.pbtxt, 1/model.onnx, description.json}; return its folder.

    The model folder is built beside its destination and renamed into place (atomic)."""
    from runtime.pipeline import load_description, resolve_model
    from runtime.prefix import uint8_input_model

    name = name or os.path.basename(os.path.normpath(os.path.abspath(model_dir)))
    if not _NAME.match(name):
        raise ValueError(f"Triton model name {name!r}: use letters, digits, '_', '-', '.'")
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be at least 1")
    model_path = resolve_model(model_dir, variant)
    description = load_description(model_path)
    front = uint8_input_model(model_path, description)
    pre = front.description.preprocessing if front.description else description.preprocessing
    dim = (front.description or description).feature_dim
    config = triton_config(name, input_name=front.input_name, size=pre.input_size,
                           feature_dim=dim, max_batch_size=max_batch_size,
                           max_queue_delay_us=max_queue_delay_us, instances=instances,
                           kind=kind, tensorrt=tensorrt)
    out = os.path.join(repo, name)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    os.makedirs(repo, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=repo)
    try:
        os.makedirs(os.path.join(tmp, "1"))
        with open(os.path.join(tmp, "1", "model.onnx"), "wb") as f:
            f.write(front.model)
        with open(os.path.join(tmp, "config.pbtxt"), "w") as f:
            f.write(config)
        (front.description or description).save(os.path.join(tmp, "description.json"))
        replace_folder(tmp, out)  # keeps the old model until the new one is whole
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out
