"""A Triton Inference Server model repository from a model folder (exported or imported).

    write_triton_repository("models/spe", "triton-repo", probes={"fm": "probes/fm"})

writes three models, so Triton clients can send what they send to `cli.py serve`:

    triton-repo/spe/           ONNX Runtime: UINT8 [S, S, 3] crops in (`pixels`-like input),
                               `embedding` out and, per fused probe, NAME_probabilities (with
                               its label file: Triton's classification extension, class_count)
                               and NAME_label (the class index)
    triton-repo/spe_decode/    Python backend (export/triton_backend.py): encoded images (BYTES)
                               -> those crops, with the unirep pipeline's decoder
    triton-repo/spe_images/    ensemble: `image` (BYTES, JPEG/PNG/...) -> decode -> spe

The ONNX model gets the uint8 front of runtime/prefix.py (normalisation inside the graph, exactly
as the pipeline does) and the probes fused by runtime/probes/fuse.py. Every config.pbtxt parses into
tritonclient's ModelConfig protobuf (tests check that, and run the Python-backend code with a
stand-in for Triton's utilities). Triton's ONNX Runtime backend can use TensorRT
(`tensorrt=True`: `gpu_execution_accelerator`). The models are built in a temporary folder
inside the repository and renamed into place.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
KINDS = ("KIND_AUTO", "KIND_CPU", "KIND_GPU")
IMAGE_INPUT, CROPS = "image", "pixels"
DECODE_SUFFIX, ENSEMBLE_SUFFIX = "_decode", "_images"


def _tensor(name: str, data_type: str, dims: list[int], extra: str = "") -> str:
    return (f'  {{\n    name: "{name}"\n    data_type: {data_type}\n'
            f"    dims: [ {', '.join(str(d) for d in dims)} ]\n{extra}  }}")


def _outputs(feature_dim: int, probes: list[tuple[str, int]]) -> list[str]:
    """Output entries: embedding, then per probe its probabilities (with a label file, for
    Triton's classification extension) and its class index."""
    out = [_tensor("embedding", "TYPE_FP32", [feature_dim])]
    for name, classes in probes:
        out.append(_tensor(f"{name}_probabilities", "TYPE_FP32", [classes],
                           f'    label_filename: "{name}_labels.txt"\n'))
        out.append(_tensor(f"{name}_label", "TYPE_INT64", [1],
                           "    reshape: { shape: [ ] }\n"))
    return out


def _dynamic_batching(max_queue_delay_us: int) -> str:
    return f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n"


def triton_config(name: str, *, input_name: str, size: int, feature_dim: int,
                  max_batch_size: int = 32, max_queue_delay_us: int = 2000,
                  instances: int = 1, kind: str = "KIND_AUTO", tensorrt: bool = False,
                  probes: list[tuple[str, int]] | None = None) -> str:
    """config.pbtxt of the ONNX model (protobuf text format of Triton's ModelConfig);
    `probes` = [(name, number of classes)] of the fused probes."""
    if kind not in KINDS:
        raise ValueError(f"instance kind {kind!r}: choose from {', '.join(KINDS)}")
    accelerator = ""
    if tensorrt:  # Triton's ORT backend hands the graph to TensorRT on GPUs
        accelerator = ('optimization {\n  execution_accelerators {\n'
                       '    gpu_execution_accelerator: [ { name: "tensorrt" } ]\n  }\n}\n')
    return (
        f'name: "{name}"\nbackend: "onnxruntime"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n" + _tensor(input_name, "TYPE_UINT8", [size, size, 3],
                              "    format: FORMAT_NHWC\n") + "\n]\n"
        "output [\n" + ",\n".join(_outputs(feature_dim, probes or [])) + "\n]\n"
        + _dynamic_batching(max_queue_delay_us)
        + f"instance_group [ {{ count: {instances} kind: {kind} }} ]\n"
        + accelerator
    )


def decode_config(name: str, *, size: int, max_batch_size: int = 32,
                  max_queue_delay_us: int = 2000, instances: int = 1) -> str:
    """config.pbtxt of the Python-backend decoder: `image` (BYTES) -> `pixels` crops."""
    return (
        f'name: "{name}"\nbackend: "python"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n" + _tensor(IMAGE_INPUT, "TYPE_STRING", [1]) + "\n]\n"
        "output [\n" + _tensor(CROPS, "TYPE_UINT8", [size, size, 3]) + "\n]\n"
        + _dynamic_batching(max_queue_delay_us)
        + f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
    )


def ensemble_config(name: str, *, decode: str, model: str, model_input: str,
                    feature_dim: int, probes: list[tuple[str, int]],
                    max_batch_size: int = 32) -> str:
    """config.pbtxt of the ensemble: encoded images in, the ONNX model's outputs out."""
    outputs = ["embedding"] + [f"{p}_{k}" for p, _ in probes for k in ("probabilities", "label")]
    output_map = "".join(f'        output_map {{ key: "{o}" value: "{o}" }}\n' for o in outputs)
    return (
        f'name: "{name}"\nplatform: "ensemble"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n" + _tensor(IMAGE_INPUT, "TYPE_STRING", [1]) + "\n]\n"
        "output [\n" + ",\n".join(_outputs(feature_dim, probes)) + "\n]\n"
        "ensemble_scheduling {\n  step [\n"
        f'    {{\n        model_name: "{decode}"\n        model_version: -1\n'
        f'        input_map {{ key: "{IMAGE_INPUT}" value: "{IMAGE_INPUT}" }}\n'
        f'        output_map {{ key: "{CROPS}" value: "crops" }}\n    }},\n'
        f'    {{\n        model_name: "{model}"\n        model_version: -1\n'
        f'        input_map {{ key: "{model_input}" value: "crops" }}\n'
        + output_map + "    }\n  ]\n}\n"
    )


