"""Probes: accuracy on real targets, C selection, persistence without pickle, fusion into ONNX,
and the `probe fit|predict|fuse` commands end to end on real images."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from tests.no_torch import BLOCK_TORCH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli  # noqa: E402
from common.data import stratified_split  # noqa: E402
from runtime.probes import (  # noqa: E402
    DEFAULT_CS,
    KNNProbe,
    LinearSVMProbe,
    LogisticRegressionProbe,
    NearestClassMeanProbe,
    description_fingerprint,
    load_probe,
    make_probe,
    model_mismatch,
    save_probe,
)

# ---------------------------------------------------------------------------------------------
# fixtures: scikit-learn's digits as raw pixels, and a real exported small CNN

@pytest.fixture(scope="module")
def digits_pixels():
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    train, test = stratified_split(y, 0.3, seed=1)
    return X[train], y[train], X[test], y[test]


@pytest.fixture(scope="module")
def model_dir(exported_model, digits_small):
    """small_cnn with seeded random weights, exported by the export stage (ONNX + description)."""
    return exported_model(digits_small, heads=[("digit", [str(d) for d in range(10)])],
                          input_size=16, width=8, feature_dim=32)


@pytest.fixture(scope="module")
def digits_features(model_dir, digits_small):
    from common.data import load_dataset
    from runtime.pipeline import FeaturePipeline
    data = load_dataset(digits_small)
    with FeaturePipeline(model_dir, device="cpu", batch_size=64) as pipe:
        train = pipe.embed(data.paths("train"))
        test = pipe.embed(data.paths("test"))
        description = pipe.description_
    assert train.ok.all() and test.ok.all()
    return (train.vectors, data.labels("train"), test.vectors, data.labels("test"), description)


# ---------------------------------------------------------------------------------------------
# estimators

@pytest.mark.parametrize("kind,floor", [("logreg", 0.93), ("svm", 0.93), ("ncm", 0.85),
                                        ("knn", 0.95)])
def test_every_kind_is_accurate_on_digits_pixels(digits_pixels, kind, floor):
    X, y, X_test, y_test = digits_pixels
    probe = make_probe(kind).fit(X, y)
    assert probe.score(X_test, y_test) > floor  # chance is 0.1
    proba = probe.predict_proba(X_test)
    assert proba.shape == (len(X_test), 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert (proba >= 0).all()
    np.testing.assert_array_equal(probe.predict(X_test), probe.classes_[proba.argmax(axis=1)])


def test_logreg_chooses_C_on_validation_then_refits(digits_pixels):
    X, y, X_test, y_test = digits_pixels
    probe = LogisticRegressionProbe().fit(X, y)
    scores = probe.val_scores_
    assert len(DEFAULT_CS) == 45 and probe.C_ in scores
    assert DEFAULT_CS.min() <= probe.C_ <= DEFAULT_CS.max()
    assert scores[probe.C_] == max(scores.values())
    # the whole grid was tried, and refinement added midpoints around the best C
    assert set(DEFAULT_CS.tolist()) <= set(scores) and len(scores) >= 46
    # weakest regularisation on the grid's low end is far worse: the sweep matters
    assert scores[min(scores)] < scores[probe.C_] - 0.2
    # refit on train+val: the final model is not the one fitted on the train part
    assert probe.coef_.shape == (10, 64) and probe.intercept_.shape == (10,)
    assert probe.score(X, y) > 0.97


def test_logreg_matches_scikit_learn_at_fixed_C(digits_pixels):
    """Same objective as scikit-learn's multinomial LogisticRegression (used as a reference)."""
    from sklearn.linear_model import LogisticRegression
    X, y, X_test, y_test = digits_pixels
    ours = LogisticRegressionProbe(C=0.05, tol=1e-8).fit(X, y)
    assert ours.val_scores_ == {}
    Xs = (X - ours.mean_) / ours.scale_
    ref = LogisticRegression(C=0.05, tol=1e-10, max_iter=5000).fit(Xs, y)
    theirs = ref.predict_proba((X_test - ours.mean_) / ours.scale_)
    assert np.abs(ours.predict_proba(X_test) - theirs).max() < 1e-3


