"""Graph surgery for `import`: a foreign image ONNX -> the graph a model folder holds.

A model folder's graph has one input `image` float32 [batch, 3, S, S] (already normalised, so
that the runtime can put its uint8 front on it, runtime.prefix) and one output `embedding`
float32 [batch, D]. A file exported elsewhere (timm's onnx_export, a plain torch.onnx.export,
open_clip, optimum...) names its tensors as it likes, may fix the batch, may leave the spatial
size open and may have several outputs. This module reads such a file, says in one line why it
cannot be imported (`ImportOnnxError`), or rewrites it in memory:

    read_foreign(path)            parse, check, external data only from inside its folder
    image_input(model)            the one float NCHW image input and its facts
    choose_output(model, name)    the embedding output: named, the only one, or the one named
                                  like an embedding; ambiguity refused with the list
    rewrite(model, ...)           rename to image/embedding, drop the other outputs and what
                                  only they need, fix S, open a fixed batch (Reshape targets
                                  that bake it in are rewritten), flatten [N, D, 1, 1]

Whether an opened batch really works is not decided here: the import proves it by running the
rewritten graph at batch 1 and 7 against the original file (export.import_onnx).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from .onnx_files import ExportError

INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "image", "embedding", "batch"
MAX_WEIGHT_BYTES = 2**31 - 2**26  # one protobuf file, with room for the graph itself
# Output names that say "this is the embedding" (lower case, whole name or a suffix after / . _)
EMBEDDING_NAMES = ("embedding", "embeddings", "image_embeds", "image_embedding", "features",
                   "image_features", "feature", "pooled", "pooled_output", "pooler_output",
                   "pre_logits", "feats")


class ImportOnnxError(ExportError):
    """A foreign ONNX file that cannot be imported; the message names the file and what to do."""


@dataclass
class InputFacts:
    name: str
    elem_type: int
    batch: int | None         # the fixed batch size, None when the batch is already dynamic
    size: int | None          # the fixed square spatial size, None when left open
    channels_open: bool       # the channel dimension was symbolic (fixed to 3 by the rewrite)


def _dims(value) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim]


def _shape_text(dims: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


# ---------------------------------------------------------------------------------------------
# Reading

def _tensors(graph):
    """Every initialiser and Constant tensor, sub-graphs included."""
    graphs = [graph]
    while graphs:
        g = graphs.pop()
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def check_external_data(model, path: str) -> int:
    """Refuse external data that names a file outside the model's folder (or a missing one);
    returns how many tensors keep their data in other files."""
    import onnx
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    count = 0
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        count += 1
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        target = os.path.realpath(os.path.join(folder, location))
        if not location or os.path.isabs(location) or not target.startswith(folder + os.sep):
            raise ImportOnnxError(f"{path}: the external data of {tensor.name!r} points outside "
                                  f"the file's folder ({location!r}); refusing to read it. Put "
                                  "the data file beside the .onnx file (or save the model "
                                  "without external data)")
        if not os.path.isfile(target):
            raise ImportOnnxError(f"{path}: the external data file {location!r} of "
                                  f"{tensor.name!r} is missing; copy it beside the .onnx file")
    return count


def read_foreign(path: str):
    """The ONNX model at `path` with its weights loaded; one-line refusals for a missing file,
    a file that is not ONNX, an invalid graph, or external data outside its folder."""
    import onnx
    from google.protobuf.message import DecodeError
    if not os.path.isfile(path):
        raise ImportOnnxError(f"{path}: no such file; give the .onnx file to import")
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise ImportOnnxError(f"{path}: not an ONNX file ({_one_line(e)}); give a model saved "
                              "by an ONNX exporter") from e
    if not model.graph.node or not model.graph.output or not model.opset_import:
        raise ImportOnnxError(f"{path}: not an ONNX model (no graph, outputs or opset); give "
                              "a model saved by an ONNX exporter")
    if check_external_data(model, path):
        from onnx.external_data_helper import load_external_data_for_model
        load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    weights = sum(len(t.raw_data) for t in _tensors(model.graph))
    if weights > MAX_WEIGHT_BYTES:
        raise ImportOnnxError(f"{path}: {weights / 2**30:.1f} GiB of weights; import keeps a "
                              "model in one .onnx file, which protobuf limits to 2 GiB")
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # ValidationError, or a protobuf error on odd files
        raise ImportOnnxError(f"{path}: not a valid ONNX model ({_one_line(e)})") from e
    return model


def graph_inputs(model) -> list:
    """The graph's real inputs (not the weights some exporters also list as inputs)."""
    return graph_inputs_of(model.graph)


