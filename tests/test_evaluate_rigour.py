"""Rigour of the evaluation: intervals and paired comparisons with known answers, `--seeds` and
`--group` end to end on real exported models, the content-keyed embedding cache, options refused
before the cache, and the fast probe sweep against the full one."""
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from common.data import load_dataset, stratified_split
from runtime.cli.evaluate import evaluate
from runtime.evaluation import EvaluationError, compare_units, evaluate_models
from runtime.evaluation.statistics import (
    bootstrap_difference,
    mean_interval,
    paired_difference,
    welch_difference,
)
from runtime.probes import LogisticRegressionProbe

# ---------------------------------------------------------------------------------------------
# statistics on constructed cases


def test_mean_interval_matches_the_t_formula():
    s = mean_interval([0.70, 0.80, 0.90])
    half = 4.302652729749464 * 0.1 / np.sqrt(3)      # t(0.975, df=2) * sd / sqrt(n)
    assert s["mean"] == pytest.approx(0.8)
    assert (s["low"], s["high"]) == pytest.approx((0.8 - half, 0.8 + half))
    one = mean_interval([0.5])
    assert one["n"] == 1 and np.isnan(one["low"])


def test_paired_difference_sees_a_consistent_gain_that_unpaired_noise_hides():
    control = np.array([0.60, 0.75, 0.90])           # large seed-to-seed spread
    better = control + np.array([0.021, 0.019, 0.020])
    d = paired_difference(better, control)
    assert d["diff"] == pytest.approx(0.020)
    assert d["significant"] and d["low"] > 0
    # the same two samples unpaired: the spread between seeds swamps a 2-point gain
    assert not welch_difference(better, control)["significant"]
    # a difference that changes sign between pairs is noise
    noisy = control + np.array([0.03, -0.03, 0.001])
    assert not paired_difference(noisy, control)["significant"]


def test_a_zero_width_interval_is_no_evidence():
    # two seeds whose differences are equal (accuracies are multiples of 1 / test size): the
    # t interval has zero width, which estimates no noise, so it must not read as a finding
    d = paired_difference(np.array([0.52, 0.60]), np.array([0.50, 0.58]))
    assert d["diff"] == pytest.approx(0.02) and d["low"] == pytest.approx(d["high"])
    assert not d["significant"]
    assert not welch_difference(np.array([0.6, 0.6]), np.array([0.5, 0.5, 0.5]))["significant"]


def test_welch_interval_against_the_hand_computed_value():
    a, b = np.array([0.80, 0.82, 0.84, 0.86]), np.array([0.70, 0.74])
    d = welch_difference(a, b)
    va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 2
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 1)
    from scipy.stats import t
    half = t.ppf(0.975, df) * np.sqrt(va + vb)
    assert d["diff"] == pytest.approx(0.11)
    assert (d["low"], d["high"]) == pytest.approx((0.11 - half, 0.11 + half))


def test_bootstrap_over_test_images():
    rng = np.random.default_rng(0)
    b = rng.random(2000) < 0.8
    a = b.copy()
    a[np.flatnonzero(~b)[:200]] = True                # a fixes 200 of b's errors: +10 points
    d = bootstrap_difference(a, b)
    assert d["diff"] == pytest.approx(0.10)
    assert d["significant"] and d["low"] > 0.08 and d["high"] < 0.12
    same = bootstrap_difference(b, b)
    assert same["diff"] == 0 and not same["significant"]


def _model(values_per_target):
    """A report's model entry with per-seed top-1 values."""
    return {"targets": {t: {"top1": float(np.mean(v)), "seeds": {"top1": list(v)}}
                        for t, v in values_per_target.items()}}


def test_compare_units_pairs_members_of_groups():
    # group A beats group B by exactly 3 points on every member and target; B's members spread
    models = {}
    for i, base in enumerate([0.5, 0.6, 0.7]):
        models[f"B[{i}]"] = _model({"x": [base, base], "y": [base + 0.1, base + 0.1]})
        models[f"A[{i}]"] = _model({"x": [base + 0.03] * 2, "y": [base + 0.13] * 2})
    members = {"A": ["A[0]", "A[1]", "A[2]"], "B": ["B[0]", "B[1]", "B[2]"]}
    c = compare_units("A", "B", models, members, {}, ["x", "y"], [0, 1], 0.95)
    assert c["targets"]["x"]["diff"] == pytest.approx(0.03)
    assert c["mean"]["diff"] == pytest.approx(0.03)
    assert c["mean"]["method"] == "paired t over members"
    assert c["targets"]["x"]["high"] == pytest.approx(0.03)   # no noise in the differences
    # a single network against a group: the interval covers the group's spread
    models["S"] = _model({"x": [0.6, 0.6], "y": [0.7, 0.7]})
    d = compare_units("B", "S", models, members, {}, ["x", "y"], [0, 1], 0.95)
    assert d["targets"]["x"]["diff"] == pytest.approx(0.0)
    assert not d["targets"]["x"]["significant"]
    assert d["mean"]["method"] == "t over members"


