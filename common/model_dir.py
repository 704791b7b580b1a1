"""The model folder: the one place that knows its file names and reads its description.

    MODEL_DIR/model.onnx            fp32 model (input `image`, output `embedding`, `logits_*`)
    MODEL_DIR/model.fp16.onnx       optional variants
    MODEL_DIR/model.int8.onnx
    MODEL_DIR/init_net.pb, predict_net.pb, value_info.json   optional Caffe2 nets
    MODEL_DIR/description.json      the model description (also in the ONNX metadata)
    MODEL_DIR/export.json           how it was made: parity figures, variants, sizes

`ModelDir(path)` checks that the folder exists, resolves a variant to its file, reads and
validates the description once (`.description`), and `check_model(variant)` proves that an
ONNX file parses, keeps its external data inside the folder and matches the description.
Every problem is a `ModelError` whose message is one line naming the file and what to do.
Export writes with these names; runtime, evaluate, fuse and inspect read through this class.
"""
from __future__ import annotations

import json
import os
from functools import cached_property
from typing import Any

from common.description import ONNX_METADATA_KEY, ModelDescription
from common.errors import UserError

MODEL_FILE = "model.onnx"
VARIANT_FILES = {"fp32": MODEL_FILE, "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
DESCRIPTION_FILE = "description.json"
EXPORT_REPORT_FILE = "export.json"
CAFFE2_INIT_NET = "init_net.pb"
CAFFE2_PREDICT_NET = "predict_net.pb"
CAFFE2_VALUE_INFO = "value_info.json"
CAFFE2_FILES = (CAFFE2_INIT_NET, CAFFE2_PREDICT_NET, CAFFE2_VALUE_INFO)
EXPORT_HINT = "make one with `python cli.py export RUN_DIR --out MODEL_DIR`"


class ModelError(UserError, ValueError):
    """An exported model folder or one of its files is missing, corrupt or inconsistent."""


class MissingModelError(ModelError, FileNotFoundError):
    """The model folder, or the file of a variant, does not exist (also a FileNotFoundError,
    as callers that look for missing files expect)."""


def variant_file(variant: str) -> str:
    """File name of `variant` (fp32 | fp16 | int8)."""
    if variant not in VARIANT_FILES:
        raise ModelError(f"unknown variant {variant!r}; choose from {', '.join(VARIANT_FILES)}")
    return VARIANT_FILES[variant]


class ModelDir:
    """An exported model folder (or one .onnx file, whose folder is then the model folder).

    `must_exist=False` is for writers (export), which name files in a folder still being made."""

    def __init__(self, path: str | os.PathLike, *, must_exist: bool = True):
        path = os.fspath(path)
        self.model_file_: str | None = None  # a .onnx file given instead of the folder
        if os.path.isfile(path):
            if not path.lower().endswith(".onnx"):
                raise ModelError(f"{path}: is a file, not a model folder; give the folder "
                                 f"holding {MODEL_FILE} ({EXPORT_HINT})")
            self.model_file_ = path
            path = os.path.dirname(os.path.abspath(path))
        elif must_exist and not os.path.isdir(path):
            raise MissingModelError(f"{path}: model folder not found ({EXPORT_HINT})")
        self.path = path
        self._infos: dict[str, dict] = {}

    def __repr__(self) -> str:
        return f"ModelDir({self.path!r})"

    def file(self, name: str) -> str:
        """Path of one of the folder's files (named by the constants of this module)."""
        return os.path.join(self.path, name)

    def variants(self) -> list[str]:
        """The variants whose files exist here, fp32 first."""
        return [v for v, f in VARIANT_FILES.items() if os.path.isfile(self.file(f))]

    def model_path(self, variant: str = "fp32") -> str:
        """The ONNX file of `variant` (the file itself when one was given)."""
        name = variant_file(variant)
        if self.model_file_ is not None:
            return self.model_file_
        path = self.file(name)
        if not os.path.isfile(path):
            have = ", ".join(self.variants()) or "none"
            hint = (EXPORT_HINT if variant == "fp32"
                    else f"export it with `--{variant}`")
            raise MissingModelError(f"{self.path}: no {name} for variant {variant!r} "
                                    f"(variants here: {have}); {hint}")
        return path

    def has_caffe2(self) -> bool:
        return all(os.path.isfile(self.file(n)) for n in CAFFE2_FILES)

    def caffe2_paths(self) -> tuple[str, str]:
        """(init_net.pb, predict_net.pb) of a folder exported with --format caffe2."""
        return self.file(CAFFE2_INIT_NET), self.file(CAFFE2_PREDICT_NET)

    def _info(self, path: str) -> dict:
        """The parsed graph facts of one ONNX file (parsed once per ModelDir)."""
        if path not in self._infos:
            self._infos[path] = _proto(path)
        return self._infos[path]

    @cached_property
    def description(self) -> ModelDescription:
        """The model description, read once: the fp32 model's own (its ONNX metadata, which
        travels with the graph that runs), else description.json."""
        model_path = self.model_file_ or self.file(MODEL_FILE)
        if os.path.isfile(model_path):
            return self.model_description(None)
        return self._description_json(model_path)

    def model_description(self, variant: str | None = "fp32") -> ModelDescription:
        """The description the variant's ONNX file carries in its metadata, else
        description.json (None: the file given, or model.onnx)."""
        path = (self.model_file_ or self.file(MODEL_FILE)) if variant is None else \
            self.model_path(variant)
        text = self._info(path)["metadata"].get(ONNX_METADATA_KEY)
        if not text:
            return self._description_json(path)
        try:
            return ModelDescription.from_json(text)
        except (ValueError, TypeError, KeyError) as e:
            raise ModelError(f"{path}: unreadable '{ONNX_METADATA_KEY}' metadata "
                             f"({_one_line(e)}); re-export the model") from e

    def _description_json(self, model_path: str) -> ModelDescription:
        path = self.file(DESCRIPTION_FILE)
        if not os.path.exists(path):
            raise ModelError(f"{self.path}: no model description (neither {DESCRIPTION_FILE} "
                             f"nor '{ONNX_METADATA_KEY}' metadata in {model_path}); "
                             "re-export the model")
        try:
            with open(path, encoding="utf-8") as f:
                return ModelDescription.from_json(f.read())
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
            raise ModelError(f"{path}: unreadable model description ({_one_line(e)}); "
                             "re-export the model") from e

    def export_report(self) -> dict:
        """export.json's content ({} when the folder has none)."""
        path = self.file(EXPORT_REPORT_FILE)
        if not os.path.exists(path):
            return {}
        try:
            with open(path, encoding="utf-8") as f:
                report = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ModelError(f"{path}: unreadable export report ({_one_line(e)})") from e
        if not isinstance(report, dict):
            raise ModelError(f"{path}: the export report is not a JSON object; re-export")
        return report

    def check_model(self, variant: str = "fp32") -> dict:
        """Parse the variant's ONNX file (without its weights), check that its external data
        stays inside the folder and that it matches the description. Returns the graph's
        {'inputs': {name: {'shape', 'dtype'}}, 'outputs': {...}}."""
        path = self.model_path(variant)
        info = self._info(path)
        desc = self.model_description(variant)
        check_graph_matches(path, info, desc)
        if desc is not self.description and os.path.exists(self.file(DESCRIPTION_FILE)):
            check_graph_matches(path, info, self._description_json(path))
        return {"inputs": info["inputs"], "outputs": info["outputs"]}


def check_graph_matches(path: str, info: dict, desc: ModelDescription) -> None:
    """The description must fit the graph: image size, embedding width, head outputs."""
    inputs, outputs = info["inputs"], info["outputs"]
    if not inputs:
        raise ModelError(f"{path}: the model has no input; re-export it")
    shape = next(iter(inputs.values()))["shape"]
    size = desc.preprocessing.input_size
    if len(shape) == 4:
        spatial = [d for d in shape[1:] if isinstance(d, int) and d not in (0, 3)]
        if spatial and any(d != size for d in spatial):
            raise ModelError(f"{path}: the model takes {shape[1:]} images but the description "
                             f"says {size} px; the description does not belong to this model")
    if "embedding" in outputs:
        dims = outputs["embedding"]["shape"]
        if dims and isinstance(dims[-1], int) and dims[-1] and dims[-1] != desc.feature_dim:
            raise ModelError(f"{path}: the model gives {dims[-1]}-d embeddings but the "
                             f"description says {desc.feature_dim}; the description does not "
                             "belong to this model")
    for head in desc.heads or []:
        name = head.get("output") if isinstance(head, dict) else None
        if name and name not in outputs:
            raise ModelError(f"{path}: the description names output {name!r} but the model "
                             f"has only {', '.join(outputs)}; re-export the model")


def _proto(path: str) -> dict:
    """Inputs, outputs and metadata of an ONNX file, parsed without its weights; external
    data must name files inside the model's folder."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not a readable ONNX model ({_one_line(e)}); the file is "
                         "truncated or corrupt: export it again") from e
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{path}: not a readable ONNX model (empty graph); the file is "
                         "truncated or corrupt: export it again")
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    for tensor in _tensors_with_data(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        target = os.path.realpath(os.path.join(folder, location))
        if os.path.isabs(location) or not target.startswith(folder + os.sep):
            raise ModelError(f"{path}: external data of {tensor.name!r} points outside the "
                             f"model folder ({location!r}); refusing to read it")
        if not os.path.isfile(target):
            raise ModelError(f"{path}: external data file {location!r} of {tensor.name!r} is "
                             "missing; copy it beside the model or export again")

    def dims(value: Any) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    def dtype(value: Any) -> str:
        elem = value.type.tensor_type.elem_type
        try:
            return str(onnx.helper.tensor_dtype_to_np_dtype(elem).name)
        except (KeyError, ValueError):
            return str(elem)
    initialisers = {t.name for t in model.graph.initializer}
    return {"inputs": {v.name: {"shape": dims(v), "dtype": dtype(v)}
                       for v in model.graph.input if v.name not in initialisers},
            "outputs": {v.name: {"shape": dims(v), "dtype": dtype(v)}
                        for v in model.graph.output},
            "metadata": {p.key: p.value for p in model.metadata_props}}


def _tensors_with_data(model: Any):
    """Every initialiser, including those of sub-graphs (If/Loop bodies)."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.g is not None and attr.g.ByteSize():
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
