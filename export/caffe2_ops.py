"""The ONNX operator -> Caffe2 operator mapping: one `op_<Type>` method per ONNX node type.

`export.caffe2.onnx_to_caffe2` drives it. Constants are folded here (Constant nodes, initializers
used as shapes or axes, all-constant sub-graphs, the symbolic `Shape -> Gather -> Concat` batch
arithmetic), so only data-dependent nodes become Caffe2 operators.
"""
from __future__ import annotations

import numpy as np

from common.errors import UserError

from .caffe2_proto import make_op


class UnsupportedOnnxOp(UserError, ValueError):
    """An ONNX node (or a form of it) that has no Caffe2 mapping; the message names op and node."""


def _attrs(node) -> dict:
    import onnx
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _is_symbolic(value) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == object


def _settle(value: np.ndarray) -> np.ndarray:
    """A symbolic shape array whose entries are all known becomes a plain int64 constant."""
    if _is_symbolic(value) and all(isinstance(v, (int, np.integer)) for v in value.ravel()):
        return value.astype(np.int64)
    return value


class _Converter:
    """Walks the (topologically sorted) ONNX graph once, folding constants and emitting Caffe2 ops."""

    # Unary ops whose Caffe2 counterpart takes no arguments.
    UNARY = {"Relu": "Relu", "Sigmoid": "Sigmoid", "Abs": "Abs", "Tanh": "Tanh", "Exp": "Exp",
             "Log": "Log", "Sqrt": "Sqrt", "Neg": "Negative"}
    # Elementwise binary ops with numpy-style broadcasting (Caffe2's default when `broadcast` is unset).
    BINARY = {"Add": "Add", "Sub": "Sub", "Mul": "Mul", "Div": "Div"}

    def __init__(self, model):
        import onnx
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.consts: dict[str, np.ndarray] = {
            t.name: onnx.numpy_helper.to_array(t) for t in self.graph.initializer}
        self.shapes: dict[str, list] = {}
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                self.shapes[vi.name] = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or f"?{vi.name}:{i}")
                    for i, d in enumerate(vi.type.tensor_type.shape.dim)]
        self.data_inputs = [i.name for i in self.graph.input if i.name not in self.consts]
        self.used_names = set(self.consts) | set(self.shapes)
        for node in self.graph.node:
            self.used_names.update(node.output)
        self.ops: list = []
        self.weights: dict[str, np.ndarray] = {}  # constant blobs the predict net reads, in first-use order

    # ---- helpers ------------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used_names:
            name, k = f"{base}_{k}", k + 1
        self.used_names.add(name)
        return name

    def fail(self, node, why: str):
        raise UnsupportedOnnxOp(f"ONNX op {node.op_type} (node {node.name!r}): {why}")

    def const(self, node, name: str, what: str) -> np.ndarray:
        if name not in self.consts or _is_symbolic(self.consts[name]):
            self.fail(node, f"{what} ({name!r}) must be a constant to convert to Caffe2")
        return self.consts[name]

    def blob(self, name: str) -> str:
        """Name of a blob holding NAME at run time: constants become init_net weights."""
        if name in self.consts:
            if _is_symbolic(self.consts[name]):
                raise UnsupportedOnnxOp(f"tensor {name!r} depends on a dynamic dimension and is "
                                        "used as data; Caffe2 nets cannot compute shapes")
            self.weights.setdefault(name, self.consts[name])
        return name

    def new_weight(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.consts[name] = value
        self.weights[name] = value
        return name

    def rank(self, node, name: str) -> int:
        if name in self.consts:
            return self.consts[name].ndim
        if name not in self.shapes:
            self.fail(node, f"the rank of {name!r} is unknown (ONNX shape inference gave none)")
        return len(self.shapes[name])

    def axes_of(self, node, attrs: dict, input_index: int = 1) -> list[int] | None:
        """Axes given as an attribute (older opsets) or as a constant input (newer ones)."""
        if "axes" in attrs:
            return [int(a) for a in attrs["axes"]]
        if len(node.input) > input_index and node.input[input_index]:
            return [int(a) for a in self.const(node, node.input[input_index], "axes").ravel()]
        return None

    def emit(self, op_type, inputs, outputs, node, **args):
        self.ops.append(make_op(op_type, inputs, outputs, name=node.name, **args))

    # ---- main loop ----------------------------------------------------------------------------
    def run(self):
        for node in self.graph.node:
            if node.domain not in ("", "ai.onnx"):
                self.fail(node, f"custom domain {node.domain!r} is not standard ONNX")
            inputs = [i for i in node.input if i]
            if node.op_type == "Constant":
                self.consts[node.output[0]] = self.constant_value(node)
            elif node.op_type == "Shape" and inputs[0] not in self.consts:
                self.consts[node.output[0]] = self.shape_of(node)
            elif inputs and all(i in self.consts for i in inputs):
                self.fold(node)
            else:
                handler = getattr(self, f"op_{node.op_type}", None)
                if handler is None:
                    self.fail(node, "not supported by the Caffe2 converter")
                handler(node, _attrs(node))
        outputs = [o.name for o in self.graph.output]
        for name in outputs:
            if name in self.consts:
                raise UnsupportedOnnxOp(f"graph output {name!r} is a constant; nothing to compute")
        return outputs

    def constant_value(self, node) -> np.ndarray:
        import onnx
        (name, value), = _attrs(node).items()
        if name == "value":
            return onnx.numpy_helper.to_array(value)
        if name in ("value_float", "value_int"):
            return np.array(value, dtype=np.float32 if name == "value_float" else np.int64)
        if name in ("value_floats", "value_ints"):
            return np.array(value, dtype=np.float32 if name == "value_floats" else np.int64)
        self.fail(node, f"Constant with {name!r} is not supported")

    def shape_of(self, node) -> np.ndarray:
        name = node.input[0]
        if name not in self.shapes:
            self.fail(node, f"the shape of {name!r} is unknown (ONNX shape inference gave none)")
        attrs = _attrs(node)
        dims = self.shapes[name][attrs.get("start", 0):attrs.get("end", None)]
        return _settle(np.array(dims, dtype=object))

    def fold(self, node):
        """Evaluate a node whose inputs are all constant; symbolic (dynamic-dim) shapes by hand."""
        values = [self.consts[i] if i else None for i in node.input]
        if any(_is_symbolic(v) for v in values if v is not None):
            results = self.fold_symbolic(node, values)
        else:
            import onnx
            from onnx.reference import ReferenceEvaluator
            feeds = {i: self.consts[i] for i in node.input if i}
            graph = onnx.helper.make_graph(
                [node], "fold",
                [onnx.helper.make_tensor_value_info(i, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), None)
                 for i, v in feeds.items()],
                [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                 for o in node.output if o])
            model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", self.opset)])
            try:
                results = ReferenceEvaluator(model).run(None, feeds)
            except Exception as e:
                self.fail(node, f"cannot fold constant inputs ({type(e).__name__}: {e})")
        for name, value in zip([o for o in node.output if o], results):
            self.consts[name] = np.asarray(value)

    def fold_symbolic(self, node, values) -> list:
        attrs = _attrs(node)
        op, data = node.op_type, values[0]
        if op in ("Identity", "Cast"):
            return [data]
        if op == "Gather":
            return [_settle(np.take(data, values[1].astype(np.int64), axis=attrs.get("axis", 0)))]
        if op == "Concat":
            return [_settle(np.concatenate([np.asarray(v, dtype=object) for v in values],
                                           axis=attrs.get("axis", 0)))]
        if op in ("Unsqueeze", "Squeeze"):
            axes = self.axes_of(node, attrs)
            if op == "Unsqueeze":
                out = data
                for a in sorted(a % (data.ndim + len(axes)) for a in axes):
                    out = np.expand_dims(out, a)
                return [out]
            return [np.squeeze(data, axis=tuple(axes) if axes is not None else None)]
        if op == "Slice" and data.ndim == 1:
            starts, ends = (self.const(node, n, "slice bound").ravel() for n in node.input[1:3])
            steps = values[4] if len(values) > 4 and values[4] is not None else [1]
            return [_settle(data[int(starts[0]):int(min(ends[0], len(data))):int(steps[0])])]
        self.fail(node, "shape arithmetic on a dynamic dimension is not supported; "
                        "export with a fixed shape or a reshape to [-1, D]")

    # ---- operators ----------------------------------------------------------------------------
    def pads_for(self, node, attrs, kernel, strides, dilations) -> list[int]:
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad in ("NOTSET", ""):
            return list(attrs.get("pads", [0] * (2 * len(kernel))))
        if auto_pad == "VALID":
            return [0] * (2 * len(kernel))
        spatial = self.shapes.get(node.input[0], [])[2:]
        if len(spatial) != len(kernel) or not all(isinstance(s, int) for s in spatial):
            self.fail(node, f"auto_pad={auto_pad} needs known spatial sizes")
        begin, end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        return begin + end

    def op_Conv(self, node, attrs):
        weight = self.const(node, node.input[1], "the weight")
        kernel = list(attrs.get("kernel_shape", weight.shape[2:]))
        strides = list(attrs.get("strides", [1] * len(kernel)))
        dilations = list(attrs.get("dilations", [1] * len(kernel)))
        pads = self.pads_for(node, attrs, kernel, strides, dilations)
        inputs = [node.input[0], self.blob(node.input[1])]
        if len(node.input) > 2 and node.input[2]:  # Caffe2's Conv takes the bias as optional input 3
            inputs.append(self.blob(node.input[2]))
        self.emit("Conv", inputs, node.output[:1], node, kernels=kernel, strides=strides,
                  pads=pads, dilations=dilations, group=int(attrs.get("group", 1)))

    def unary(self, node, attrs):
        self.emit(self.UNARY[node.op_type], [node.input[0]], node.output[:1], node)

    op_Relu = op_Sigmoid = op_Abs = op_Tanh = op_Exp = op_Log = op_Sqrt = op_Neg = unary

    def op_LeakyRelu(self, node, attrs):
        self.emit("LeakyRelu", [node.input[0]], node.output[:1], node, alpha=float(attrs.get("alpha", 0.01)))

    def op_HardSigmoid(self, node, attrs):
        self.emit("HardSigmoid", [node.input[0]], node.output[:1], node,
                  alpha=float(attrs.get("alpha", 0.2)), beta=float(attrs.get("beta", 0.5)))

    def op_HardSwish(self, node, attrs):
        # Caffe2 has no HardSwish: x * HardSigmoid(x; alpha=1/6, beta=1/2) is its definition.
        gate = self.fresh(f"{node.output[0]}_hardsigmoid")
        self.emit("HardSigmoid", [node.input[0]], [gate], node, alpha=1.0 / 6.0, beta=0.5)
        self.emit("Mul", [node.input[0], gate], node.output[:1], node)

    def op_Clip(self, node, attrs):
        low, high = attrs.get("min"), attrs.get("max")
        if len(node.input) > 1 and node.input[1]:
            low = float(self.const(node, node.input[1], "min"))
        if len(node.input) > 2 and node.input[2]:
            high = float(self.const(node, node.input[2], "max"))
        self.emit("Clip", [node.input[0]], node.output[:1], node,
                  min=None if low is None else float(low), max=None if high is None else float(high))

    def binary(self, node, attrs):
        self.emit(self.BINARY[node.op_type], [self.blob(i) for i in node.input], node.output[:1], node)

    op_Add = op_Sub = op_Mul = op_Div = binary

    def extremum(self, node, attrs):
        """Max/Min against a scalar constant is a Clip; otherwise Caffe2's same-shape Max/Min."""
        data = [i for i in node.input if i not in self.consts]
        scalars = [self.consts[i] for i in node.input if i in self.consts]
        if scalars and all(s.size == 1 for s in scalars) and len(data) == 1:
            bound = float((max if node.op_type == "Max" else min)(float(s.ravel()[0]) for s in scalars))
            self.emit("Clip", data, node.output[:1], node,
                      **({"min": bound} if node.op_type == "Max" else {"max": bound}))
            return
        shapes = {tuple(self.shapes.get(i, [])) for i in node.input}
        if len(shapes) != 1 or scalars:
            self.fail(node, "Caffe2's Max/Min need inputs of one shape (or one scalar constant)")
        self.emit(node.op_type, list(node.input), node.output[:1], node)

    op_Max = op_Min = extremum

    def pool(self, node, attrs, caffe2_type: str):
        if len([o for o in node.output if o]) > 1:
            self.fail(node, "pooling indices output is not supported")
        kernel = list(attrs["kernel_shape"])
        strides = list(attrs.get("strides", [1] * len(kernel)))
        dilations = list(attrs.get("dilations", [1] * len(kernel)))
        if any(d != 1 for d in dilations):
            self.fail(node, "dilated pooling is not supported by Caffe2")
        pads = self.pads_for(node, attrs, kernel, strides, dilations)
        if attrs.get("ceil_mode", 0):
            spatial = self.shapes.get(node.input[0], [])[2:]
            n = len(kernel)
            if len(spatial) != n or not all(isinstance(s, int) for s in spatial) or any(
                    (size + pads[i] + pads[i + n] - kernel[i]) % strides[i]
                    for i, size in enumerate(spatial)):
                self.fail(node, "ceil_mode=1 changes the output size here and Caffe2 has no ceil mode")
        source = node.input[0]
        if caffe2_type == "AveragePool" and attrs.get("count_include_pad", 0) and any(pads):
            # Caffe2 averages over the valid pixels only: pad explicitly so zeros are counted.
            source = self.fresh(f"{node.output[0]}_padded")
            self.emit("PadImage", [node.input[0]], [source], node, pads=pads, mode="constant", value=0.0)
            pads = [0] * len(pads)
        self.emit(caffe2_type, [source], node.output[:1], node, kernels=kernel, strides=strides, pads=pads)

    def op_MaxPool(self, node, attrs):
        self.pool(node, attrs, "MaxPool")

    def op_AveragePool(self, node, attrs):
        self.pool(node, attrs, "AveragePool")

    def global_pool(self, node, caffe2_type: str, output: str):
        if self.rank(node, node.input[0]) != 4:
            self.fail(node, "global pooling is converted for 4-D NCHW tensors only")
        self.emit(caffe2_type, [node.input[0]], [output], node, global_pooling=1)

    def op_GlobalAveragePool(self, node, attrs):
        self.global_pool(node, "AveragePool", node.output[0])

    def op_GlobalMaxPool(self, node, attrs):
        self.global_pool(node, "MaxPool", node.output[0])

    def reduce(self, node, attrs, caffe2_type: str):
        rank = self.rank(node, node.input[0])
        axes = self.axes_of(node, attrs)
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                self.emit("Copy", [node.input[0]], node.output[:1], node)
                return
            axes = list(range(rank))
        axes = sorted({a % rank for a in axes})
        keepdims = int(attrs.get("keepdims", 1))
        pool = {"ReduceMean": "AveragePool", "ReduceMax": "MaxPool"}.get(node.op_type)
        if pool and rank == 4 and axes == [2, 3]:
            # Over H and W: Caffe2's global pooling (then drop the 1x1 when keepdims=0).
            if keepdims:
                self.global_pool(node, pool, node.output[0])
            else:
                pooled = self.fresh(f"{node.output[0]}_pooled")
                self.global_pool(node, pool, pooled)
                self.emit("Reshape", [pooled], [node.output[0], self.fresh(f"{node.output[0]}_old_shape")],
                          node, shape=[0, -1])
            return
        self.emit(caffe2_type, [node.input[0]], node.output[:1], node, axes=axes, keepdims=keepdims)

    def op_ReduceMean(self, node, attrs):
        self.reduce(node, attrs, "ReduceMean")

    def op_ReduceMax(self, node, attrs):
        self.reduce(node, attrs, "ReduceMax")

    def op_ReduceMin(self, node, attrs):
        self.reduce(node, attrs, "ReduceMin")

    def op_ReduceSum(self, node, attrs):
        self.reduce(node, attrs, "ReduceSum")

    def op_BatchNormalization(self, node, attrs):
        if attrs.get("training_mode", 0) or len([o for o in node.output if o]) > 1:
            self.fail(node, "training-mode BatchNormalization cannot run in an inference net")
        self.emit("SpatialBN", [node.input[0]] + [self.blob(i) for i in node.input[1:5]],
                  node.output[:1], node, is_test=1, epsilon=float(attrs.get("epsilon", 1e-5)))

    def fc(self, node, source: str, weight: np.ndarray, bias: np.ndarray, axis: int = 1):
        w = self.new_weight(f"{node.name or node.output[0]}_W", np.ascontiguousarray(weight, dtype=np.float32))
        b = self.new_weight(f"{node.name or node.output[0]}_b", np.ascontiguousarray(bias, dtype=np.float32))
        self.emit("FC", [source, w, b], node.output[:1], node, axis=axis if axis != 1 else None)

    def op_Gemm(self, node, attrs):
        if attrs.get("transA", 0):
            self.fail(node, "transA=1 is not supported (FC takes X as [batch, in])")
        b_name = node.input[1]
        weight = self.const(node, b_name, "B (the weight)")
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        if not attrs.get("transB", 0):
            weight = weight.T  # FC wants W as [out, in]
        out_dim = weight.shape[0]
        has_bias = len(node.input) > 2 and node.input[2]
        c = self.const(node, node.input[2], "C (the bias)") if has_bias else np.zeros(out_dim, np.float32)
        if c.size not in (1, out_dim):
            self.fail(node, f"bias of shape {c.shape} is not a per-output vector")
        bias = np.broadcast_to(c.reshape(-1), (out_dim,)) * beta
        if attrs.get("transB", 0) and alpha == 1.0 and has_bias and c.shape == (out_dim,) and beta == 1.0:
            # The common case keeps the ONNX initializers as the blobs (names survive in the nets).
            self.emit("FC", [node.input[0], self.blob(b_name), self.blob(node.input[2])],
                      node.output[:1], node)
            return
        self.fc(node, node.input[0], weight * alpha, bias)

    def op_MatMul(self, node, attrs):
        if node.input[1] not in self.consts or self.consts[node.input[1]].ndim != 2:
            self.fail(node, "only MatMul by a constant 2-D matrix is converted (as FC)")
        weight = self.consts[node.input[1]]
        rank = self.rank(node, node.input[0])
        if rank < 2:
            self.fail(node, "MatMul of a 1-D input is not supported")
        self.fc(node, node.input[0], weight.T, np.zeros(weight.shape[1], np.float32), axis=rank - 1)

    def op_Flatten(self, node, attrs):
        axis = int(attrs.get("axis", 1))
        if axis < 0:
            axis += self.rank(node, node.input[0])
        self.emit("Flatten", [node.input[0]], node.output[:1], node, axis=axis)

    def op_Reshape(self, node, attrs):
        target = self.const_shape(node, node.input[1], node.input[0])
        if attrs.get("allowzero", 0) and 0 in target:
            self.fail(node, "allowzero=1 with a 0 in the shape (an empty tensor) is not supported")
        self.emit("Reshape", [node.input[0]], [node.output[0], self.fresh(f"{node.output[0]}_old_shape")],
                  node, shape=target)

    def const_shape(self, node, shape_name: str, data_name: str) -> list[int]:
        """A target shape as Caffe2 ints: a dynamic dim copied from the input's same position is 0,
        one other unknown dim is -1."""
        shape = self.const(node, shape_name, "the target shape") if not _is_symbolic(
            self.consts.get(shape_name)) else self.consts[shape_name]
        data_shape = self.shapes.get(data_name, [])
        target = []
        for i, dim in enumerate(shape.ravel().tolist()):
            if isinstance(dim, str):
                dim = 0 if i < len(data_shape) and data_shape[i] == dim else -1
            target.append(int(dim))
        if target.count(-1) > 1:
            self.fail(node, f"target shape {shape.tolist()} has more than one unknown dimension")
        return target

    def op_Concat(self, node, attrs):
        axis = int(attrs["axis"])
        if axis < 0:
            axis += self.rank(node, node.input[0])
        self.emit("Concat", [self.blob(i) for i in node.input],
                  [node.output[0], self.fresh(f"{node.output[0]}_split_info")], node, axis=axis)

    def op_Softmax(self, node, attrs):
        rank = self.rank(node, node.input[0])
        axis = int(attrs.get("axis", -1 if self.opset >= 13 else 1)) % rank
        if self.opset >= 13 and axis != rank - 1:
            # Caffe2 coerces to 2-D at `axis` (ONNX < 13 semantics): equal only on the last axis.
            self.fail(node, "softmax over a non-last axis has no Caffe2 equivalent")
        self.emit("Softmax", [node.input[0]], node.output[:1], node, axis=axis)

    def op_ArgMax(self, node, attrs):
        if int(attrs.get("select_last_index", 0)):
            self.fail(node, "select_last_index=1 (ties to the last index) has no Caffe2 equivalent")
        axis = int(attrs.get("axis", 0)) % self.rank(node, node.input[0])
        self.emit("ArgMax", [self.blob(node.input[0])], node.output[:1], node, axis=axis,
                  keepdims=int(attrs.get("keepdims", 1)))

    def op_LpNormalization(self, node, attrs):
        if attrs.get("p", 2) != 2:
            self.fail(node, "only p=2 maps to Caffe2's Normalize")
        axis = int(attrs.get("axis", -1)) % self.rank(node, node.input[0])
        self.emit("Normalize", [node.input[0]], node.output[:1], node, axis=axis)

    def op_Pad(self, node, attrs):
        mode = attrs.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in ("constant", "reflect", "edge"):
            self.fail(node, f"mode {mode!r} is not supported")
        rank = self.rank(node, node.input[0])
        pads = [int(p) for p in (attrs["pads"] if "pads" in attrs else
                                 self.const(node, node.input[1], "pads").ravel())]
        axes = list(range(rank))
        if len(node.input) > 3 and node.input[3]:
            axes = [int(a) % rank for a in self.const(node, node.input[3], "axes").ravel()]
        begin, end = dict(zip(axes, pads[:len(axes)])), dict(zip(axes, pads[len(axes):]))
        value = 0.0
        if "value" in attrs:
            value = float(attrs["value"])
        elif len(node.input) > 2 and node.input[2]:
            value = float(self.const(node, node.input[2], "constant_value").ravel()[0])
        if rank != 4 or any(begin.get(a, 0) or end.get(a, 0) for a in (0, 1)) or min(pads, default=0) < 0:
            self.fail(node, "only non-negative padding of H and W of a 4-D tensor maps to PadImage")
        self.emit("PadImage", [node.input[0]], node.output[:1], node, mode=mode, value=value,
                  pads=[begin.get(2, 0), begin.get(3, 0), end.get(2, 0), end.get(3, 0)])

    def op_Identity(self, node, attrs):
        self.emit("Copy", [node.input[0]], node.output[:1], node)

    def op_Dropout(self, node, attrs):
        if len(node.input) > 2 and node.input[2] and bool(self.const(node, node.input[2], "training_mode")):
            self.fail(node, "training-mode Dropout cannot run in an inference net")
        self.emit("Dropout", [node.input[0]], node.output[:1], node, is_test=1,
                  ratio=float(attrs.get("ratio", 0.5)))

    def op_Unsqueeze(self, node, attrs):
        axes = self.axes_of(node, attrs)
        out_rank = self.rank(node, node.input[0]) + len(axes)
        self.emit("ExpandDims", [node.input[0]], node.output[:1], node, dims=sorted(a % out_rank for a in axes))

    def op_Squeeze(self, node, attrs):
        rank = self.rank(node, node.input[0])
        axes = self.axes_of(node, attrs)
        if axes is None:
            shape = self.shapes.get(node.input[0], [])
            axes = [i for i, d in enumerate(shape) if d == 1]
        self.emit("Squeeze", [node.input[0]], node.output[:1], node, dims=sorted(a % rank for a in axes))

    def op_Transpose(self, node, attrs):
        rank = self.rank(node, node.input[0])
        self.emit("Transpose", [node.input[0]], node.output[:1], node,
                  axes=list(attrs.get("perm", range(rank - 1, -1, -1))))

    def op_Cast(self, node, attrs):
        import onnx
        if attrs.get("to") != onnx.TensorProto.FLOAT:
            self.fail(node, "only casts to float32 are supported")
        self.emit("Copy", [node.input[0]], node.output[:1], node)
