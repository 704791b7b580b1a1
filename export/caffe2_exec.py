"""A NumPy reference executor for the Caffe2 nets `export.caffe2` writes.

No Caffe2 runtime installs on current Python, so parity of the converted nets is proven by running
them here, operator by operator, with Caffe2's semantics (NCHW; pads as [begin..., end...];
AveragePool excludes padding unless `count_include_pad`; Softmax/Flatten/FC coerce to 2-D at
`axis`; Reshape's 0 copies the input dimension; elementwise ops broadcast numpy-style unless the
legacy `broadcast=1` is set). Everything runs in float32 like the Caffe2 CPU kernels.

    outputs = run_caffe2("init_net.pb", "predict_net.pb", {"image": batch})   # {name: array}
"""
from __future__ import annotations

import numpy as np

from .caffe2_proto import arg_value, load_net

__all__ = ["run_caffe2", "run_nets", "Workspace", "OPERATORS"]


class Caffe2ExecError(RuntimeError):
    """A net could not run: unknown operator, missing blob or bad arguments (named in the message)."""


# ---- convolution and pooling ------------------------------------------------------------------

def _spatial_args(args: dict, kernel: list[int]) -> tuple[list[int], list[int], list[int]]:
    n = len(kernel)
    strides = list(args.get("strides", [args.get("stride", 1)] * n))
    pads = list(args.get("pads", [args.get("pad", 0)] * (2 * n)))
    dilations = list(args.get("dilations", [args.get("dilation", 1)] * n))
    return strides, pads, dilations


