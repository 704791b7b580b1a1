"""The runtime benchmark: a real exported small CNN, real JPEG photos, real PyTorch and ORT.

No wall-clock assertions: the figures are checked for presence, consistency and sense."""
import json
import os
import shutil

import pytest
from click.testing import CliRunner
from PIL import Image

pytestmark = pytest.mark.slow  # runs the benchmark end to end


@pytest.fixture(scope="module")
def model_dir(exported_model, fmnist_small, tmp_path_factory):
    """small_cnn with seeded random weights, exported fp32 only; a copy, as bench --int8 adds
    model.int8.onnx to it."""
    out = str(tmp_path_factory.mktemp("bench") / "model")
    shutil.copytree(exported_model(fmnist_small), out)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from benchmarks.corpus import ensure_corpus
    return ensure_corpus(count=18, root=str(tmp_path_factory.mktemp("corpus")))


def test_corpus_is_real_jpeg_photos_in_class_folders(corpus):
    from benchmarks.corpus import corpus_info, ensure_corpus, source_photos
    info = corpus_info(corpus)
    assert info["count"] == 18 and len(info["classes"]) == len(source_photos()) >= 2
    files = [os.path.join(d, f) for d in info["classes"]
             for f in os.listdir(os.path.join(corpus, d))]
    assert len(files) == 18
    sizes = []
    for rel in files:
        with Image.open(os.path.join(corpus, rel)) as img:
            assert img.format == "JPEG" and img.size == (500, 375)
            sizes.append(os.path.getsize(os.path.join(corpus, rel)))
    assert 15_000 < sum(sizes) / len(sizes) < 120_000  # photo-like, not flat colour
    # cached: a second call reuses the folder instead of rebuilding it
    stamp = os.path.getmtime(os.path.join(corpus, "corpus.json"))
    assert ensure_corpus(count=18, root=os.path.dirname(corpus)) == corpus
    assert os.path.getmtime(os.path.join(corpus, "corpus.json")) == stamp


def test_bench_prints_every_section_and_writes_report(model_dir, corpus, fmnist_small,
                                                      tmp_path):
    from benchmarks.commands import bench
    out = tmp_path / "report.json"
    args = [model_dir, "--images", corpus, "--repeats", "1", "--batch-size", "8",
            "--limit", "16", "--threads", "1", "--target", fmnist_small, "--int8",
            "--latency-images", "6", "--out", str(out)]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    text = result.output
    for section in ("machine", "versions", "threads", "1. model-only", "2. end-to-end",
                    "3. single-image latency", "4. INT8 vs FP32", "probe accuracy"):
        assert section in text
    assert text.count("PASS") + text.count("MISS") == 4
    assert os.path.exists(os.path.join(model_dir, "model.int8.onnx"))  # made by --int8

    report = json.loads(out.read_text())
    rate = {k: v["images_per_s"] for k, v in report["speed"].items()}
    assert set(rate) == {"ort_model_only_fp32", "torch_model_only", "ours_end_to_end_fp32",
                         "torch_recipe_end_to_end", "ort_model_only_int8",
                         "ours_end_to_end_int8"}
    assert all(v > 0 for v in rate.values())
    assert all(v["cpu_ms_per_image"] > 0 for v in report["speed"].values())
    assert all(v["images"] == 16 for v in report["speed"].values())
    ratios = report["ratios"]
    assert ratios["end_to_end_ours_vs_torch_recipe"] == pytest.approx(
        rate["ours_end_to_end_fp32"] / rate["torch_recipe_end_to_end"], rel=0.01)
    assert ratios["end_to_end_fraction_of_model_only"] == pytest.approx(
        rate["ours_end_to_end_fp32"] / rate["ort_model_only_fp32"], rel=0.01)
    assert report["threads"]["intra_op"] == report["threads"]["torch"] == 1
    lat = report["latency"]
    assert lat["images"] == 6 and 0 < lat["p50_ms"] <= lat["p99_ms"]
    acc = report["probe"]["accuracy"]
    assert acc["fp32"] > 0.3 and acc["int8"] > 0.3  # 10 classes: chance is 0.1
    assert report["probe"]["int8_change_points"] == pytest.approx(
        100 * (acc["int8"] - acc["fp32"]), abs=0.02)
    png = tmp_path / "report.png"
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 400


