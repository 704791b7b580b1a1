"""Universality evaluation: metrics against hand-computed values, target splits, and `evaluate`
end to end on real data with real exported ONNX models."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from common.data import load_dataset
from runtime.cli.evaluate import evaluate
from runtime.evaluation import EvaluationError, evaluate_models, split_target
from runtime.evaluation import statistics as U

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A short regularisation sweep where a test checks plumbing rather than the probe protocol.
QUICK_PROBE = {"Cs": np.logspace(-3, 3, 7), "refine": 0}


# ---------------------------------------------------------------------------------------------
# Metrics

def test_nrg_hand_computed():
    ref = [50.0, 80.0, 100.0]
    model = [60.0, 90.0, 100.0]
    # (60-50)/50, (90-80)/20, (100-100)/eps -> 0.2, 0.5, 0
    np.testing.assert_allclose(U.nrg(model, ref), [0.2, 0.5, 0.0])
    assert U.mnrg(model, ref) == pytest.approx(20.0)
    assert U.anrg(model, ref) == pytest.approx(70.0 / 3)
    # The same scores as fractions give the same numbers.
    assert U.mnrg([0.6, 0.9, 1.0], [0.5, 0.8, 1.0]) == pytest.approx(20.0)
    assert U.anrg([0.6, 0.9, 1.0], [0.5, 0.8, 1.0]) == pytest.approx(70.0 / 3)
    # The reference against itself gains nothing.
    assert U.mnrg(ref, ref) == 0.0 and U.anrg(ref, ref) == 0.0


def test_nrg_epsilon_floor_when_reference_is_perfect():
    # Reference at 100%: the denominator is floored at EPSILON percent points.
    ref, model = [50.0, 80.0, 100.0], [60.0, 90.0, 99.0]
    values = U.nrg(model, ref)
    assert values[2] == pytest.approx(-1.0 / U.EPSILON)
    assert np.isfinite(values).all()
    # The median ignores that outlier; the mean does not.
    assert U.mnrg(model, ref) == pytest.approx(20.0)
    assert U.anrg(model, ref) == pytest.approx(100.0 * (0.2 + 0.5 - 1.0 / U.EPSILON) / 3)


def test_median_ignores_a_single_outlier_target():
    ref = [50.0, 50.0, 50.0, 50.0]
    model = [60.0, 60.0, 60.0, 0.0]         # NRG 0.2, 0.2, 0.2, -1
    assert U.mnrg(model, ref) == pytest.approx(20.0)
    assert U.anrg(model, ref) == pytest.approx(100.0 * (0.6 - 1.0) / 4)


def test_nrg_mappings_align_by_target_and_errors():
    ref = {"a": 50.0, "b": 80.0}
    model = {"b": 90.0, "a": 60.0}
    np.testing.assert_allclose(U.nrg(model, ref), [0.5, 0.2])    # order of `model`
    with pytest.raises(ValueError, match="different targets"):
        U.mnrg({"a": 60.0}, ref)
    with pytest.raises(ValueError, match="one per target"):
        U.mnrg([60.0], [50.0, 80.0])
    with pytest.raises(ValueError, match="exceeds max_score"):
        U.nrg([120.0], [50.0])
    # Explicit percent: a model scoring 0.5% against a 0.8% reference is not read as fractions.
    assert U.nrg([0.5], [0.8], fractions=False)[0] == pytest.approx(-0.3 / 99.2)


def test_logit_mean():
    assert U.logit_mean([0.5, 0.9]) == pytest.approx(np.log(9.0) / 2)
    assert U.logit_mean([50.0, 90.0]) == pytest.approx(np.log(9.0) / 2)       # percents
    clip = U.LOGIT_CLIP
    assert U.logit_mean([1.0]) == pytest.approx(np.log((1 - clip) / clip))    # finite at 100%
    assert U.logit_mean([0.0, 1.0]) == pytest.approx(0.0)
    assert U.sigmoid(U.logit_mean([0.7])) == pytest.approx(0.7)


def test_mean_per_class_accuracy_unbalanced():
    y_true = np.array([0] * 8 + [1] * 2)
    y_pred = np.zeros(10, dtype=int)                 # always the majority class
    assert U.top1_accuracy(y_true, y_pred) == pytest.approx(0.8)
    assert U.mean_per_class_accuracy(y_true, y_pred) == pytest.approx(0.5)
    y_true = np.array([0] * 6 + [1] * 3 + [2])
    y_pred = np.array([0] * 6 + [1, 0, 0] + [2])    # recalls 1, 1/3, 1
    assert U.mean_per_class_accuracy(y_true, y_pred) == pytest.approx(7 / 9)
    with pytest.raises(ValueError, match="predictions"):
        U.mean_per_class_accuracy([0, 1], [0])


def test_aggregate_models_relative_to_reference():
    models = {"ref": {"targets": {"a": {"top1": 0.5}, "b": {"top1": 0.8}}},
              "new": {"targets": {"a": {"top1": 0.6}, "b": {"top1": 0.9}}}}
    agg = U.aggregate_models(models, "ref")
    assert agg["new"]["mean"] == pytest.approx(0.75)
    assert agg["new"]["mnrg"] == pytest.approx(35.0)       # median of 0.2, 0.5
    assert agg["ref"]["mnrg"] == 0.0
    assert agg["new"]["logit_mean"] == pytest.approx((U.logit(0.6) + U.logit(0.9)) / 2)
    assert U.aggregate_models(models)["new"]["mnrg"] is None
    with pytest.raises(ValueError, match="not among the models"):
        U.aggregate_models(models, "nope")


# ---------------------------------------------------------------------------------------------
# Target splits

def test_given_splits_are_used(digits_small):
    ds = load_dataset(digits_small)
    t = split_target(ds, name="digits")
    assert t.info["split"] == "given" and t.info["test_fraction"] is None
    assert t.train_paths == ds.paths("train") and t.test_paths == ds.paths("test")
    np.testing.assert_array_equal(t.test_labels, ds.labels("test"))
    assert t.info["n_train"] == len(ds.paths("train")) and t.info["n_test"] == len(ds.paths("test"))


def test_stratified_split_when_no_splits(nested_folder):
    ds = load_dataset(nested_folder)
    assert "all" in ds.splits
    a = split_target(ds, test_fraction=0.3, seed=0)
    b = split_target(ds, test_fraction=0.3, seed=0)
    c = split_target(ds, test_fraction=0.3, seed=1)
    assert a.info["split"] == "stratified" and a.info["test_fraction"] == 0.3
    assert a.test_paths == b.test_paths and a.train_paths == b.train_paths      # deterministic
    assert a.test_paths != c.test_paths                                          # seeded
    assert not set(a.train_paths) & set(a.test_paths)
    assert sorted(a.train_paths + a.test_paths) == sorted(ds.paths("all"))
    classes = np.unique(ds.labels("all"))
    assert len(classes) == 10
    for k in classes:                    # 20 images per class: 6 test, 14 train
        assert (a.test_labels == k).sum() == 6 and (a.train_labels == k).sum() == 14
    assert a.info["n_classes_train"] == a.info["n_classes_test"] == 10


def test_max_per_class_is_seeded(nested_folder):
    ds = load_dataset(nested_folder)
    a = split_target(ds, max_per_class=4, seed=3)
    b = split_target(ds, max_per_class=4, seed=3)
    assert a.train_paths == b.train_paths and a.test_paths == b.test_paths
    assert np.bincount(a.train_labels).max() == 4 and np.bincount(a.test_labels).max() == 4
    assert a.info["n_train"] == 40 and a.info["max_per_class"] == 4


def test_split_errors(nested_folder, tmp_path):
    with pytest.raises(EvaluationError, match="test fraction"):
        split_target(load_dataset(nested_folder), test_fraction=1.5)
    one_class = tmp_path / "one"
    os.makedirs(one_class / "only")
    src = load_dataset(nested_folder).paths("all")[:4]
    for i, p in enumerate(src):
        (one_class / "only" / f"{i}.png").write_bytes(open(p, "rb").read())
    with pytest.raises(EvaluationError, match="fewer than 2 classes"):
        split_target(load_dataset(str(one_class)))


# ---------------------------------------------------------------------------------------------
# End to end, with real ONNX models exported from untrained small CNNs

@pytest.fixture(scope="module")
def two_models(exported_model, digits_small):
    """Two small CNNs of different widths with seeded random weights, really exported."""
    return [exported_model(digits_small, name="narrow", seed=0, width=8, feature_dim=48),
            exported_model(digits_small, name="wide", seed=1, width=12, feature_dim=96)]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _npz_state(cache_dir):
    return {f: os.stat(os.path.join(cache_dir, f)).st_mtime_ns
            for f in sorted(os.listdir(cache_dir)) if f.endswith(".npz")}


def test_evaluate_end_to_end_with_reference_and_cache(two_models, digits_small, nested_folder,
                                                      tmp_path):
    narrow, wide = two_models
    cache, out = str(tmp_path / "cache"), str(tmp_path / "report")
    targets = [digits_small, nested_folder]
    report = evaluate_models([narrow, wide], targets, out, reference=narrow, cache_dir=cache,
                             max_per_class=10, progress=False)
    assert report["reference"] == "narrow" and list(report["models"]) == ["narrow", "wide"]
    assert report["cache"]["misses"] == 4 and report["cache"]["hits"] == 0
    names = list(report["targets"])
    assert names == ["digits-per-class-15", "nested"]
    assert report["targets"]["digits-per-class-15"]["split"] == "given"
    nested = report["targets"]["nested"]
    assert nested["split"] == "stratified" and (nested["n_train"], nested["n_test"]) == (100, 60)
    for name, dim in (("narrow", 48), ("wide", 96)):
        m = report["models"][name]
        assert m["embedding_dim"] == dim
        for t in names:
            r = m["targets"][t]
            assert {"top1", "mean_per_class", "C", "n_train", "n_test", "split"} <= set(r)
            assert r["top1"] > 3 * r["chance"] == pytest.approx(0.3)     # 10 classes, well above chance
            assert 0 < r["mean_per_class"] <= 1 and r["C"] > 0 and r["images_per_s"] > 0
            assert r["dropped"] == {"train": 0, "test": 0}
            assert r["provider"].endswith("ExecutionProvider") and not r["cached"]
        accs = [m["targets"][t]["top1"] for t in names]
        assert m["mean"] == pytest.approx(np.mean(accs))
        assert m["logit_mean"] == pytest.approx(U.logit_mean(accs))
    assert report["models"]["narrow"]["mnrg"] == 0.0
    ref_scores = [report["models"]["narrow"]["targets"][t]["top1"] for t in names]
    wide_scores = [report["models"]["wide"]["targets"][t]["top1"] for t in names]
    assert report["models"]["wide"]["mnrg"] == pytest.approx(U.mnrg(wide_scores, ref_scores))
    assert report["models"]["wide"]["anrg"] == pytest.approx(U.anrg(wide_scores, ref_scores))

    # Files: JSON with the documented keys, a markdown table, a PNG.
    with open(os.path.join(out, "report.json")) as f:
        saved = json.load(f)
    assert set(saved) >= {"models", "reference", "targets", "probe", "seed", "versions"}
    assert saved["models"]["wide"]["targets"]["nested"]["top1"] == pytest.approx(
        report["models"]["wide"]["targets"]["nested"]["top1"])
    md = open(os.path.join(out, "report.md")).read()
    assert "| model | dim | digits-per-class-15 | nested | mean | logit mean | mNRG | aNRG |" in md
    assert "narrow (ref)" in md and "**" in md
    assert "stratified (30% test, seed 0), at most 10/class" in md
    with open(os.path.join(out, "report.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]

    # Second run: every embedding comes from the cache, files untouched, same results.
    before = _npz_state(cache)
    assert len(before) == 4
    again = evaluate_models([narrow, wide], targets, None, reference=narrow, cache_dir=cache,
                            max_per_class=10, probe_params=QUICK_PROBE, progress=False)
    assert again["cache"] == {"dir": cache, "hits": 4, "misses": 0}
    assert all(r["cached"] and r["provider"].endswith("ExecutionProvider")
               for m in again["models"].values() for r in m["targets"].values())
    assert _npz_state(cache) == before
    assert again["probe_params"]["Cs"] == pytest.approx(list(QUICK_PROBE["Cs"]))
    for name in ("narrow", "wide"):
        for t in names:
            first, second = report["models"][name]["targets"][t], again["models"][name]["targets"][t]
            assert (first["n_train"], first["n_test"]) == (second["n_train"], second["n_test"])
            assert second["top1"] > 0.3 and second["C"] in QUICK_PROBE["Cs"]

    # Other split settings are a different cache entry.
    third = evaluate_models([narrow], [nested_folder], None, cache_dir=cache, max_per_class=5,
                            probe_params=QUICK_PROBE, progress=False)
    assert third["cache"]["misses"] == 1 and len(_npz_state(cache)) == 5


def test_cli_reference_outside_list_and_without_reference(two_models, digits_small,
                                                          shared_cache, tmp_path):
    narrow, wide = two_models
    runner = CliRunner()
    out = str(tmp_path / "with_ref")
    result = runner.invoke(evaluate, [wide, "--target", digits_small, "--reference", narrow,
                                      "--name", "W", "--max-per-class", "8", "--out", out,
                                      "--cache-dir", shared_cache], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "| W |" in result.output and "wrote" in result.output
    saved = json.load(open(os.path.join(out, "report.json")))
    assert list(saved["models"]) == ["W", "narrow"] and saved["reference"] == "narrow"
    assert saved["models"]["narrow"]["mnrg"] == 0.0 and saved["models"]["W"]["mnrg"] is not None
    assert saved["targets"]["digits-per-class-15"]["max_per_class"] == 8
    assert saved["models"]["W"]["targets"]["digits-per-class-15"]["n_train"] == 80

    out = str(tmp_path / "no_ref")
    result = runner.invoke(evaluate, [narrow, narrow, "-t", digits_small, "--max-per-class", "8",
                                      "--out", out, "--cache-dir", shared_cache])
    assert result.exit_code == 0, result.output
    saved = json.load(open(os.path.join(out, "report.json")))
    assert list(saved["models"]) == ["narrow", "narrow-2"]             # names deduplicated
    assert saved["reference"] is None and saved["models"]["narrow"]["mnrg"] is None
    assert saved["cache"]["hits"] == 2                                  # cached by the run above
    assert "mNRG" not in open(os.path.join(out, "report.md")).read()


def test_cli_errors(two_models, digits_small, tmp_path):
    narrow, _ = two_models
    runner = CliRunner()
    out = str(tmp_path / "r")
    result = runner.invoke(evaluate, [str(tmp_path / "missing"), "-t", digits_small, "--out", out])
    assert result.exit_code == 2 and "not found" in result.output and "export" in result.output
    os.makedirs(tmp_path / "empty")
    result = runner.invoke(evaluate, [str(tmp_path / "empty"), "-t", digits_small, "--out", out])
    assert result.exit_code == 2 and "no model.onnx" in result.output
    result = runner.invoke(evaluate, [narrow, "-t", "no-such-dataset", "--out", out])
    assert result.exit_code == 2 and "no-such-dataset" in result.output
    assert "built-in" in result.output
    result = runner.invoke(evaluate, [narrow, "-t", str(tmp_path / "nope" / "dir"), "--out", out])
    assert result.exit_code == 2 and "folder not found" in result.output
    result = runner.invoke(evaluate, [narrow, "-t", digits_small, "--name", "a", "--name", "b",
                                      "--out", out])
    assert result.exit_code == 2 and "--name" in result.output
    assert not os.path.exists(out)


def test_evaluate_never_imports_torch(two_models, digits_small, tmp_path):
    narrow, _ = two_models
    code = (
        "import sys; from cli import main\n"
        "try:\n"
        f"    main(['evaluate', {narrow!r}, '-t', {digits_small!r}, '--max-per-class', '3',\n"
        f"          '--no-cache', '--probe', 'svm', '--out', {str(tmp_path / 'r')!r}])\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "import runtime.pipeline, runtime.probes, runtime.evaluation.report\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('NO TORCH')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NO TORCH" in done.stdout
    saved = json.load(open(tmp_path / "r" / "report.json"))
    assert saved["probe"] == "svm" and saved["cache"]["dir"] is None


def test_undecodable_items_are_dropped_and_counted(two_models, nested_folder, tmp_path):
    narrow, _ = two_models
    target = tmp_path / "small"
    ds = load_dataset(nested_folder)
    for k, cls in enumerate(ds.leaf_classes[:3]):
        os.makedirs(target / cls)
        for i, p in enumerate(np.array(ds.paths("all"))[ds.labels("all") == k][:8]):
            (target / cls / f"{i}.png").write_bytes(open(p, "rb").read())
    bad = target / ds.leaf_classes[0] / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    report = evaluate_models([narrow], [str(target)], None, use_cache=False,
                             probe_params=QUICK_PROBE, progress=False)
    r = report["models"]["narrow"]["targets"]["small"]
    assert r["dropped"]["train"] + r["dropped"]["test"] == 1
    assert r["n_train"] + r["n_test"] == 24 and report["targets"]["small"]["n_train"] + \
        report["targets"]["small"]["n_test"] == 25
    assert any("broken.png" in path for path in r["errors"])