def image_input(model, path: str) -> InputFacts:
    """The facts of the one image input: float32, rank 4, channels first with 3 channels,
    square; refusals name what is wrong."""
    from onnx import TensorProto
    inputs = graph_inputs(model)
    if not inputs:
        raise ImportOnnxError(f"{path}: the model has no input; it cannot take images")
    described = ", ".join(f"{v.name} {_elem_name(v)} {_shape_text(_dims(v))}" for v in inputs)
    if len(inputs) > 1:
        raise ImportOnnxError(f"{path}: {len(inputs)} inputs ({described}); an image model "
                              "takes one image tensor [batch, 3, H, W]")
    value = inputs[0]
    elem = value.type.tensor_type.elem_type
    dims = _dims(value)
    if elem != TensorProto.FLOAT:
        hint = ("; export it in float32 (the fp16 variant is made by --fp16)"
                if elem == TensorProto.FLOAT16 else "")
        raise ImportOnnxError(f"{path}: no image input: {described} is not float32 pixels "
                              f"[batch, 3, H, W]{hint}")
    if len(dims) != 4:
        raise ImportOnnxError(f"{path}: the input {described} has rank {len(dims)}; an image "
                              "input is rank 4 [batch, 3, H, W]")
    _, channels, height, width = dims
    if channels != 3 and width == 3:
        raise ImportOnnxError(f"{path}: the input {described} is channels-last (NHWC); export "
                              "the model with channels first [batch, 3, H, W]")
    if isinstance(channels, int) and channels != 3:
        raise ImportOnnxError(f"{path}: the input {described} has {channels} channel(s); "
                              "the runtime feeds RGB images [batch, 3, H, W]")
    fixed = [d for d in (height, width) if isinstance(d, int)]
    if len(fixed) == 2 and height != width:
        raise ImportOnnxError(f"{path}: the input {described} is not square ({height}x{width}); "
                              "the runtime feeds square centre crops [batch, 3, S, S]")
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    return InputFacts(value.name, elem, batch, fixed[0] if fixed else None,
                      not isinstance(channels, int))


def _elem_name(value) -> str:
    from onnx import TensorProto
    try:
        return TensorProto.DataType.Name(value.type.tensor_type.elem_type).lower()
    except ValueError:
        return "unknown"


def _looks_like_embedding(name: str) -> bool:
    last = re.split(r"[/.:]", name.lower())[-1]
    return last in EMBEDDING_NAMES or any(last.endswith("_" + n) for n in EMBEDDING_NAMES)


def choose_output(model, wanted: str | None, path: str) -> str:
    """The output to use as the embedding: `wanted`, else the only output, else the one named
    like an embedding; refuse ambiguity with the list of outputs."""
    outputs = [o.name for o in model.graph.output]
    listing = ", ".join(f"{o.name} {_shape_text(_dims(o))}" for o in model.graph.output)
    if wanted is not None:
        if wanted not in outputs:
            raise ImportOnnxError(f"{path}: no output {wanted!r}; the outputs are {listing}")
        return wanted
    if len(outputs) == 1:
        return outputs[0]
    named = [n for n in outputs if _looks_like_embedding(n)]
    if len(named) == 1:
        return named[0]
    raise ImportOnnxError(f"{path}: {len(outputs)} outputs ({listing}) and "
                          f"{'none' if not named else 'more than one'} is named like an "
                          "embedding; choose one with --output NAME")


# ---------------------------------------------------------------------------------------------
# Rewriting

def _rename(graph, old: str, new: str) -> None:
    """Rename tensor `old` to `new` everywhere (nodes, sub-graphs, graph inputs/outputs)."""
    graphs = [graph]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            node.input[:] = [new if x == old else x for x in node.input]
            node.output[:] = [new if x == old else x for x in node.output]
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
        for values in (g.input, g.output, g.value_info):
            for v in values:
                if v.name == old:
                    v.name = new
        for t in g.initializer:
            if t.name == old:
                t.name = new


