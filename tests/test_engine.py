"""runtime.engine and the pipeline's contracts around it: one engine used from many threads
gives the same rows as sequentially (CPU session and the device runner's shared buffers, run
here on CPU OrtValues), rows line up with inputs for every input kind, rows the model made
non-finite are failures, and corrupt model folders give one-line errors."""
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def model_dir(exported_model, fmnist_small):
    """small_cnn (seeded random weights) exported by the export stage."""
    return exported_model(fmnist_small, heads=[("specific", [f"c{i}" for i in range(10)])])


@pytest.fixture(scope="module")
def images(fmnist_small):
    """96 real Fashion-MNIST images (8 per class-ish), as paths."""
    return sorted(str(p) for p in Path(fmnist_small).rglob("*.png"))[::4][:96]


def _in_threads(work, n):
    """Run work(k) for k < n in n threads started together; re-raise the first failure."""
    results, failures = [None] * n, []
    barrier = threading.Barrier(n)

    def target(k):
        try:
            barrier.wait(timeout=60)
            results[k] = work(k)
        except Exception as e:
            failures.append(e)
    threads = [threading.Thread(target=target, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if failures:
        raise failures[0]
    return results


def test_engine_opens_and_runs(model_dir, images):
    from runtime.engine import Engine
    engine = Engine.open(model_dir, device="cpu", threads=1, batch_size=8)
    assert engine.provider == "CPUExecutionProvider" and not engine.on_gpu
    assert engine.normalize_in_model and engine.batch_shape == (32, 32, 3)
    assert engine.batch_dtype == np.uint8 and engine.feature_dim == 256
    assert engine.description.architecture == "small_cnn" and engine.input_size == 32
    from runtime.decode import load_crop, normalize_batch
    crops = np.stack([load_crop(p, engine.preprocessing) for p in images[:5]])
    out = engine.run(crops)
    assert out.shape == (5, 256) and out.dtype == np.float32 and np.isfinite(out).all()
    # the float-input model gives the same embeddings from NumPy-normalised images
    np.testing.assert_allclose(engine.run_float(normalize_batch(crops, engine.preprocessing)),
                               out, rtol=1e-5, atol=1e-6)
    twin = engine.with_threads(2)
    assert twin.threads == 2 and twin.session is not engine.session
    np.testing.assert_allclose(twin.run(crops), out, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_one_pipeline_from_eight_threads_in_different_orders(model_dir, images):
    """Each thread embeds its own permutation of the same images; every row must equal the
    sequential one for that image (identical orders could not expose a race)."""
    from runtime import FeaturePipeline
    rng = np.random.default_rng(0)
    orders = [rng.permutation(len(images)) for _ in range(8)]
    for options in ({}, {"stream_workers": 0}):  # interleaved CPU schedule, decode threads
        with FeaturePipeline(model_dir, device="cpu", batch_size=8, **options) as pipe:
            sequential = pipe.embed(images)
            assert sequential.ok.all()
            results = _in_threads(lambda k: pipe.embed([images[i] for i in orders[k]]), 8)
            for order, result in zip(orders, results):
                assert result.ids == [images[i] for i in order] and not result.errors
                np.testing.assert_array_equal(result.vectors, sequential.vectors[order])


@pytest.mark.slow
def test_device_runner_shared_buffers_from_eight_threads(model_dir, images):
    """The GPU path's IOBinding runner on CPU OrtValues: one set of bound buffers per bucket,
    shared by eight threads running different batches at once."""
    from runtime import FeaturePipeline
    from runtime.engine import _DeviceRunner
    with FeaturePipeline(model_dir, device="cpu", batch_size=8, stream_workers=0) as pipe:
        crops = np.stack([np.asarray(c) for c in _crops(pipe, images)])
        engine = pipe.engine_
        runner = _DeviceRunner(engine.session, engine.input_name, "embedding",
                               engine.batch_shape, engine.feature_dim, [1, 2, 4, 8], 0, False,
                               np.uint8, np.float32, device_type="cpu")
        rng = np.random.default_rng(1)
        # per thread: a permutation cut into batches of varied sizes (different buckets)
        plans = []
        for _ in range(8):
            order, cuts, start = rng.permutation(len(crops)), [], 0
            while start < len(crops):
                size = int(rng.choice([3, 5, 8, 11]))
                cuts.append(order[start:start + size])
                start += size
            plans.append(cuts)
        expected = [[runner.run(crops[c]) for c in cuts] for cuts in plans]  # one at a time

        def work(k):
            return [runner.run(crops[c]) for _ in range(3) for c in plans[k]]
        for k, got in enumerate(_in_threads(work, 8)):
            for j, rows in enumerate(got):
                np.testing.assert_array_equal(rows, expected[k][j % len(plans[k])])
        # and the pipeline over an engine whose runner is this one, from eight threads
        sequential = pipe.embed(images)
        engine._runner = runner
        orders = [rng.permutation(len(images)) for _ in range(8)]
        results = _in_threads(lambda k: pipe.embed([images[i] for i in orders[k]]), 8)
        for order, result in zip(orders, results):
            np.testing.assert_allclose(result.vectors, sequential.vectors[order],
                                       rtol=1e-5, atol=1e-6)


def _crops(pipe, paths):
    from runtime.decode import load_crop
    return [load_crop(p, pipe.preprocessing_) for p in paths]


def test_rows_line_up_with_inputs_for_every_kind(model_dir, images, tmp_path):
    from runtime import FeaturePipeline
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in images[:3]:
        shutil.copy(p, folder / os.path.basename(p))
    arrays = np.stack([np.asarray(c) for c in _crops_from(images[:2])])
    with FeaturePipeline(model_dir, device="cpu", batch_size=4) as pipe:
        alone = pipe.embed(images[0]).vectors[0]
        # a folder among items is one error row, rows == inputs
        mixed = pipe.embed([images[0], str(folder), images[1]])
        assert len(mixed) == 3 and mixed.ids == [images[0], str(folder), images[1]]
        assert list(mixed.errors) == [1] and "is a folder" in mixed.errors[1]
        assert "runtime.iter_folder" in mixed.errors[1]
        assert np.isnan(mixed.vectors[1]).all() and mixed.ok.tolist() == [True, False, True]
        np.testing.assert_allclose(mixed.vectors[0], alone, rtol=1e-5, atol=1e-6)
        # a folder alone expands to its images, sorted
        expanded = pipe.embed(str(folder))
        assert len(expanded) == 3 and expanded.ids == sorted(expanded.ids) and expanded.ok.all()
        # a 4-D array alone is its images; in a list it is one error row
        assert len(pipe.embed(arrays)) == 2
        listed = pipe.embed([arrays[0], arrays, images[2], 42])
        assert len(listed) == 4 and sorted(listed.errors) == [1, 3]
        assert "4-D array" in listed.errors[1] and listed.ids[:2] == ["#0", "#1"]
        # a generator is streamed, one row each, bad items included
        streamed = pipe.embed(x for x in [images[0], str(tmp_path / "gone.png"), str(folder)])
        assert len(streamed) == 3 and sorted(streamed.errors) == [1, 2]


def _crops_from(paths):
    from PIL import Image
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def _log_model(model_dir, out_dir):
    """A real ONNX model whose embedding is log(mean of each normalised channel): NaN for dark
    images (negative means), finite for bright ones; the exported description adapted."""
    import onnx
    from onnx import TensorProto, helper
    out_dir.mkdir()
    desc = json.loads(Path(model_dir, "description.json").read_text())
    desc.update(feature_dim=3, heads=[])
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("Log", ["flat"], ["embedding"])], "log_mean",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(out_dir / "model.onnx"))
    (out_dir / "description.json").write_text(json.dumps(desc))
    return str(out_dir)


def test_non_finite_rows_are_failures(model_dir, tmp_path):
    from runtime import FeaturePipeline
    path = _log_model(model_dir, tmp_path / "log_model")
    dark = np.zeros((40, 40), np.uint8)
    bright = np.full((40, 40, 3), 250, np.uint8)
    for options in ({}, {"normalize_in_model": False}):
        with FeaturePipeline(path, device="cpu", batch_size=4, **options) as pipe:
            result = pipe.embed([bright, dark, bright, dark, dark])
        assert len(result) == 5 and sorted(result.errors) == [1, 3, 4]
        assert "model produced non-finite values" in result.errors[1]
        assert result.errors[1].startswith("#1: ")
        assert np.isnan(result.vectors[[1, 3, 4]]).all()
        assert np.isfinite(result.vectors[[0, 2]]).all() and result.ok.sum() == 2


# ---------------------------------------------------------------------------------------------
# corrupt model folders: one line naming the file, non-zero exit, no traceback

def _copy(model_dir, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(model_dir, dst)
    return dst


def _broken_folders(model_dir, tmp_path):
    """{case: (folder given, file the message must name, words of the message)}."""
    import onnx
    cases = {}
    data = Path(model_dir, "model.onnx").read_bytes()
    trunc = _copy(model_dir, tmp_path, "truncated")
    (trunc / "model.onnx").write_bytes(data[:len(data) // 2])
    cases["truncated"] = (trunc, trunc / "model.onnx", "not a readable ONNX model")
    garbage = _copy(model_dir, tmp_path, "garbage")
    (garbage / "model.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    cases["garbage"] = (garbage, garbage / "model.onnx", "not a readable ONNX model")
    cases["file"] = (Path(model_dir, "description.json"), Path(model_dir, "description.json"),
                     "is a file, not a model folder")
    cases["missing"] = (tmp_path / "nowhere", tmp_path / "nowhere", "model folder not found")
    wrong = _copy(model_dir, tmp_path, "wrong_dim")
    desc = json.loads((wrong / "description.json").read_text())
    desc["feature_dim"] = 128
    (wrong / "description.json").write_text(json.dumps(desc))
    cases["description"] = (wrong, wrong / "model.onnx", "does not belong to this model")
    size = _copy(model_dir, tmp_path, "wrong_size")
    desc["feature_dim"], desc["preprocessing"]["input_size"] = 256, 64
    (size / "description.json").write_text(json.dumps(desc))
    cases["size"] = (size, size / "model.onnx", "does not belong to this model")
    outside = _copy(model_dir, tmp_path, "outside")
    model = onnx.load(str(outside / "model.onnx"))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../secret.bin"
    (outside / "model.onnx").write_bytes(model.SerializeToString())
    cases["outside"] = (outside, outside / "model.onnx", "points outside the model folder")
    return cases


def test_corrupt_model_folders_give_one_line(model_dir, images, tmp_path):
    from click.testing import CliRunner
    sys.path.insert(0, ROOT)
    import cli
    from common.model_dir import ModelError
    from runtime import FeaturePipeline
    for case, (folder, named, words) in _broken_folders(model_dir, tmp_path).items():
        with pytest.raises(ModelError, match=words):
            FeaturePipeline(str(folder), device="cpu")
        for command in (["embed", str(folder), images[0], "--out", str(tmp_path / "x.npy"),
                         "--device", "cpu"], ["inspect", str(folder)]):
            result = CliRunner().invoke(cli.main, command)
            lines = result.output.strip().splitlines()
            assert result.exit_code != 0 and isinstance(result.exception, SystemExit), (
                case, command[0], result.output)
            assert len(lines) >= 1 and lines[-1].startswith("Error: "), (case, result.output)
            assert str(named) in lines[-1] and words in lines[-1], (case, lines[-1])
            assert "Traceback" not in result.output
            assert len(lines) == 1, (case, command[0], result.output)
    # the good folder still inspects, and a model with a variant lists it
    ok = CliRunner().invoke(cli.main, ["inspect", model_dir])
    assert ok.exit_code == 0 and "model.onnx (fp32):" in ok.output, ok.output