def _rename_outputs(path: str, mapping: dict[str, str]) -> None:
    """Rename graph outputs (and every node reference to them) of the ONNX file at `path`."""
    import onnx
    model = onnx.load(path)
    for node in model.graph.node:
        node.output[:] = [mapping.get(n, n) for n in node.output]
        node.input[:] = [mapping.get(n, n) for n in node.input]
    for out in model.graph.output:
        out.name = mapping.get(out.name, out.name)
    onnx.save(model, path)


def fused_model(model_dir: str, probes: dict[str, str], work: str, variant: str = "fp32"
                ) -> tuple[str, dict[str, list[str]]]:
    """The model of MODEL_DIR with each probe fused in (outputs NAME_probabilities,
    NAME_label), written under `work`; (its folder, {probe: class names})."""
    from common.model_dir import DESCRIPTION_FILE, MODEL_FILE, ModelDir
    from runtime.probes.fuse import LABEL, PROBABILITIES, fuse_probe

    current, classes = model_dir, {}
    description = ModelDir(model_dir).file(DESCRIPTION_FILE)
    for k, (name, probe_dir) in enumerate(probes.items()):
        step = os.path.join(work, f"fused-{k}")
        os.makedirs(step)
        shutil.copyfile(description, os.path.join(step, DESCRIPTION_FILE))
        summary = fuse_probe(current, probe_dir, os.path.join(step, MODEL_FILE),
                             variant=variant if k == 0 else "fp32")
        _rename_outputs(os.path.join(step, MODEL_FILE), {PROBABILITIES: f"{name}_probabilities",
                                                         LABEL: f"{name}_label"})
        classes[name] = [str(c) for c in summary["classes"]]
        current = step
    return current, classes


def write_triton_repository(model_dir: str, repo: str, *, name: str | None = None,
                            probes: dict[str, str] | None = None, decode: bool = True,
                            variant: str = "fp32", max_batch_size: int = 32,
                            max_queue_delay_us: int = 2000, instances: int = 1,
                            kind: str = "KIND_AUTO", tensorrt: bool = False,
                            overwrite: bool = False) -> str:
    """Write REPO/NAME (ONNX model with the uint8 front and fused `probes` {name: dir}) and,
    with `decode`, REPO/NAME_decode and REPO/NAME_images (see the module docstring); return
    REPO/NAME."""
    from runtime.pipeline import load_description, resolve_model
    from runtime.prefix import uint8_input_model

    name = name or os.path.basename(os.path.normpath(os.path.abspath(model_dir)))
    if not _NAME.match(name):
        raise ValueError(f"Triton model name {name!r}: use letters, digits, '_', '-', '.'")
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be at least 1")
    for probe in probes or {}:
        if not _NAME.match(probe):
            raise ValueError(f"probe name {probe!r}: use letters, digits, '_', '-', '.'")
    names = [name] + ([name + DECODE_SUFFIX, name + ENSEMBLE_SUFFIX] if decode else [])
    existing = [n for n in names if os.path.exists(os.path.join(repo, n))]
    if existing and not overwrite:
        raise FileExistsError(f"{os.path.join(repo, existing[0])} exists; pass overwrite=True "
                              "(--overwrite) to replace it")
    os.makedirs(repo, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=repo)
    try:
        source, classes = fused_model(model_dir, dict(probes or {}), tmp, variant)
        model_path = resolve_model(source, variant if source == model_dir else "fp32")
        description = load_description(model_path)
        front = uint8_input_model(model_path, description)
        description = front.description or description
        size, dim = description.preprocessing.input_size, description.feature_dim
        probe_list = [(p, len(c)) for p, c in classes.items()]
        configs = {name: triton_config(
            name, input_name=front.input_name, size=size, feature_dim=dim,
            max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
            instances=instances, kind=kind, tensorrt=tensorrt, probes=probe_list)}
        if decode:
            configs[name + DECODE_SUFFIX] = decode_config(
                name + DECODE_SUFFIX, size=size, max_batch_size=max_batch_size,
                max_queue_delay_us=max_queue_delay_us, instances=instances)
            configs[name + ENSEMBLE_SUFFIX] = ensemble_config(
                name + ENSEMBLE_SUFFIX, decode=name + DECODE_SUFFIX, model=name,
                model_input=front.input_name, feature_dim=dim, probes=probe_list,
                max_batch_size=max_batch_size)
        built = os.path.join(tmp, "models")
        for n, config in configs.items():
            os.makedirs(os.path.join(built, n, "1"))
            with open(os.path.join(built, n, "config.pbtxt"), "w") as f:
                f.write(config)
            if n != name + DECODE_SUFFIX:
                for p, labels in classes.items():  # classification extension: one per line
                    with open(os.path.join(built, n, f"{p}_labels.txt"), "w") as f:
                        f.write("".join(f"{label}\n" for label in labels))
        with open(os.path.join(built, name, "1", "model.onnx"), "wb") as f:
            f.write(front.model)
        description.save(os.path.join(built, name, "description.json"))
        if decode:
            version = os.path.join(built, name + DECODE_SUFFIX, "1")
            shutil.copyfile(os.path.join(os.path.dirname(__file__), "triton_backend.py"),
                            os.path.join(version, "model.py"))
            description.save(os.path.join(version, "description.json"))
        for n in names:
            out = os.path.join(repo, n)
            if os.path.exists(out):
                shutil.rmtree(out)
            os.replace(os.path.join(built, n), out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(repo, name)