# ---------------------------------------------------------------------------------------------
# end to end on real exported models


@pytest.fixture(scope="module")
def models(tmp_path_factory, digits_small):
    """Three exported small CNNs with random weights: two 'seeds' of one design, one other."""
    from export.onnx_export import export_runs
    from train.runs import untrained_run
    base = tmp_path_factory.mktemp("rigour")
    out = {}
    for name, seed, width in (("a0", 0, 8), ("a1", 1, 8), ("b", 2, 12)):
        untrained_run("small_cnn", str(base / "runs" / name), seed=seed, input_size=16,
                      width=width, feature_dim=32)
        export_runs([str(base / "runs" / name)], str(base / name), check_data=digits_small,
                    parity_images=2)
        out[name] = str(base / name)
    return out


def test_seeds_groups_and_controls_end_to_end(models, digits_small, tmp_path):
    report = evaluate_models([models["b"]], [digits_small], str(tmp_path / "rep"),
                             groups={"A": [models["a0"], models["a1"]]}, controls=["b"],
                             seeds=2, cache_dir=str(tmp_path / "cache"), device="cpu",
                             progress=False, probe_params={"Cs": [0.01, 1.0], "refine": 0})
    t = "digits:per_class=15" if "digits:per_class=15" in report["targets"] else \
        next(iter(report["targets"]))
    cell = report["models"]["b"]["targets"][t]
    assert len(cell["seeds"]["top1"]) == 2
    assert cell["top1"] == pytest.approx(np.mean(cell["seeds"]["top1"]))
    low, high = cell["top1_interval"]
    assert low <= cell["top1"] <= high
    group = report["groups"]["A"]
    assert group["members"] == ["A[0]", "A[1]"]
    members = [report["models"][m]["targets"][t]["top1"] for m in group["members"]]
    assert group["targets"][t]["mean"] == pytest.approx(np.mean(members))
    (comparison,) = report["comparisons"]
    assert (comparison["model"], comparison["control"]) == ("A", "b")
    assert comparison["targets"][t]["diff"] == pytest.approx(
        np.mean(members) - cell["top1"])
    text = open(tmp_path / "rep" / "report.md").read()
    assert "## Groups" in text and "## Paired comparisons" in text and "A - b" in text
    assert os.path.getsize(tmp_path / "rep" / "report.png") > 1000
    # the PNG's bars: values in percent with whiskers down to the interval's ends
    from runtime.evaluation.report import bar_intervals
    values, whiskers = bar_intervals(report)["b"]
    assert values[0] == pytest.approx(100 * cell["top1"])
    assert whiskers[:, 0] == pytest.approx([100 * (cell["top1"] - low), 100 * (high - cell["top1"])])
    assert values[-1] == pytest.approx(100 * report["models"]["b"]["mean"])
    assert (whiskers >= 0).all() and whiskers[:, -1].sum() > 0   # the mean's, over 2 seeds


def test_one_seed_falls_back_to_the_bootstrap(models, digits_small, tmp_path):
    report = evaluate_models([models["a0"], models["b"]], [digits_small], None,
                             reference=models["a0"], cache_dir=str(tmp_path / "cache"),
                             device="cpu", progress=False, probe_params={"C": 1.0})
    (comparison,) = report["comparisons"]
    assert comparison["control"] == "a0" and comparison["mean"]["method"] == "paired bootstrap"
    t = next(iter(report["targets"]))
    m = report["models"]
    assert comparison["targets"][t]["diff"] == pytest.approx(
        m["b"]["targets"][t]["top1"] - m["a0"]["targets"][t]["top1"])


