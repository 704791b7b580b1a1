"""Small facts about ONNX files that every export module needs: the export error type, the model
description in the metadata, operator counts, sizes and hashes, graph inputs and outputs.

A leaf module (imports nothing from `export`), so that the exporter, the parity checks and the
variants can all use it without importing each other.
"""
from __future__ import annotations

import hashlib
import json
import os

from common.description import ONNX_METADATA_KEY
from common.errors import UserError


class ExportError(UserError, ValueError):
    """The export cannot go ahead or failed its checks; the message says why and what to do."""


def set_description_metadata(model, desc_dict: dict) -> None:
    props = [p for p in model.metadata_props if p.key != ONNX_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    entry = model.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(desc_dict)


def read_description_metadata(path: str) -> dict:
    """The description embedded in an ONNX file (without loading the weights)."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    for p in model.metadata_props:
        if p.key == ONNX_METADATA_KEY:
            return json.loads(p.value)
    raise ExportError(f"{path}: no '{ONNX_METADATA_KEY}' metadata; not exported by this toolkit")


def count_ops(path_or_model) -> dict:
    import onnx
    model = onnx.load(path_or_model) if isinstance(path_or_model, str) else path_or_model
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


def file_info(path: str) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def publish_model_folder(tmp_dir: str, out_dir: str, report: dict, recheck) -> None:
    """The last step of an export or an import: the report lists every file of the finished
    temporary folder (size, sha256) and is written into it; `recheck()` confirms that OUT may
    still be written (minutes may have passed); then the folder replaces OUT atomically."""
    from common.atomic import replace_folder
    from common.description import save_json_atomic
    from common.model_dir import EXPORT_REPORT_FILE
    report["files"] = {name: file_info(os.path.join(tmp_dir, name))
                       for name in sorted(os.listdir(tmp_dir)) if not name.startswith(".")}
    save_json_atomic(os.path.join(tmp_dir, EXPORT_REPORT_FILE), report)
    recheck()
    replace_folder(tmp_dir, out_dir)


def graph_io(path: str) -> dict:
    """{'inputs': {name: [dims]}, 'outputs': {...}} with symbolic dims as strings."""
    import onnx
    model = onnx.load(path, load_external_data=False)

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    def dtype(value):
        return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
    return {"inputs": {v.name: {"shape": dims(v), "dtype": dtype(v)} for v in model.graph.input},
            "outputs": {v.name: {"shape": dims(v), "dtype": dtype(v)} for v in model.graph.output}}
