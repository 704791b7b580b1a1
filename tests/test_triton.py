"""The Triton model repository: every config.pbtxt parsed with tritonclient's ModelConfig, the
ONNX model (uint8 front, fused probe) run with onnxruntime as Triton would, and the
Python-backend decoder run outside Triton with a stand-in for `triton_python_backend_utils`,
made here; together they give the library's rows and the probe's classes."""
import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest

from tests.test_serve import images  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def triton_model(exported_model, fmnist_small, tmp_path_factory):
    """A small CNN, its library pipeline and a probe fitted on it (with its fingerprint)."""
    from common.data import load_dataset
    from runtime import FeaturePipeline, LogisticRegressionProbe, save_probe
    from runtime.probes import description_fingerprint

    model_dir = exported_model(fmnist_small)
    data = load_dataset(fmnist_small)
    pipe = FeaturePipeline(model_dir, device="cpu", batch_size=8)
    train = pipe.embed(data.paths("train")[::4])
    probe = LogisticRegressionProbe(C=1.0).fit(train.vectors[train.ok],
                                               data.labels("train")[::4][train.ok])
    probe_dir = str(tmp_path_factory.mktemp("triton-probe") / "fm")
    save_probe(probe, probe_dir, metadata={
        "model_fingerprint": description_fingerprint(pipe.description_),
        "architecture": pipe.description_.architecture})
    yield {"dir": model_dir, "pipe": pipe, "probe": probe, "probe_dir": probe_dir}
    pipe.close()


