"""Multi-depth features on an imported graph: `import --taps TENSOR,...,final`.

An ONNX file has no stage list, but it names its tensors: a tap is the name of an intermediate
tensor of the graph (`inspect`-like tools such as Netron show them; a wrong name is refused with
some candidates) or `final`, the chosen embedding output. Each tap is pooled to a vector
(channels-first maps [N, C, H, W]: global average pooling; token sequences [N, T, D]: the mean
over the tokens; vectors [N, D] as they are), L-infinity normalised (x / max|x|, as the members
of a combination and train/taps.py's taps), and the vectors are concatenated into `embedding`.
Training-free: nothing but pooling and the normalisation is added to the graph.

    taps = parse_taps("stages.1/Add_output_0,final")
    shapes = tap_shapes(src, facts, taps, images)       # run the original with those outputs
    reference = tapped_reference(per_tap_arrays)        # NumPy: what the graph must give
    add_tap_head(model, taps, shapes)                   # after export.import_graph.rewrite
"""
from __future__ import annotations

import numpy as np

from . import import_graph as G
from .import_graph import ImportOnnxError

FINAL = "final"
LINF_EPS = 1e-12
_PREFIX = "unirep_taps"


def parse_taps(text: str | list | None) -> list[str]:
    """'a,b,final' -> ['a', 'b', 'final'] (order kept; duplicates and empty names refused)."""
    if not text:
        return []
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    if any(not n for n in names):
        raise ImportOnnxError(f"--taps {text!r}: an empty tap name; write TENSOR,...,final")
    if len(set(names)) != len(names):
        raise ImportOnnxError(f"--taps {text!r}: a tap is named twice")
    return names


def check_names(model, taps: list[str], src: str) -> None:
    """Every tap but `final` must be a tensor some node of the graph computes."""
    computed = [x for n in model.graph.node for x in n.output if x]
    known = set(computed)
    unknown = [t for t in taps if t != FINAL and t not in known]
    if unknown:
        maps = [x for n in model.graph.node if n.op_type in ("Relu", "Add", "Gelu", "Mul",
                                                           "Conv", "LayerNormalization")
                for x in n.output][-6:]
        raise ImportOnnxError(f"{src}: --taps names no tensor of the graph: "
                              f"{', '.join(unknown)}; tensors are named by the exporter (e.g. "
                              f"{', '.join(maps) or ', '.join(computed[-3:])}), or use final")


def original_with_outputs(src: str, names: list[str]):
    """An onnxruntime session on the original file with `names` as extra outputs."""
    import onnx
    import onnxruntime as ort
    model = G.read_foreign(src)
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own errors
        raise ImportOnnxError(f"{src}: onnxruntime cannot read the tapped tensors "
                              f"({G._one_line(e)})") from e


def pool(name: str, x: np.ndarray, src: str) -> np.ndarray:
    """One tap's rows as vectors (see the module docstring)."""
    if x.ndim == 4:
        return x.mean(axis=(2, 3), dtype=np.float64).astype(np.float32)
    if x.ndim == 3:
        return x.mean(axis=1, dtype=np.float64).astype(np.float32)
    if x.ndim == 2:
        return x.astype(np.float32)
    raise ImportOnnxError(f"{src}: the tap {name} is {list(x.shape)} per batch; a tap is a map "
                          "[N, C, H, W], a token sequence [N, T, D] or a vector [N, D]")


def linf(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.abs(v).max(axis=1, keepdims=True), np.float32(LINF_EPS))


