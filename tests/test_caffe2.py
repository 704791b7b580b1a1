"""Caffe2 export: written nets decode with the caffe2.proto definitions, and the NumPy reference
executor matches onnxruntime on real Fashion-MNIST images for every registered architecture,
both torch.onnx exporters, and a combined (L-inf normalised, concatenated) graph."""
import glob
import json
import os
import struct

import numpy as np
import onnx
import pytest
import torch

from common.images import preprocess
from export.caffe2 import (
    Argument,
    NetDef,
    OperatorDef,
    UnsupportedOnnxOp,
    args_dict,
    convert_onnx_file,
    load_net,
    make_op,
    onnx_to_caffe2,
)
from export.caffe2_exec import Caffe2ExecError, run_caffe2, run_nets
from train.models import ARCHITECTURES, load_run
from train.runs import untrained_run

SIZE = 32
BATCH = 3
# Executor vs onnxruntime, both float32: max |diff| relative to the output's scale, and cosine.
REL_TOL = 1e-4
MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def images(fmnist_small):
    """Real Fashion-MNIST paths: 3 test images to compare on, 20 train images to calibrate BatchNorm."""
    test = sorted(glob.glob(os.path.join(fmnist_small, "test", "**", "*.png"), recursive=True))
    train = sorted(glob.glob(os.path.join(fmnist_small, "train", "**", "*.png"), recursive=True))
    return {"test": [test[0], test[len(test) // 2], test[-1]], "calibration": train[::10]}


def _batch(paths, arch):
    """Preprocessed exactly as every stage does (common.images.preprocess), at the test size."""
    from train.models import default_preprocessing
    pre = default_preprocessing(arch, SIZE)
    return np.stack([preprocess(p, pre) for p in paths]).astype(np.float32)


class _Exported(torch.nn.Module):
    """What deployment exports: the embedding plus one head's logits."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, image):
        embedding = self.network.forward_features(image)
        return embedding, self.network.heads[0](embedding)


class _Combined(torch.nn.Module):
    """Two backbones, each embedding L-infinity normalised, then concatenated (the papers' combination)."""

    def __init__(self, first, second, eps=1e-6):
        super().__init__()
        self.backbones = torch.nn.ModuleList([first, second])
        self.eps = eps

    def forward(self, image):
        parts = [b(image) for b in self.backbones]
        return torch.cat([e / (e.abs().amax(dim=1, keepdim=True) + self.eps) for e in parts], dim=1)


def _calibrate_batchnorm(model, x):
    """Give random-weight BatchNorm layers real-data statistics (from images other than the compared
    ones), so activations are O(1): torchvision's init otherwise shrinks MobileNet features to ~1e-9
    and a parity check would compare noise."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(x))
    return model.eval()


def _export(module, x, path, dynamo: bool, outputs, **extra):
    kwargs = dict(input_names=["image"], output_names=outputs, **extra)
    if dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=64)},)
    else:
        kwargs["dynamic_axes"] = {"image": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
        kwargs["opset_version"] = 17
    module.eval()  # a fresh wrapper module starts in training mode: export inference graphs
    torch.onnx.export(module, (torch.from_numpy(x),), path, dynamo=dynamo, **kwargs)
    return path


def _parity(onnx_path, out_dir, x):
    import onnxruntime as ort
    info = convert_onnx_file(onnx_path, out_dir)
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(None, {"image": x})))
    got = run_caffe2(os.path.join(out_dir, "init_net.pb"), os.path.join(out_dir, "predict_net.pb"), {"image": x})
    assert list(got) == names
    figures = {}
    for name in names:
        e, g = expected[name], got[name]
        assert g.shape == e.shape and g.dtype == np.float32
        diff = float(np.abs(e - g).max())
        scale = float(np.abs(e).max())
        cosine = float(((e * g).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(g, axis=1))).min())
        figures[name] = (diff, scale, cosine)
        assert scale > 1e-3, f"{name}: output too small to prove anything ({scale})"
        assert diff <= REL_TOL * scale, f"{name}: max |diff| {diff} vs scale {scale}"
        assert cosine >= MIN_COSINE, f"{name}: cosine {cosine}"
    return info, figures


def _check_decoded(out_dir, onnx_path, x_shape, outputs):
    """Field-level checks of the written files, decoded with the caffe2.proto messages."""
    init_net = load_net(os.path.join(out_dir, "init_net.pb"))
    predict_net = load_net(os.path.join(out_dir, "predict_net.pb"))
    model = onnx.load(onnx_path)
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    filled = []
    for op in init_net.op:
        assert op.type in ("GivenTensorFill", "GivenTensorInt64Fill", "GivenTensorIntFill")
        assert not op.input and len(op.output) == 1
        assert [a.name for a in op.arg] == ["shape", "values"]
        shape, values = list(op.arg[0].ints), op.arg[1]
        values = np.asarray(values.floats if op.type == "GivenTensorFill" else values.ints)
        assert int(np.prod(shape)) == values.size
        if op.output[0] in initializers:  # kept under its ONNX name: same shape and values
            value = initializers[op.output[0]]
            assert shape == list(value.shape)
            np.testing.assert_array_equal(values, value.ravel())
        filled.append(op.output[0])
    assert filled, "init_net fills no weights"
    assert list(predict_net.external_input) == ["image"] + filled
    assert list(predict_net.external_output) == outputs
    available = set(predict_net.external_input)
    for op in predict_net.op:
        missing = [i for i in op.input if i not in available]
        assert not missing, f"{op.type} {op.name!r} reads {missing} before they exist"
        available.update(op.output)
        args = args_dict(op)
        if op.type == "Conv":
            assert {"kernels", "strides", "pads", "dilations", "group"} <= set(args)
            assert len(args["pads"]) == 2 * len(args["kernels"])
        if op.type in ("Reshape", "Concat"):
            assert len(op.output) == 2  # old_shape / split_info, as Caffe2 defines them
        if op.type in ("SpatialBN", "Dropout"):
            assert args["is_test"] == 1
    with open(os.path.join(out_dir, "value_info.json")) as f:
        value_info = json.load(f)
    assert value_info["image"] == [1, [1] + list(x_shape[1:])]
    assert value_info["_description"]["inputs"][0]["shape"] == ["batch"] + list(x_shape[1:])
    return predict_net


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_architecture_converts_and_matches_onnxruntime(arch, dynamo, images, tmp_path):
    untrained_run(arch, str(tmp_path / "run"), heads=[("specific", [f"c{i}" for i in range(10)])],
                  input_size=SIZE)
    network, _ = load_run(str(tmp_path / "run"))
    x = _batch(images["test"], arch)
    _calibrate_batchnorm(network, _batch(images["calibration"], arch))
    onnx_path = _export(_Exported(network), x, str(tmp_path / "model.onnx"), dynamo,
                        ["embedding", "logits_specific"])
    info, figures = _parity(onnx_path, str(tmp_path / "caffe2"), x)
    predict_net = _check_decoded(str(tmp_path / "caffe2"), onnx_path, x.shape,
                                 ["embedding", "logits_specific"])
    assert info["ops"]["Conv"] >= 5 and info["ops"]["FC"] >= 1
    assert info["init_net_bytes"] > 4 * info["parameters"] > 0
    assert sum(info["ops"].values()) == len(predict_net.op)
    # Batch 1 runs through the same nets (the reshape targets are batch-agnostic).
    one = run_caffe2(info["files"]["init_net"], info["files"]["predict_net"], {"image": x[:1]})
    assert one["embedding"].shape == (1, network.feature_dim)
    np.testing.assert_allclose(one["embedding"][0], run_caffe2(
        info["files"]["init_net"], info["files"]["predict_net"], {"image": x})["embedding"][0],
        rtol=1e-4, atol=1e-4 * float(np.abs(one["embedding"]).max()))
    print(f"\n{arch} {'dynamo' if dynamo else 'legacy'}: " + ", ".join(
        f"{k} max|diff| {d:.2e} (scale {s:.2e}) cos {c:.7f}" for k, (d, s, c) in figures.items()))


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_combined_graph_converts_and_matches_onnxruntime(dynamo, images, tmp_path):
    from train.models import create_backbone
    torch.manual_seed(0)
    x = _batch(images["test"], "small_cnn")
    combined = _calibrate_batchnorm(_Combined(create_backbone("small_cnn"), create_backbone("resnet18")),
                                    _batch(images["calibration"], "small_cnn"))
    # The legacy export keeps BatchNormalization (and Identity-shared weights) unfolded here.
    extra = {} if dynamo else {"do_constant_folding": False}
    onnx_path = _export(combined, x, str(tmp_path / "combined.onnx"), dynamo, ["embedding"], **extra)
    info, figures = _parity(onnx_path, str(tmp_path / "caffe2"), x)
    _check_decoded(str(tmp_path / "caffe2"), onnx_path, x.shape, ["embedding"])
    if not dynamo:
        assert info["ops"]["SpatialBN"] == info["ops"]["Conv"] == 5 + 20
    for op_type in ("Abs", "ReduceMax", "Div", "Concat"):
        assert info["ops"].get(op_type, 0) >= 1, op_type
    got = run_caffe2(info["files"]["init_net"], info["files"]["predict_net"], {"image": x})["embedding"]
    assert got.shape == (BATCH, 256 + 512)
    # Each half is L-infinity normalised: its largest magnitude is 1 (up to eps).
    np.testing.assert_allclose(np.abs(got[:, :256]).max(1), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.abs(got[:, 256:]).max(1), 1.0, atol=1e-4)
    print(f"\ncombined {'dynamo' if dynamo else 'legacy'}: max|diff| {figures['embedding'][0]:.2e} "
          f"cos {figures['embedding'][2]:.7f}")


def _graph(nodes, inputs, outputs, initializers=(), opset=18):
    graph = onnx.helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    # IR version 10: what current onnxruntime reads (onnx may default to a newer one).
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=10)


def _info(name, shape):
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def test_unsupported_op_error_names_op_and_node():
    model = _graph([onnx.helper.make_node("Relu", ["image"], ["r"], name="first"),
                    onnx.helper.make_node("Erf", ["r"], ["embedding"], name="the_erf_node")],
                   [_info("image", ["batch", 4])], [_info("embedding", ["batch", 4])])
    with pytest.raises(UnsupportedOnnxOp, match=r"Erf.*the_erf_node"):
        onnx_to_caffe2(model)
    # A supported op in an unsupported form says so too.
    model = _graph([onnx.helper.make_node("Gemm", ["image", "w"], ["embedding"], name="gemm_a", transA=1)],
                   [_info("image", [4, "batch"])], [_info("embedding", ["batch", 3])],
                   [onnx.numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])
    with pytest.raises(UnsupportedOnnxOp, match=r"Gemm.*gemm_a.*transA"):
        onnx_to_caffe2(model)


def small_forms_graph():
    """(model, input): shape arithmetic for a dynamic batch, constant inputs, HardSwish/Clip/MatMul."""
    helper, nh = onnx.helper, onnx.numpy_helper
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((8, 5)).astype(np.float32), "w"),
             nh.from_array(np.array([2, 3], np.int64), "hw_axes"),
             nh.from_array(np.array([0], np.int64), "zero"),
             nh.from_array(np.array([-1], np.int64), "minus_one"),
             nh.from_array(np.array(0.5, np.float32), "half"),
             nh.from_array(np.array(6.0, np.float32), "six")]
    nodes = [
        helper.make_node("Constant", [], ["pads"], value=nh.from_array(np.array([0, 0, 1, 0, 0, 0, 0, 1], np.int64))),
        helper.make_node("Constant", [], ["one"], value=nh.from_array(np.array([1], np.int64))),
        helper.make_node("Pad", ["image", "pads"], ["padded"], name="pad", mode="constant"),
        helper.make_node("HardSwish", ["padded"], ["hs"], name="hs"),
        helper.make_node("ReduceMean", ["hs", "hw_axes"], ["pooled"], name="gap", keepdims=1),
        helper.make_node("Shape", ["pooled"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["pooled", "target"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "w"], ["mm"], name="mm"),
        helper.make_node("Max", ["mm", "half"], ["floored"], name="max_half"),
        helper.make_node("Clip", ["floored", "", "six"], ["clipped"], name="clip"),
        helper.make_node("Abs", ["clipped"], ["a"]),
        helper.make_node("ReduceMax", ["a", "one"], ["m"], keepdims=1),
        helper.make_node("Div", ["clipped", "m"], ["embedding"], name="linf"),
    ]
    model = _graph(nodes, [_info("image", ["batch", 8, 6, 6])], [_info("embedding", ["batch", 5])], inits)
    onnx.checker.check_model(model)
    return model, rng.standard_normal((3, 8, 6, 6)).astype(np.float32) * 4


def test_small_graph_forms_fold_and_run(tmp_path):
    """Shape arithmetic for a dynamic batch, constant inputs and HardSwish/Clip/MatMul forms."""
    import onnxruntime as ort
    model, x = small_forms_graph()
    path = str(tmp_path / "forms.onnx")
    onnx.save(model, path)
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    init_net, predict_net, value_info = onnx_to_caffe2(model)
    got = run_nets(init_net, predict_net, {"image": x})["embedding"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    types = [op.type for op in predict_net.op]
    assert types[:4] == ["PadImage", "HardSigmoid", "Mul", "AveragePool"]
    reshape = next(op for op in predict_net.op if op.type == "Reshape")
    assert args_dict(reshape)["shape"] == [0, -1]  # the dynamic batch became "copy dimension 0"
    assert args_dict(next(op for op in predict_net.op if op.name == "max_half")) == {"min": 0.5}
    assert args_dict(next(op for op in predict_net.op if op.name == "clip")) == {"max": 6.0}
    assert "pads" not in predict_net.external_input and "hw_axes" not in predict_net.external_input
    assert value_info == {"image": [onnx.TensorProto.FLOAT, [1, 8, 6, 6]]}


def operator_forms_graph():
    """(model, input): grouped/dilated/strided conv with asymmetric pads, BatchNormalization, both
    pooling pad rules, Gemm without transB and with alpha/beta, Softmax, Dropout, Identity,
    (Un)squeeze, Transpose."""
    helper, nh = onnx.helper, onnx.numpy_helper
    rng = np.random.default_rng(1)

    def init(name, *shape, positive=False):
        value = rng.standard_normal(shape).astype(np.float32)
        return nh.from_array(np.abs(value) + 0.5 if positive else value, name)

    inits = [init("cw", 6, 2, 3, 3), init("cb", 6), init("scale", 6), init("shift", 6), init("mean", 6),
             init("var", 6, positive=True), init("gw", 6, 4), init("gc", 4),
             nh.from_array(np.array([1], np.int64), "axis1"), nh.from_array(np.array([-1], np.int64), "axis2")]
    nodes = [
        helper.make_node("Conv", ["image", "cw", "cb"], ["c"], name="conv", group=2, strides=[2, 1],
                         dilations=[2, 1], pads=[1, 0, 2, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("Sigmoid", ["bn"], ["s"]),
        helper.make_node("AveragePool", ["s"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         count_include_pad=1),
        helper.make_node("AveragePool", ["s"], ["ap0"], kernel_shape=[2, 3], strides=[2, 2], pads=[1, 1, 0, 1]),
        helper.make_node("MaxPool", ["ap0"], ["mp"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("Add", ["ap", "ap"], ["sum"]),
        helper.make_node("GlobalAveragePool", ["sum"], ["gap"]),
        helper.make_node("GlobalMaxPool", ["mp"], ["gmp"]),
        helper.make_node("Mul", ["gap", "gmp"], ["prod"]),
        helper.make_node("Flatten", ["prod"], ["flat"], axis=1),
        helper.make_node("Dropout", ["flat"], ["dropped"]),
        helper.make_node("Gemm", ["dropped", "gw", "gc"], ["g"], alpha=0.5, beta=2.0),
        helper.make_node("Identity", ["g"], ["ident"]),
        helper.make_node("Unsqueeze", ["ident", "axis1"], ["u"]),
        helper.make_node("Transpose", ["u"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Squeeze", ["t", "axis2"], ["sq"]),
        helper.make_node("Softmax", ["sq"], ["embedding"], axis=-1),
    ]
    model = _graph(nodes, [_info("image", ["batch", 4, 9, 8])], [_info("embedding", ["batch", 4])], inits)
    onnx.checker.check_model(model)
    return model, rng.standard_normal((2, 4, 9, 8)).astype(np.float32)


def test_operator_forms_match_onnxruntime():
    """Grouped/dilated/strided conv with asymmetric pads, BatchNormalization, both pooling pad rules,
    Gemm without transB and with alpha/beta, Softmax, Dropout, Identity, (Un)squeeze, Transpose."""
    import onnxruntime as ort
    model, x = operator_forms_graph()
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"image": x})[0]
    init_net, predict_net, _ = onnx_to_caffe2(model)
    got = run_nets(init_net, predict_net, {"image": x})["embedding"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    types = [op.type for op in predict_net.op]
    assert types.count("PadImage") == 1  # only the count_include_pad pooling pads explicitly
    conv = args_dict(predict_net.op[0])
    assert conv == {"kernels": [3, 3], "strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [2, 1], "group": 2}
    assert {"SpatialBN", "FC", "Dropout", "Copy", "ExpandDims", "Transpose", "Squeeze", "Softmax"} <= set(types)


def _decode_fields(buf: bytes) -> list[tuple[int, int, object]]:
    """A minimal protobuf wire decoder, independent of the protobuf library: (field, wire type, value)."""
    def varint(pos):
        value = shift = 0
        while True:
            byte = buf[pos]
            value |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if not byte & 0x80:
                return value, pos
    fields, pos = [], 0
    while pos < len(buf):
        key, pos = varint(pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = varint(pos)
        elif wire == 2:
            length, pos = varint(pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = struct.unpack("<f", buf[pos:pos + 4])[0], pos + 4
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        fields.append((number, wire, value))
    return fields


def test_wire_format_uses_caffe2_field_numbers():
    net = NetDef(name="n", type="simple", external_input=["image", "w"], external_output=["embedding"])
    net.op.append(make_op("Conv", ["image", "w"], ["embedding"], name="c", kernels=[3, 3], epsilon=0.5,
                          order="NCHW", values=np.array([1.5, -2.0], np.float32)))
    net.op[0].device_option.device_type = 1
    fields = _decode_fields(net.SerializeToString())
    assert [(n, w) for n, w, _ in fields] == [(1, 2), (2, 2), (3, 2), (7, 2), (7, 2), (8, 2)]
    assert fields[0][2] == b"n" and fields[2][2] == b"simple" and fields[5][2] == b"embedding"
    op = _decode_fields(fields[1][2])
    assert [(n, v) for n, _, v in op if n in (1, 2, 3, 4)] == [
        (1, b"image"), (1, b"w"), (2, b"embedding"), (3, b"c"), (4, b"Conv")]
    device = [v for n, _, v in op if n == 6]
    assert _decode_fields(device[0]) == [(1, 0, 1)]
    args = [_decode_fields(v) for n, _, v in op if n == 5]
    # Argument: name 1; ints 6 (varints, one tag each: not packed); f 2 (fixed32); s 4; floats 5.
    assert args[0] == [(1, 2, b"kernels"), (6, 0, 3), (6, 0, 3)]
    assert args[1] == [(1, 2, b"epsilon"), (2, 5, 0.5)]
    assert args[2] == [(1, 2, b"order"), (4, 2, b"NCHW")]
    assert args[3] == [(1, 2, b"values"), (5, 5, 1.5), (5, 5, -2.0)]
    # Packed encodings (what some writers emit) parse into the same repeated fields.
    packed = b"\x0a\x01v" + b"\x2a\x08" + struct.pack("<2f", 1.5, -2.0) + b"\x32\x02\x03\x05"
    arg = Argument.FromString(packed)
    assert arg.name == "v" and list(arg.floats) == [1.5, -2.0] and list(arg.ints) == [3, 5]
    # An OperatorDef encoded by hand (type 4, input 1, output 2) decodes with the generated classes.
    op_def = OperatorDef.FromString(b"\x22\x04Relu\x0a\x01x\x12\x01y")
    assert (op_def.type, list(op_def.input), list(op_def.output)) == ("Relu", ["x"], ["y"])


def test_executor_rejects_unknown_operator_and_missing_blob():
    init_net, predict_net = NetDef(name="i"), NetDef(name="p", external_input=["image"],
                                                     external_output=["y"])
    predict_net.op.append(make_op("Swish", ["image"], ["y"], name="swish_op"))
    with pytest.raises(Caffe2ExecError, match=r"'Swish'.*swish_op"):
        run_nets(init_net, predict_net, {"image": np.zeros((1, 3), np.float32)})
    predict_net = NetDef(name="p", external_input=["image"], external_output=["y"])
    predict_net.op.append(make_op("Add", ["image", "bias"], ["y"], name="add_op"))
    with pytest.raises(Caffe2ExecError, match=r"add_op.*'bias' does not exist"):
        run_nets(init_net, predict_net, {"image": np.zeros((1, 3), np.float32)})