def test_cli_group_option_is_checked(models, digits_small, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(evaluate, ["-t", digits_small, "--group", "A=" + models["a0"],
                                   "--out", str(tmp_path / "r")])
    assert bad.exit_code == 2 and "2 or more" in bad.output
    bad = runner.invoke(evaluate, [models["b"], "-t", digits_small, "--control", "nope",
                                   "--out", str(tmp_path / "r")])
    assert bad.exit_code == 2 and "nope" in bad.output


# ---------------------------------------------------------------------------------------------
# the content-keyed cache


def _bmp_folder(root, digits_small, offset):
    """A 2-class ImageFolder of BMPs (fixed size for a fixed image size) from real digits."""
    data = load_dataset(digits_small)
    paths, labels = data.paths("train"), data.labels("train")
    for cls in (0, 1):
        os.makedirs(root / f"c{cls}", exist_ok=True)
        picks = [p for p, y in zip(paths, labels) if y == cls][offset: offset + 6]
        for i, p in enumerate(picks):
            Image.open(p).convert("L").resize((16, 16)).save(root / f"c{cls}" / f"{i}.bmp")


def test_same_names_and_sizes_with_new_content_give_new_embeddings(models, digits_small,
                                                                   tmp_path):
    folder = tmp_path / "bmps"
    _bmp_folder(folder, digits_small, 0)
    files = sorted(folder.rglob("*.bmp"))
    before = {f: (f.stat().st_size, f.stat().st_mtime_ns) for f in files}
    kw = dict(cache_dir=str(tmp_path / "cache"), device="cpu", progress=False,
              probe_params={"C": 1.0})
    first = evaluate_models([models["a0"]], [str(folder)], None, **kw)
    again = evaluate_models([models["a0"]], [str(folder)], None, **kw)
    assert again["cache"] == {**first["cache"], "hits": 1, "misses": 0}
    cached = np.load(first["models"]["a0"]["targets"]["bmps"]["cache_file"])["train"]

    # other digits under the same names, same byte sizes, and the old modification times
    shutil.rmtree(folder)
    _bmp_folder(folder, digits_small, 6)
    for f, (size, mtime) in before.items():
        assert f.stat().st_size == size
        os.utime(f, ns=(mtime, mtime))
    changed = evaluate_models([models["a0"]], [str(folder)], None, **kw)
    assert changed["cache"]["misses"] == 1 and changed["cache"]["hits"] == 0
    fresh = np.load(changed["models"]["a0"]["targets"]["bmps"]["cache_file"])["train"]
    assert not np.allclose(fresh, cached)


def test_a_plan_gives_a_typed_report(models, digits_small, tmp_path):
    from common.errors import UserError
    from runtime.evaluation import EvaluationPlan, ModelResult, run_plan
    plan = EvaluationPlan([models["a0"], models["b"]], [digits_small], reference=models["b"],
                          cache_dir=str(tmp_path / "cache"), device="cpu", progress=False,
                          probe_params={"C": 1.0})
    report = run_plan(plan)
    assert isinstance(report.models["a0"], ModelResult) and report.reference == "b"
    assert report.models["b"].mnrg == pytest.approx(0.0)
    assert report.to_dict()["models"]["a0"]["mean"] == report.models["a0"].mean
    with pytest.raises(UserError, match=r"^evaluate: confidence must be a finite number in "
                                        r"\[0.5, 1\); got 1.5$"):
        run_plan(EvaluationPlan([models["a0"]], [digits_small], confidence=1.5))


def test_bad_options_fail_before_the_cache(models, digits_small, tmp_path):
    kw = dict(cache_dir=str(tmp_path / "cache"), progress=False, probe_params={"C": 1.0})
    evaluate_models([models["a0"]], [digits_small], None, device="cpu", **kw)   # fills the cache
    for bad in (dict(batch_size=0), dict(device="gpu0"), dict(threads=0), dict(seeds=0),
                dict(probe_params={"sweep": "quick"}), dict(probe_params={"bogus": 1})):
        with pytest.raises(EvaluationError):
            evaluate_models([models["a0"]], [digits_small], None,
                            **{**kw, "device": "cpu", **bad})


# ---------------------------------------------------------------------------------------------
# the fast sweep against the full one


@pytest.fixture(scope="module")
def digits_pixels():
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    train, test = stratified_split(y, 0.3, seed=1)
    return X[train], y[train], X[test], y[test]


def test_fast_sweep_on_all_rows_finds_an_equally_good_C(digits_pixels):
    """Without subsampling the fast sweep differs only by float32 products: its validation
    curve matches the full sweep's, so its chosen C is as good on validation (digits' curve is
    flat, so ties may fall on another C)."""
    X, y, Xt, yt = digits_pixels
    full = LogisticRegressionProbe(sweep="full").fit(X, y)
    fast = LogisticRegressionProbe(sweep_rows=None, n_jobs=1).fit(X, y)
    grid = [c for c in full.val_scores_ if c in fast.val_scores_]
    assert len(grid) >= 45
    assert max(abs(fast.val_scores_[c] - full.val_scores_[c]) for c in grid) <= 0.01
    assert fast.val_scores_[fast.C_] >= max(full.val_accuracies_) - 0.005
    assert abs(fast.score(Xt, yt) - full.score(Xt, yt)) <= 0.01


def test_fast_sweep_gives_the_full_sweeps_answer(digits_pixels):
    X, y, Xt, yt = digits_pixels
    full = LogisticRegressionProbe(sweep="full").fit(X, y)
    fast = LogisticRegressionProbe(sweep_rows=400, n_jobs=2).fit(X, y)
    assert len(fast.Cs_tried_) == len(full.Cs_tried_)
    # digits' validation curve is flat over decades of C, so the test accuracy is what must agree
    assert abs(fast.score(Xt, yt) - full.score(Xt, yt)) <= 0.015
    assert fast.score(Xt, yt) > 0.95


def test_sweep_options_are_checked(digits_pixels):
    X, y, _, _ = digits_pixels
    from runtime.probes import ProbeParameterError
    for bad, said in ((dict(sweep="fast"), "sweep must be one of 'full', 'subsample'; got 'fast'"),
                      (dict(sweep_rows=1), "sweep_rows must be an int in [2, inf) or None; got 1"),
                      (dict(n_jobs=0), "n_jobs must be an int in [1, inf) or None; got 0")):
        with pytest.raises(ProbeParameterError) as caught:
            LogisticRegressionProbe(**bad).fit(X, y)
        assert str(caught.value) == f"LogisticRegressionProbe: {said}"