def _all_names(graph) -> set[str]:
    names = {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _claim(graph, current: str, wanted: str) -> None:
    """Give tensor `current` the name `wanted`, moving any other tensor of that name aside."""
    if current == wanted:
        return
    names = _all_names(graph)
    if wanted in names:
        k = 1
        while f"{wanted}__{k}" in names:
            k += 1
        _rename(graph, wanted, f"{wanted}__{k}")
    _rename(graph, current, wanted)


def prune(graph, keep_output: str, also: tuple[str, ...] | list[str] = ()) -> int:
    """Drop the other outputs and every node and initialiser only they (and not the tensors
    `also`) need; returns how many nodes went."""
    for o in [o for o in graph.output if o.name != keep_output]:
        graph.output.remove(o)
    producers = {x: n for n in graph.node for x in n.output}
    needed, stack, seen = set(), [keep_output, *also], set()
    while stack:
        name = stack.pop()
        node = producers.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        needed.add(id(node))
        stack.extend(node.input)
        for attr in node.attribute:  # outer-scope names read by sub-graphs
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                stack.extend(x for n in sub.node for x in n.input)
    dropped = [n for n in graph.node if id(n) not in needed]
    for n in dropped:
        graph.node.remove(n)
    used = {x for n in graph.node for x in n.input} | {keep_output}
    for attr_graph in _subgraphs(graph):
        used |= {x for n in attr_graph.node for x in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return len(dropped)


def _subgraphs(graph):
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield attr.g
            yield from attr.graphs


def _constant_array(graph, name: str):
    """(array, tensor proto) of a constant tensor (initialiser or Constant node), else None."""
    from onnx import numpy_helper
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t), t
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    return numpy_helper.to_array(attr.t), attr.t
    return None


def open_reshape_batches(graph, batch: int) -> int:
    """Reshape targets that bake the fixed batch in (a constant [batch, ...] reshaping a
    computed tensor) get 0 there instead ("copy the input's first dimension"), through a
    constant of their own. Returns how many were rewritten; the parity run decides whether the
    result is right."""
    from onnx import numpy_helper
    computed = {x for n in graph.node for x in n.output if n.op_type != "Constant"}
    computed |= {v.name for v in graph_inputs_of(graph)}
    rewritten = 0
    for k, node in enumerate(graph.node):
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[0] not in computed:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue  # 0 would mean a zero-sized dimension there
        found = _constant_array(graph, node.input[1])
        if found is None:
            continue
        target = np.asarray(found[0])
        if target.ndim != 1 or not len(target) or int(target[0]) != batch:
            continue
        opened = target.astype(np.int64).copy()
        opened[0] = 0
        name = f"{node.input[1]}__open_batch_{k}"
        graph.initializer.append(numpy_helper.from_array(opened, name))
        node.input[1] = name
        rewritten += 1
    return rewritten


def graph_inputs_of(graph) -> list:
    initialisers = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in initialisers]


def _flatten_if_spatial(graph, path: str) -> str:
    """The `embedding` output [N, D, 1, 1] -> Flatten -> [N, D]; rank 2 stays; anything else
    is refused."""
    from onnx import helper
    output = next(o for o in graph.output if o.name == OUTPUT_NAME)
    dims = _dims(output)
    if len(dims) in (0, 2):  # rank 0: no shape recorded; the parity run sees the real one
        return "none"
    if len(dims) == 4 and dims[2:] == [1, 1]:
        inner = f"{OUTPUT_NAME}__unflattened"
        _rename(graph, OUTPUT_NAME, inner)  # the graph output too: named back below
        graph.node.append(helper.make_node("Flatten", [inner], [OUTPUT_NAME], axis=1,
                                           name="unirep_import/flatten"))
        output.name = OUTPUT_NAME
        return "flatten [N, D, 1, 1] -> [N, D]"
    hint = (" (a token sequence: choose a pooled output with --output)" if len(dims) == 3
            else "")
    raise ImportOnnxError(f"{path}: the output is {_shape_text(dims)}, not an embedding "
                          f"[batch, D]{hint}")


@dataclass
class RewriteReport:
    original_input: str
    original_output: str
    batch_was: int | str
    opened_reshapes: int
    pruned_nodes: int
    output_change: str

    def to_dict(self) -> dict:
        return dict(vars(self))


def rewrite(model, facts: InputFacts, output: str, size: int, path: str,
            keep: tuple[str, ...] | list[str] = ()) -> RewriteReport:
    """Rewrite `model` in place into a model folder's graph (see the module docstring);
    `keep`: tensors to keep computing (taps) besides the embedding output."""
    from onnx import TensorProto
    graph = model.graph
    initialisers = {t.name for t in graph.initializer}
    for value in [v for v in graph.input if v.name in initialisers]:
        graph.input.remove(value)  # weights listed as inputs (keep_initializers_as_inputs)
    pruned = prune(graph, output, keep)
    del graph.value_info[:]  # intermediate shapes may pin the old batch; onnxruntime re-infers
    opened = open_reshape_batches(graph, facts.batch) if facts.batch else 0
    _claim(graph, facts.name, INPUT_NAME)
    image = graph_inputs(model)[0]
    dims = image.type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_param = BATCH_DIM
    for k, value in ((1, 3), (2, size), (3, size)):
        dims[k].Clear()
        dims[k].dim_value = value
    out = next(o for o in graph.output if o.name == output)
    if out.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ImportOnnxError(f"{path}: the output {output} is {_elem_name(out)}, not float32 "
                              "embeddings")
    _claim(graph, output, OUTPUT_NAME)
    change = _flatten_if_spatial(graph, path)
    out = next(o for o in graph.output if o.name == OUTPUT_NAME)
    out_dims = out.type.tensor_type.shape.dim
    feature = out_dims[1] if len(out_dims) > 1 else None
    del out_dims[:]
    out_dims.add().dim_param = BATCH_DIM
    d = out_dims.add()
    if feature is not None and feature.HasField("dim_value"):
        d.dim_value = feature.dim_value
    else:
        d.dim_param = "dim"
    for k, node in enumerate(graph.node):  # fp16 block lists and error messages use names
        if not node.name:
            node.name = f"{node.op_type}_{k}"
    return RewriteReport(facts.name, output, facts.batch or "dynamic", opened, pruned, change)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