def test_bench_reads_a_flat_folder_without_int8_or_target(model_dir, corpus, tmp_path):
    from benchmarks.commands import bench
    flat = tmp_path / "flat"
    flat.mkdir()
    for d in sorted(os.listdir(corpus)):
        if os.path.isdir(os.path.join(corpus, d)):
            for f in sorted(os.listdir(os.path.join(corpus, d)))[:3]:
                shutil.copy(os.path.join(corpus, d, f), flat / f"{d}-{f}")
    (flat / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "flat.json"
    result = CliRunner().invoke(bench, [model_dir, "--images", str(flat), "--repeats", "1",
                                        "--out", str(out),
                                        "--batch-size", "4", "--target", "none", "--no-int8",
                                        "--latency-images", "5", "--threads", "1",
                                        "--exact-decode"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "4. INT8 vs FP32: left out (--no-int8)" in result.output
    assert "ours end-to-end int8" not in result.output
    assert result.output.count("PASS") + result.output.count("MISS") == 2
    assert "skipped" in result.output and "broken.jpg" in result.output
    report = json.loads(out.read_text())
    assert report["images"]["skipped"] == 1 and report["images"]["count"] == 9
    assert all(v["images"] == 9 for v in report["speed"].values())  # both sides, same files
    assert report["threads"]["fast_decode"] is False and "exact decode" in result.output


def test_bench_errors_name_the_problem(model_dir, tmp_path):
    from benchmarks.commands import bench
    result = CliRunner().invoke(bench, [model_dir, "--target", "no-such-data"])
    assert result.exit_code == 2 and "--target no-such-data" in result.output
    empty = tmp_path / "empty_model"
    empty.mkdir()
    result = CliRunner().invoke(bench, [str(empty), "--target", "none"])
    assert result.exit_code == 2 and "no model.onnx" in result.output


def test_bench_on_an_imported_onnx_times_our_side_and_says_why_not_pytorch(corpus, tmp_path):
    """An ONNX made elsewhere (torch.onnx.export of a small conv net), brought in with `cli.py
    import`: no PyTorch source to rebuild, so bench times onnxruntime, model-only and end to
    end, with INT8, and says in one line why the PyTorch side is left out."""
    import torch

    import cli
    from benchmarks.commands import bench
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 16, 3, stride=2), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    src = str(tmp_path / "foreign.onnx")
    torch.onnx.export(net, torch.zeros(1, 3, 64, 64), src, input_names=["pixels"],
                      output_names=["features"], dynamic_axes={"pixels": {0: "n"}},
                      dynamo=False)
    model_dir = str(tmp_path / "imported")
    imported = CliRunner().invoke(cli.main, ["import", src, "--out", model_dir,
                                             "--resize-size", "72", "--mean", "0.5,0.5,0.5",
                                             "--std", "0.25,0.25,0.25",
                                             "--check-data", corpus, "--parity-images", "4"])
    assert imported.exit_code == 0, imported.output
    out = tmp_path / "imported.json"
    result = CliRunner().invoke(bench, [model_dir, "--images", corpus, "--repeats", "1",
                                        "--limit", "12", "--batch-size", "4", "--threads", "1",
                                        "--target", "none", "--int8", "--latency-images", "5",
                                        "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    text = result.output
    assert "PyTorch   left out:" in text and "names no source runs" in text
    assert "   PyTorch eager" not in text and "   PyTorch recipe" not in text
    assert "DataLoader workers" not in text
    report = json.loads(out.read_text())
    assert set(report["speed"]) == {"ort_model_only_fp32", "ours_end_to_end_fp32",
                                    "ort_model_only_int8", "ours_end_to_end_int8"}
    assert all(v["images"] == 12 and v["images_per_s"] > 0 for v in report["speed"].values())
    assert set(report["ratios"]) == {"end_to_end_fraction_of_model_only",
                                     "int8_vs_fp32_model_only", "int8_vs_fp32_end_to_end",
                                     "int8_end_to_end_fraction_of_model_only"}
    assert [f["floor"] for f in report["floors"]] == ["end-to-end fp32 >= 95% of ORT model-only"]
    assert report["pytorch"].startswith("left out:") and report["feature_dim"] == 16