@pytest.mark.parametrize("kind", ["logreg", "svm"])
def test_fast_objective_matches_the_float64_one(digits_pixels, monkeypatch, kind):
    """The fast sweep's objective (float32, blocks of rows, row ranges in threads) gives the
    original float64 loss and gradient to float32 rounding, whatever the blocks and threads."""
    from runtime.probes import objectives as probes
    X, y, _, _ = digits_pixels
    std = X.std(axis=0)
    Xs = (X - X.mean(axis=0)) / np.where(std > 0, std, 1.0)
    probe = make_probe(kind)
    codes = probe._encode(y)
    targets = probe._targets(codes, 10)
    params = np.random.default_rng(0).normal(0.0, 0.05, (Xs.shape[1] + 1) * 10)
    want_loss, want_grad = type(probe)._loss_grad(params, Xs, codes, targets, 1e-3)
    # small blocks and ranges so that 1257 rows give uneven blocks in three threads
    monkeypatch.setattr(probes, "_BLOCK_ROWS", 100)
    monkeypatch.setattr(probes, "_ROWS_PER_THREAD", 300)
    for jobs in (1, 3):
        objective = probes._BlockedObjective(type(probe)._block, Xs.astype(np.float32), codes,
                                             targets, 1e-3, jobs)
        try:
            assert len(objective.ranges) == jobs and (objective.pool is None) == (jobs == 1)
            loss, grad = objective(params)
        finally:
            objective.close()
        assert loss == pytest.approx(want_loss, rel=1e-5)
        np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-5 * np.abs(want_grad).max())


def test_fast_sweep_scores_strong_regularisation_at_its_optimum(digits_pixels):
    """At C = 1e-6 the optimum is W ~ 0 with the intercept at the log class priors; the fast
    sweep's loose tolerance must still score that optimum, not an early stop on the way."""
    X, y, _, _ = digits_pixels
    full = LogisticRegressionProbe(sweep="full").fit(X, y)
    fast = LogisticRegressionProbe(n_jobs=2).fit(X, y)
    assert fast.val_scores_[1e-6] == pytest.approx(full.val_scores_[1e-6], abs=0.01)
    assert fast.val_scores_[1e-6] < 0.6  # a far weaker classifier than at the chosen C


def test_string_labels_and_explicit_validation(digits_pixels):
    X, y, X_test, y_test = digits_pixels
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                      "nine"])
    for kind in ("logreg", "svm", "ncm", "knn"):
        probe = make_probe(kind).fit(X[:800], names[y[:800]], X_val=X[800:], y_val=names[y[800:]])
        assert sorted(probe.classes_) == sorted(names)
        predicted = probe.predict(X_test)
        assert predicted.dtype.kind == "U" and set(predicted) <= set(names)
        assert probe.score(X_test, names[y_test]) > 0.85
    with pytest.raises(ValueError, match="absent from the training labels"):
        LogisticRegressionProbe().fit(X[:100], names[y[:100]], X[100:110], ["ten"] * 10)