def tapped_reference(src: str, facts: G.InputFacts, output: str, taps: list[str],
                     images: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """The taps' embedding computed from the ORIGINAL file (one image at a time, or at its
    fixed batch) and NumPy, and each tap's {"tap", "dim", "rank"}."""
    names = [output if t == FINAL else t for t in taps]
    session = original_with_outputs(src, names)
    step = facts.batch or 1
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, len(images), step):
        batch = images[start:start + step]
        padded = np.concatenate([batch, np.repeat(batch[-1:], step - len(batch), 0)]) \
            if len(batch) < step else batch
        outs = session.run(names, {facts.name: padded})
        for name, y in zip(names, outs):
            rows[name].append(np.asarray(y, np.float32)[:len(batch)])
    arrays = {n: np.concatenate(r) for n, r in rows.items()}
    if arrays[output].ndim == 4 and arrays[output].shape[2:] == (1, 1):  # flattened by rewrite
        arrays[output] = arrays[output].reshape(len(images), -1)
    vectors = [pool(t, arrays[n], src) for t, n in zip(taps, names)]
    info = [{"tap": t, "dim": int(v.shape[1]), "rank": int(arrays[n].ndim)}
            for t, v, n in zip(taps, vectors, names)]
    return np.concatenate([linf(v) for v in vectors], axis=1), info


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def _reduce(op: str, x: str, out: str, axes: list[int], keepdims: int, opset: int, graph,
            name: str):
    """ReduceMean / ReduceMax over `axes` in the form the graph's opset takes (axes became an
    input in opset 18)."""
    from onnx import helper, numpy_helper
    if opset >= 18:
        axes_name = f"{name}/axes"
        graph.initializer.append(numpy_helper.from_array(np.asarray(axes, np.int64), axes_name))
        return helper.make_node(op, [x, axes_name], [out], keepdims=keepdims, name=name)
    return helper.make_node(op, [x], [out], axes=axes, keepdims=keepdims, name=name)


def add_tap_head(model, taps: list[str], info: list[dict]) -> None:
    """Append pooling, L-infinity normalisation and the concatenation to the rewritten graph:
    its `embedding` becomes the taps' concatenation (`final` = the former embedding)."""
    from onnx import TensorProto, helper, numpy_helper
    graph = model.graph
    opset = _opset(model)
    final = f"{G.OUTPUT_NAME}__final"
    G._rename(graph, G.OUTPUT_NAME, final)  # the graph output too: named back below
    graph.initializer.append(numpy_helper.from_array(np.array(LINF_EPS, np.float32),
                                                     f"{_PREFIX}/eps"))
    nodes, parts = [], []
    for k, (tap, facts) in enumerate(zip(taps, info)):
        source, p = (final if tap == FINAL else tap), f"{_PREFIX}/{k}"
        if facts["rank"] == 4:
            nodes += [helper.make_node("GlobalAveragePool", [source], [f"{p}/gap"],
                                       name=f"{p}/gap"),
                      helper.make_node("Flatten", [f"{p}/gap"], [f"{p}/vec"], axis=1,
                                       name=f"{p}/flatten")]
        elif facts["rank"] == 3:
            nodes.append(_reduce("ReduceMean", source, f"{p}/vec", [1], 0, opset, graph,
                                 f"{p}/tokens"))
        else:
            nodes.append(helper.make_node("Identity", [source], [f"{p}/vec"], name=f"{p}/vec"))
        nodes += [helper.make_node("Abs", [f"{p}/vec"], [f"{p}/abs"], name=f"{p}/abs"),
                  _reduce("ReduceMax", f"{p}/abs", f"{p}/max", [1], 1, opset, graph,
                          f"{p}/max"),
                  helper.make_node("Max", [f"{p}/max", f"{_PREFIX}/eps"], [f"{p}/scale"],
                                   name=f"{p}/clamp"),
                  helper.make_node("Div", [f"{p}/vec", f"{p}/scale"], [f"{p}/linf"],
                                   name=f"{p}/div")]
        parts.append(f"{p}/linf")
    nodes.append(helper.make_node("Concat", parts, [G.OUTPUT_NAME], axis=1,
                                  name=f"{_PREFIX}/concat"))
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(
        G.OUTPUT_NAME, TensorProto.FLOAT, [G.BATCH_DIM, sum(t["dim"] for t in info)]))