def _windows(x: np.ndarray, kernel, strides, dilations, out_hw):
    """Yield (i, j, view) for every kernel offset: view[n, c, oh, ow] = x[n, c, oh*s + i*d, ow*s + j*d]."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, strides, dilations, out_hw
    for i in range(kh):
        for j in range(kw):
            yield i, j, x[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]


def _out_size(size: int, k: int, s: int, d: int, begin: int, end: int) -> int:
    return (size + begin + end - d * (k - 1) - 1) // s + 1


def _pad(x: np.ndarray, pads: list[int], value: float = 0.0) -> np.ndarray:
    t, l, b, r = pads
    if not any(pads):
        return x
    return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=value)


def _conv(ws, op, args):
    x, w = ws.get(op, 0), ws.get(op, 1)
    bias = ws.get(op, 2) if len(op.input) > 2 else None
    if x.ndim != 4 or args.get("order", b"NCHW") not in (b"NCHW", "NCHW"):
        raise Caffe2ExecError(f"Conv {op.name!r}: only 2-D NCHW convolution is implemented")
    kernel = list(args.get("kernels", w.shape[2:]))
    strides, pads, dilations = _spatial_args(args, kernel)
    group = int(args.get("group", 1))
    n, c, h, wd = x.shape
    out_c, c_per_group = w.shape[:2]
    if c != c_per_group * group:
        raise Caffe2ExecError(f"Conv {op.name!r}: input has {c} channels, weight expects {c_per_group}x{group}")
    ho = _out_size(h, kernel[0], strides[0], dilations[0], pads[0], pads[2])
    wo = _out_size(wd, kernel[1], strides[1], dilations[1], pads[1], pads[3])
    xp = _pad(x, pads)
    if group == c and c_per_group == 1 and out_c == c:
        # Depthwise: one multiply-add of a shifted view per kernel offset.
        y = np.zeros((n, c, ho, wo), np.float32)
        for i, j, view in _windows(xp, kernel, strides, dilations, (ho, wo)):
            y += view * w[None, :, 0, i, j, None, None]
    else:
        outs = []
        out_per_group = out_c // group
        for g in range(group):
            xg = xp[:, g * c_per_group:(g + 1) * c_per_group]
            wg = w[g * out_per_group:(g + 1) * out_per_group]
            # im2col: (n, c_per_group * kh * kw, ho * wo), rows ordered like the weight's (c, kh, kw).
            cols = np.stack([view for _, _, view in _windows(xg, kernel, strides, dilations, (ho, wo))], axis=2)
            cols = cols.reshape(n, c_per_group * kernel[0] * kernel[1], ho * wo)
            outs.append(np.matmul(wg.reshape(out_per_group, -1), cols))
        y = (outs[0] if group == 1 else np.concatenate(outs, axis=1)).reshape(n, out_c, ho, wo)
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return [y.astype(np.float32, copy=False)]


def _pool(ws, op, args, kind: str):
    x = ws.get(op, 0)
    if x.ndim != 4:
        raise Caffe2ExecError(f"{op.type} {op.name!r}: only 2-D NCHW pooling is implemented")
    if args.get("global_pooling", 0):
        reduce = np.max if kind == "max" else np.mean
        return [reduce(x, axis=(2, 3), keepdims=True).astype(np.float32)]
    kernel = list(args["kernels"]) if "kernels" in args else [args["kernel"]] * 2
    strides, pads, dilations = _spatial_args(args, kernel)
    if any(d != 1 for d in dilations):
        raise Caffe2ExecError(f"{op.type} {op.name!r}: dilated pooling is not implemented")
    ho = _out_size(x.shape[2], kernel[0], strides[0], 1, pads[0], pads[2])
    wo = _out_size(x.shape[3], kernel[1], strides[1], 1, pads[1], pads[3])
    if kind == "max":
        y = None
        for _, _, view in _windows(_pad(x, pads, -np.inf), kernel, strides, [1, 1], (ho, wo)):
            y = view.copy() if y is None else np.maximum(y, view)
        return [y]
    total = np.zeros((x.shape[0], x.shape[1], ho, wo), np.float32)
    for _, _, view in _windows(_pad(x, pads), kernel, strides, [1, 1], (ho, wo)):
        total += view
    if args.get("count_include_pad", 0):
        return [total / float(kernel[0] * kernel[1])]
    ones = _pad(np.ones((1, 1) + x.shape[2:], np.float32), pads)
    count = sum(view for _, _, view in _windows(ones, kernel, strides, [1, 1], (ho, wo)))
    return [total / count]


# ---- the other operators ----------------------------------------------------------------------

def _binary(fn):
    def run(ws, op, args):
        a, b = ws.get(op, 0), ws.get(op, 1)
        if args.get("broadcast", 0):
            # Legacy Caffe2 broadcast: B matches a contiguous run of A's dims starting at `axis`.
            axis = args.get("axis", a.ndim - b.ndim)
            b = b.reshape((1,) * axis + b.shape + (1,) * (a.ndim - axis - b.ndim))
        return [fn(a, b).astype(np.result_type(a, b), copy=False)]
    return run


def _reshape(ws, op, args):
    x = ws.get(op, 0)
    target = list(args["shape"]) if "shape" in args else ws.get(op, 1).astype(np.int64).tolist()
    target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return [x.reshape(target), np.array(x.shape, dtype=np.int64)]


def _flatten_2d(x: np.ndarray, axis: int) -> np.ndarray:
    return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


def _fc(ws, op, args):
    x, w, b = ws.get(op, 0), ws.get(op, 1), ws.get(op, 2)
    axis = int(args.get("axis", 1)) % x.ndim
    y = _flatten_2d(x, axis) @ w.reshape(w.shape[0], -1).T + b
    return [y.reshape(x.shape[:axis] + (w.shape[0],)).astype(np.float32, copy=False)]


def _spatial_bn(ws, op, args):
    if not args.get("is_test", 0):
        raise Caffe2ExecError(f"SpatialBN {op.name!r}: only is_test=1 (inference) is implemented")
    x, scale, bias, mean, var = (ws.get(op, i) for i in range(5))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    factor = scale / np.sqrt(var + np.float32(args.get("epsilon", 1e-5)))
    return [(x - mean.reshape(shape)) * factor.reshape(shape) + bias.reshape(shape)]


def _concat(ws, op, args):
    parts = [ws.get(op, i) for i in range(len(op.input))]
    axis = int(args.get("axis", 1))
    if args.get("add_axis", 0):
        return [np.stack(parts, axis=axis), np.ones(len(parts), np.int32)]
    axis %= parts[0].ndim
    return [np.concatenate(parts, axis=axis), np.array([p.shape[axis] for p in parts], np.int32)]


def _softmax(ws, op, args):
    x = ws.get(op, 0)
    axis = int(args.get("axis", 1)) % x.ndim
    flat = _flatten_2d(x, axis)
    e = np.exp(flat - flat.max(axis=1, keepdims=True))
    return [(e / e.sum(axis=1, keepdims=True)).reshape(x.shape)]


def _reduce(fn):
    def run(ws, op, args):
        x = ws.get(op, 0)
        axes = tuple(args.get("axes", range(x.ndim)))
        return [fn(x, axis=axes, keepdims=bool(args.get("keepdims", 1))).astype(x.dtype, copy=False)]
    return run


def _pad_image(ws, op, args):
    x = ws.get(op, 0)
    pads = list(args["pads"]) if "pads" in args else [args.get(k, args.get("pad", 0))
                                                     for k in ("pad_t", "pad_l", "pad_b", "pad_r")]
    mode = args.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    t, l, b, r = pads
    width = ((0, 0), (0, 0), (t, b), (l, r))
    if mode == "constant":
        return [np.pad(x, width, constant_values=float(args.get("value", 0.0)))]
    return [np.pad(x, width, mode={"reflect": "reflect", "edge": "edge"}[mode])]


def _dropout(ws, op, args):
    if not args.get("is_test", 0):
        raise Caffe2ExecError(f"Dropout {op.name!r}: only is_test=1 (inference) is implemented")
    x = ws.get(op, 0)
    return [x, np.ones(x.shape, bool)][:len(op.output)]


def _same_shape(fn):
    def run(ws, op, args):
        values = [ws.get(op, i) for i in range(len(op.input))]
        if len({v.shape for v in values}) != 1:
            raise Caffe2ExecError(f"{op.type} {op.name!r}: inputs must share one shape, got "
                                  f"{[v.shape for v in values]}")
        out = values[0]
        for v in values[1:]:
            out = fn(out, v)
        return [out]
    return run


def _normalize(ws, op, args):
    x = ws.get(op, 0)
    norm = np.sqrt(np.sum(x * x, axis=int(args.get("axis", -1)), keepdims=True))
    return [x / np.maximum(norm, np.float32(1e-12))]


def _fill(dtype):
    def run(ws, op, args):
        # Straight from the repeated field: far faster than a Python list for millions of weights.
        field = next((a for a in op.arg if a.name == "values"), None)
        values = [] if field is None else field.floats if len(field.floats) else field.ints
        return [np.asarray(values, dtype=dtype).reshape([int(d) for d in args.get("shape", [])])]
    return run


def _constant_fill(ws, op, args):
    return [np.full([int(d) for d in args.get("shape", [])], args.get("value", 0.0), dtype=np.float32)]


def _argmax(ws, op, args):
    x = ws.get(op, 0)
    axis = int(args.get("axis", -1)) % x.ndim
    index = np.argmax(x, axis=axis).astype(np.int64)
    return [np.expand_dims(index, axis) if int(args.get("keepdims", 1)) else index]


def _unary(fn):
    return lambda ws, op, args: [fn(ws.get(op, 0)).astype(ws.get(op, 0).dtype, copy=False)]


OPERATORS = {
    "Conv": _conv,
    "MaxPool": lambda ws, op, args: _pool(ws, op, args, "max"),
    "AveragePool": lambda ws, op, args: _pool(ws, op, args, "average"),
    "SpatialBN": _spatial_bn,
    "FC": _fc,
    "Relu": _unary(lambda x: np.maximum(x, 0)),
    "Sigmoid": _unary(lambda x: 1.0 / (1.0 + np.exp(-x))),
    "Tanh": _unary(np.tanh),
    "Abs": _unary(np.abs),
    "Exp": _unary(np.exp),
    "Log": _unary(np.log),
    "Sqrt": _unary(np.sqrt),
    "Negative": _unary(np.negative),
    "LeakyRelu": lambda ws, op, args: [np.where(ws.get(op, 0) >= 0, ws.get(op, 0),
                                                ws.get(op, 0) * np.float32(args.get("alpha", 0.01)))],
    "HardSigmoid": lambda ws, op, args: [np.clip(ws.get(op, 0) * np.float32(args.get("alpha", 0.2))
                                                 + np.float32(args.get("beta", 0.5)), 0, 1)],
    "Clip": lambda ws, op, args: [np.clip(ws.get(op, 0), np.float32(args.get("min", -np.inf)),
                                          np.float32(args.get("max", np.inf)))],
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _binary(np.divide),
    "Max": _same_shape(np.maximum),
    "Min": _same_shape(np.minimum),
    "ReduceMean": _reduce(np.mean),
    "ReduceMax": _reduce(np.max),
    "ReduceMin": _reduce(np.min),
    "ReduceSum": _reduce(np.sum),
    "Flatten": lambda ws, op, args: [_flatten_2d(ws.get(op, 0), int(args.get("axis", 1)))],
    "Reshape": _reshape,
    "Concat": _concat,
    "Softmax": _softmax,
    "ArgMax": _argmax,
    "Normalize": _normalize,
    "Copy": lambda ws, op, args: [ws.get(op, 0).copy()],
    "Dropout": _dropout,
    "PadImage": _pad_image,
    "Transpose": lambda ws, op, args: [np.transpose(ws.get(op, 0), args.get("axes"))],
    "ExpandDims": lambda ws, op, args: [np.expand_dims(ws.get(op, 0), tuple(args["dims"]))],
    "Squeeze": lambda ws, op, args: [np.squeeze(ws.get(op, 0), tuple(args["dims"]))],
    "GivenTensorFill": _fill(np.float32),
    "GivenTensorInt64Fill": _fill(np.int64),
    "GivenTensorIntFill": _fill(np.int32),
    "ConstantFill": _constant_fill,
}


class Workspace:
    """Named blobs, as in Caffe2: run_net executes a NetDef's ops in order, reading and writing blobs."""

    def __init__(self):
        self.blobs: dict[str, np.ndarray] = {}

    def get(self, op, index: int) -> np.ndarray:
        name = op.input[index]
        if name not in self.blobs:
            raise Caffe2ExecError(f"{op.type} {op.name!r}: input blob {name!r} does not exist "
                                  "(not fed, not filled by the init net, not produced earlier)")
        return self.blobs[name]

    def run_net(self, net) -> None:
        for op in net.op:
            run = OPERATORS.get(op.type)
            if run is None:
                raise Caffe2ExecError(f"operator type {op.type!r} (op {op.name!r}) is not implemented "
                                      f"by the reference executor; known: {', '.join(sorted(OPERATORS))}")
            try:
                args = {a.name: arg_value(a) for a in op.arg if a.name != "values"}
                results = run(self, op, args)
            except Caffe2ExecError:
                raise
            except Exception as e:
                raise Caffe2ExecError(f"{op.type} {op.name!r} failed: {type(e).__name__}: {e}") from e
            for name, value in zip(op.output, results):
                self.blobs[name] = value


def run_nets(init_net, predict_net, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run INIT_NET then PREDICT_NET (NetDef messages) on INPUTS; returns the external outputs."""
    ws = Workspace()
    ws.run_net(init_net)
    missing = [name for name in inputs if name not in predict_net.external_input]
    if missing:
        raise Caffe2ExecError(f"inputs {missing} are not external inputs of the net "
                              f"(expected one of {list(predict_net.external_input)[:3]}...)")
    for name, value in inputs.items():
        ws.blobs[name] = np.ascontiguousarray(value, dtype=np.float32)
    ws.run_net(predict_net)
    return {name: ws.blobs[name] for name in predict_net.external_output}


def run_caffe2(init_net_path: str, predict_net_path: str,
               inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Load init_net.pb and predict_net.pb and run them on INPUTS ({blob name: array})."""
    return run_nets(load_net(init_net_path), load_net(predict_net_path), inputs)