def _config(folder):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    with open(os.path.join(folder, "config.pbtxt")) as f:
        return text_format.Parse(f.read(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repo(triton_model, tmp_path_factory):
    from export.triton import write_triton_repository
    root = str(tmp_path_factory.mktemp("triton") / "repo")
    write_triton_repository(triton_model["dir"], root, name="cnn", max_batch_size=16,
                            tensorrt=True, probes={"fm": triton_model["probe_dir"]})
    return root


def test_every_config_parses_as_triton_model_config(repo, triton_model):
    from tritonclient.grpc import model_config_pb2 as mc

    pipe, probe = triton_model["pipe"], triton_model["probe"]
    assert sorted(os.listdir(repo)) == ["cnn", "cnn_decode", "cnn_images"]
    size, dim, k = pipe.preprocessing_.input_size, pipe.feature_dim_, len(probe.classes_)
    onnx_config = _config(os.path.join(repo, "cnn"))
    assert onnx_config.backend == "onnxruntime" and onnx_config.max_batch_size == 16
    (inp,) = onnx_config.input
    assert inp.data_type == mc.TYPE_UINT8 and list(inp.dims) == [size, size, 3]
    assert inp.format == mc.ModelInput.FORMAT_NHWC
    outs = {o.name: o for o in onnx_config.output}
    assert list(outs) == ["embedding", "fm_probabilities", "fm_label"]
    assert list(outs["embedding"].dims) == [dim] and list(outs["fm_probabilities"].dims) == [k]
    assert outs["fm_probabilities"].label_filename == "fm_labels.txt"
    assert outs["fm_label"].data_type == mc.TYPE_INT64
    accel = onnx_config.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accel] == ["tensorrt"]
    with open(os.path.join(repo, "cnn", "fm_labels.txt")) as f:
        assert f.read().splitlines() == [str(c) for c in probe.classes_]

    decode = _config(os.path.join(repo, "cnn_decode"))
    assert decode.backend == "python" and decode.input[0].data_type == mc.TYPE_STRING
    assert list(decode.output[0].dims) == [size, size, 3]
    assert sorted(os.listdir(os.path.join(repo, "cnn_decode", "1"))) == ["description.json",
                                                                          "model.py"]
    ensemble = _config(os.path.join(repo, "cnn_images"))
    assert ensemble.platform == "ensemble" and ensemble.input[0].name == "image"
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["cnn_decode", "cnn"]
    assert dict(steps[0].output_map) == {"pixels": "crops"}
    assert dict(steps[1].input_map) == {inp.name: "crops"}
    assert set(dict(steps[1].output_map)) == set(outs)
    assert [o.name for o in ensemble.output] == list(outs)


def _stub_backend_utils():
    """The part of Triton's `triton_python_backend_utils` the decoder uses, over NumPy."""
    stub = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, array

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError:
        def __init__(self, message):
            self._message = message

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    def get_input_tensor_by_name(request, name):
        return next((t for t in request if t.name() == name), None)

    stub.Tensor, stub.TritonError = Tensor, TritonError
    stub.InferenceResponse = InferenceResponse
    stub.get_input_tensor_by_name = get_input_tensor_by_name
    return stub


def test_ensemble_steps_give_the_library_rows(repo, triton_model, images, monkeypatch):  # noqa: F811
    import onnxruntime as ort
    from google.protobuf import json_format

    pipe, probe = triton_model["pipe"], triton_model["probe"]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _stub_backend_utils())
    folder = os.path.join(repo, "cnn_decode")
    spec = importlib.util.spec_from_file_location("cnn_decode_model",
                                                  os.path.join(folder, "1", "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_repository": folder, "model_version": "1",
                      "model_config": json_format.MessageToJson(
                          _config(folder), preserving_proto_field_name=True)})
    stub = sys.modules["triton_python_backend_utils"]
    batch = images[:5]
    good = [stub.Tensor("image", np.array(batch, dtype=object).reshape(-1, 1))]
    bad = [stub.Tensor("image", np.array([batch[0], b"not an image"], dtype=object)[:, None])]
    ok, failed = model.execute([good, bad])
    assert failed.error is not None and failed.error.message().startswith("image 1: ")
    (crops,) = ok.output_tensors
    assert crops.name() == "pixels" and crops.as_numpy().dtype == np.uint8

    session = ort.InferenceSession(os.path.join(repo, "cnn", "1", "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    embedding, proba, label = session.run(["embedding", "fm_probabilities", "fm_label"],
                                          {session.get_inputs()[0].name: crops.as_numpy()})
    expected = pipe.embed(batch).vectors
    np.testing.assert_allclose(embedding, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(proba, probe.predict_proba(expected), rtol=1e-4, atol=1e-6)
    with open(os.path.join(repo, "cnn_images", "fm_labels.txt")) as f:
        labels = f.read().splitlines()
    assert [labels[i] for i in label] == [str(c) for c in probe.predict(expected)]


def test_repository_without_probes_or_decoder_and_overwrite(triton_model, tmp_path):
    from export.triton import write_triton_repository
    folder = write_triton_repository(triton_model["dir"], str(tmp_path / "r"), name="plain",
                                     decode=False)
    assert sorted(os.listdir(tmp_path / "r")) == ["plain"]
    assert sorted(os.listdir(folder)) == ["1", "config.pbtxt", "description.json"]
    assert [o.name for o in _config(folder).output] == ["embedding"]
    with pytest.raises(FileExistsError, match="overwrite"):
        write_triton_repository(triton_model["dir"], str(tmp_path / "r"), name="plain",
                                decode=False)
    json.loads(open(os.path.join(folder, "description.json")).read())


def test_export_refuses_triton_options_without_the_format(fmnist_small):
    from click.testing import CliRunner

    from export.commands import export
    result = CliRunner().invoke(export, ["run", "--out", "m", "--triton-repo", "r"])
    assert result.exit_code == 2 and "--format triton" in result.output


def test_export_writes_the_repository_from_a_model_folder(triton_model, tmp_path):
    from click.testing import CliRunner

    from export.commands import export
    from runtime import load_probe, save_probe

    repo = str(tmp_path / "repo")
    args = [triton_model["dir"], "--format", "triton", "--out", repo,
            "--triton-probe", f"fm={triton_model['probe_dir']}"]
    result = CliRunner().invoke(export, args)
    assert result.exit_code == 0, result.output
    name = os.path.basename(triton_model["dir"])
    assert sorted(os.listdir(repo)) == [name, f"{name}_decode", f"{name}_images"]
    assert [o.name for o in _config(os.path.join(repo, name)).output] == [
        "embedding", "fm_probabilities", "fm_label"]
    again = CliRunner().invoke(export, args)
    assert again.exit_code == 2 and "exists" in again.output
    other = load_probe(triton_model["probe_dir"])
    other.metadata_ = dict(other.metadata_, model_fingerprint="0" * 16)
    save_probe(other, str(tmp_path / "other"))
    refused = CliRunner().invoke(export, [triton_model["dir"], "--format", "triton", "--out",
                                          str(tmp_path / "repo2"), "--triton-probe",
                                          f"x={tmp_path / 'other'}"])
    assert refused.exit_code == 2 and "0000000000000000" in refused.output
    assert not os.path.exists(tmp_path / "repo2" / name)  # nothing half-written