def test_bad_inputs_are_refused_with_clear_errors(digits_pixels):
    X, y, _, _ = digits_pixels
    with pytest.raises(ValueError, match="NaN"):
        LogisticRegressionProbe().fit(np.where(np.eye(len(X), 64, dtype=bool), np.nan, X), y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        NearestClassMeanProbe().fit(X[:5], np.zeros(5))
    with pytest.raises(RuntimeError, match="not fitted"):
        KNNProbe().predict(X)
    probe = NearestClassMeanProbe().fit(X, y)
    with pytest.raises(ValueError, match="fitted on 64"):
        probe.predict(X[:, :10])
    with pytest.raises(ValueError, match="unknown probe kind"):
        make_probe("forest")


@pytest.mark.parametrize("kind", ["logreg", "svm", "ncm", "knn"])
def test_save_load_round_trip_without_pickle(digits_pixels, tmp_path, kind):
    X, y, X_test, _ = digits_pixels
    labels = np.array([f"d{v}" for v in y]) if kind in ("svm", "knn") else y
    probe = make_probe(kind).fit(X, labels)
    save_probe(probe, str(tmp_path / "p"), metadata={"feature_dim": 64, "note": "digits"})
    assert sorted(os.listdir(tmp_path / "p")) == ["probe.json", "probe.npz"]
    with np.load(tmp_path / "p" / "probe.npz", allow_pickle=False) as arrays:
        assert all(arrays[name].dtype != object for name in arrays.files)
    doc = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert doc["kind"] == kind and doc["feature_dim"] == 64 and len(doc["classes"]) == 10
    loaded = load_probe(str(tmp_path / "p"))
    assert type(loaded) is type(probe) and loaded.metadata_["note"] == "digits"
    np.testing.assert_array_equal(loaded.classes_, probe.classes_)
    np.testing.assert_array_equal(loaded.predict(X_test), probe.predict(X_test))
    np.testing.assert_allclose(loaded.predict_proba(X_test), probe.predict_proba(X_test),
                               rtol=0, atol=1e-12)
    # overwrite in place is allowed for a probe folder, refused for any other folder
    save_probe(probe, str(tmp_path / "p"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a probe folder"):
        save_probe(probe, str(tmp_path / "other"))


def test_model_mismatch_names_both_sides(digits_features):
    X, y, _, _, description = digits_features
    probe = make_probe("ncm").fit(X, y)
    probe.metadata_ = {"model_fingerprint": description_fingerprint(description),
                       "architecture": "small_cnn"}
    assert model_mismatch(probe, description) is None
    other = description.to_dict()
    other["method_args"] = {"seed": 123}
    message = model_mismatch(probe, other)
    assert "fingerprint" in message and description_fingerprint(other) in message
    assert description_fingerprint(description) in message
    # the variant noted by export in `extra` does not change the model's identity
    assert model_mismatch(probe, dict(description.to_dict(), extra={"variant": "int8"})) is None
    wide = dict(description.to_dict(), feature_dim=64)
    assert "32-d" in model_mismatch(probe, wide) and "64-d" in model_mismatch(probe, wide)


# ---------------------------------------------------------------------------------------------
# fusion

@pytest.mark.parametrize("kind,tolerance", [("logreg", 1e-4), ("svm", 1e-4),
                                            # ncm's temperature (~800 on these all-positive
                                            # ReLU features) scales fp32 rounding of cosines
                                            ("ncm", 3e-4), ("knn", 1e-6)])
def test_fused_model_matches_embed_plus_probe(model_dir, digits_features, digits_small,
                                              tmp_path, kind, tolerance):
    import onnx
    import onnxruntime as ort

    from common.data import load_dataset
    from runtime.pipeline import FeaturePipeline
    from runtime.probes import fuse_probe, read_fused_classes

    X, y, _, _, description = digits_features
    params = {"weights": "similarity"} if kind == "knn" else {}
    probe = make_probe(kind, **params).fit(X, np.array([f"digit-{v}" for v in y]))
    probe.metadata_ = {"model_fingerprint": description_fingerprint(description)}
    info = fuse_probe(model_dir, probe, str(tmp_path / "fused.onnx"))
    onnx.checker.check_model(onnx.load(info["path"]), full_check=True)
    assert info["outputs"][-2:] == ["probabilities", "label"]
    assert read_fused_classes(info["path"]) == list(probe.classes_)

    paths = load_dataset(digits_small).paths("test")[:40]
    with FeaturePipeline(model_dir, device="cpu") as pipe:
        images, errors = pipe.preprocess(paths)
    assert not errors
    session = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    embedding, probabilities, label = session.run(["embedding", "probabilities", "label"],
                                                  {"image": images})
    reference = probe.predict_proba(embedding)
    assert probabilities.shape == (40, 10) and label.dtype == np.int64
    assert np.abs(probabilities - reference).max() < tolerance
    np.testing.assert_array_equal(probe.classes_[label], probe.predict(embedding))
    # the fused file still serves embeddings through the pipeline
    with FeaturePipeline(info["path"], device="cpu") as fused_pipe:
        np.testing.assert_allclose(fused_pipe.embed_arrays(images), embedding, atol=1e-5)


def test_fuse_refuses_a_mismatched_model(model_dir, digits_features, tmp_path):
    from runtime.probes import FuseError, fuse_probe
    X, y, _, _, description = digits_features
    wrong = LinearSVMProbe(C=1.0).fit(X[:, :16], y)
    with pytest.raises(FuseError, match="16-d features .* 32-d"):
        fuse_probe(model_dir, wrong, str(tmp_path / "w.onnx"))
    assert not os.path.exists(tmp_path / "w.onnx")


# ---------------------------------------------------------------------------------------------
# the CLI

def _invoke(*args):
    return CliRunner().invoke(cli.main, list(args), catch_exceptions=False)


def test_cli_fit_predict_fuse_end_to_end(model_dir, digits_small, tmp_path):
    probe_dir = str(tmp_path / "probe")
    fitted = _invoke("probe", "fit", model_dir, "--data", digits_small, "--out", probe_dir,
                     "--device", "cpu", "--batch-size", "16", "--threads", "1")
    assert fitted.exit_code == 0, fitted.output
    assert "validation: C = " in fitted.output and "test accuracy" in fitted.output
    doc = json.loads(open(os.path.join(probe_dir, "probe.json")).read())
    meta = doc["metadata"]
    assert doc["kind"] == "logreg" and meta["n_train"] == 150 and meta["feature_dim"] == 32
    assert meta["test_accuracy"] > 0.3  # random-weight CNN features; chance is 0.1
    assert meta["level"] == "digit" and doc["classes"] == [str(d) for d in range(10)]

    # a folder with real images, a corrupt file and a missing path, in a known order
    folder = tmp_path / "inputs"
    folder.mkdir()
    test_images = sorted((p for p in os.scandir(os.path.join(digits_small, "test", "7"))),
                         key=lambda e: e.name)[:3]
    for i, entry in enumerate(test_images):
        shutil.copy(entry.path, folder / f"img{i}.png")
    (folder / "img1b.png").write_bytes(b"this is not a png")
    out = str(tmp_path / "preds.jsonl")
    predicted = _invoke("probe", "predict", model_dir, probe_dir, str(folder),
                        str(tmp_path / "missing.png"), "--out", out, "--top-k", "3",
                        "--device", "cpu")
    assert predicted.exit_code == 0, predicted.output
    lines = [json.loads(line) for line in open(out)]
    assert [os.path.basename(r["id"]) for r in lines] == [
        "img0.png", "img1.png", "img1b.png", "img2.png", "missing.png"]
    assert "error" in lines[2] and "img1b.png" in lines[2]["error"]
    assert "error" in lines[4] and "not found" in lines[4]["error"]
    for record in (lines[0], lines[1], lines[3]):
        assert record["label"] in doc["classes"] and 0 < record["score"] <= 1
        assert len(record["top_k"]) == 3 and record["top_k"][0] == [record["label"],
                                                                    record["score"]]
        assert record["top_k"][0][1] >= record["top_k"][1][1] >= record["top_k"][2][1]
    assert "2 input image(s) could not be embedded" in predicted.output

    fused = _invoke("probe", "fuse", model_dir, probe_dir, "--out", str(tmp_path / "f.onnx"))
    assert fused.exit_code == 0, fused.output
    assert "probabilities, label" in fused.output and "10 classes" in fused.output

    # svm and knn through the CLI, with a coarser choice of options
    knn = _invoke("probe", "fit", model_dir, "--data", digits_small, "--out",
                  str(tmp_path / "knn"), "--kind", "knn", "--k", "3", "--device", "cpu")
    assert knn.exit_code == 0 and "k = 3" in knn.output
    knn_fused = _invoke("probe", "fuse", model_dir, str(tmp_path / "knn"), "--out",
                        str(tmp_path / "k.onnx"))
    assert knn_fused.exit_code == 0 and os.path.exists(tmp_path / "k.onnx")
    not_onnx = _invoke("probe", "fuse", model_dir, probe_dir, "--out", str(tmp_path / "k.txt"))
    assert not_onnx.exit_code == 2 and "must end in .onnx" in not_onnx.output


def test_cli_fit_on_a_nested_folder_at_the_generic_level(model_dir, nested_folder, tmp_path):
    """A user folder without splits: all images are used, labels come from --level."""
    out = str(tmp_path / "generic")
    result = _invoke("probe", "fit", model_dir, "--data", nested_folder, "--out", out,
                     "--level", "0", "--kind", "svm", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "test accuracy" not in result.output and "5 classes (level level0)" in result.output
    doc = json.loads(open(os.path.join(out, "probe.json")).read())
    assert doc["classes"] == ["bag", "bottoms", "dress", "footwear", "tops"]
    assert doc["metadata"]["split"] == "all" and doc["metadata"]["n_train"] == 200
    assert doc["metadata"]["train_accuracy"] > 0.5  # chance is 0.2 (tops alone are 0.4)


def test_cli_refuses_a_probe_from_another_model(model_dir, digits_small, tmp_path):
    import onnx
    probe_dir = str(tmp_path / "probe")
    assert _invoke("probe", "fit", model_dir, "--data", digits_small, "--out", probe_dir,
                   "--kind", "ncm", "--device", "cpu").exit_code == 0
    # the same network relabelled as another model (different description, same feature size)
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    model = onnx.load(str(other / "model.onnx"))
    for prop in model.metadata_props:
        if prop.key == "unirep.description":
            d = json.loads(prop.value)
            d["method_args"] = {"seed": 99}
            prop.value = json.dumps(d)
    onnx.save(model, str(other / "model.onnx"))
    image = next(os.scandir(os.path.join(digits_small, "test", "3"))).path
    for args in (["predict", str(other), probe_dir, image, "--out", str(tmp_path / "p.jsonl")],
                 ["fuse", str(other), probe_dir, "--out", str(tmp_path / "f.onnx")]):
        result = _invoke("probe", *args)
        assert result.exit_code == 2, result.output
        assert "fingerprint" in result.output and probe_dir in result.output
        assert str(other) in result.output
    bad = _invoke("probe", "fit", model_dir, "--data", digits_small, "--out", probe_dir,
                  "--kind", "ncm", "--C", "1")
    assert bad.exit_code == 2 and "--C applies to logreg and svm" in bad.output
    level = _invoke("probe", "fit", model_dir, "--data", digits_small, "--out", probe_dir,
                    "--level", "species")
    assert level.exit_code == 2 and "unknown level" in level.output and "digit" in level.output


NO_TORCH = BLOCK_TORCH + textwrap.dedent("""
    from click.testing import CliRunner
    import cli
    result = CliRunner().invoke(cli.main, ["probe", "predict", sys.argv[2], sys.argv[3],
                                           sys.argv[4], "--out", sys.argv[5]])
    assert result.exit_code == 0, result.output
    import runtime.probes.fuse, runtime.probes
    assert not any(k.split(".")[0] == "torch" for k in sys.modules)
    print(open(sys.argv[5]).read())
""")


def test_probe_predict_runs_without_torch(model_dir, digits_features, digits_small, tmp_path):
    X, y, _, _, description = digits_features
    probe = make_probe("logreg", C=1.0).fit(X, y)
    probe.metadata_ = {"model_fingerprint": description_fingerprint(description)}
    save_probe(probe, str(tmp_path / "p"))
    image = next(os.scandir(os.path.join(digits_small, "test", "5"))).path
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, ROOT, model_dir, str(tmp_path / "p"),
                           image, str(tmp_path / "out.jsonl")],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[0])
    assert record["id"] == image and record["label"] in list(range(10))


def test_load_probe_for_checks_the_backbone(digits_features, tmp_path):
    """One loader for the service, bulk jobs and the probe commands: dims and fingerprint."""
    from common.errors import UserError
    from runtime.probes import ProbeMismatchError, load_probe_for
    X, y, _, _, description = digits_features
    probe = make_probe("ncm").fit(X, y)
    save_probe(probe, str(tmp_path / "good"),
               {"model_fingerprint": description_fingerprint(description)})
    save_probe(probe, str(tmp_path / "other"), {"model_fingerprint": "0" * 16})
    loaded = load_probe_for(description, str(tmp_path / "good"))
    np.testing.assert_allclose(loaded.predict_proba(X[:5]), probe.predict_proba(X[:5]))
    with pytest.raises(ProbeMismatchError, match="fingerprint 0000000000000000") as caught:
        load_probe_for(description, str(tmp_path / "other"))
    assert isinstance(caught.value, UserError) and "refit the probe" in caught.value.reason
    narrow = {**description.to_dict(), "feature_dim": X.shape[1] + 1}
    with pytest.raises(ProbeMismatchError, match=f"expects {X.shape[1]}-d features"):
        load_probe_for(narrow, str(tmp_path / "good"))
