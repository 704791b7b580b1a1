"""The reproduction study (`python -m study`): its plan covers the issue's networks, controls and
targets, the cross-style emoji target is the built-in emoji data labelled by subcategory, and
the page is the same for the same records."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from common.data import load_dataset
from study import page as study_page
from study import plan as study
from study import stages, views
from study.plots import plot_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "study")


def _plan_json(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "study", *args, "--plan-only"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


@pytest.mark.parametrize("scale", ["pilot", "small", "full"])
def test_plan_lists_every_network_control_and_target(scale):
    plan = _plan_json("--scale", scale)
    runs = {t["name"]: t["args"] for t in plan["train"]}
    methods = {a[a.index("--method") + 1] for a in runs.values() if "--method" in a}
    assert methods == {"specific", "generic", "multilevel", "finer", "fsft"}
    assert {a[a.index("--level") + 1] for n, a in runs.items()
            if "--level" in a and not n.startswith("fashion")} == {"subcategory", "category"}
    assert runs["random"][runs["random"].index("--epochs") + 1] == "0"
    assert "--pretrained" in runs["efficientnet-lite0"]
    # the two-seed control has as many networks as MuCaLe-Net, the three-seed one as MulDiP
    combos = plan["combinations"]
    assert len(combos["control: 2 seeds (spe+spe)"]) == len(combos["MuCaLe-Net (spe+sub)"])
    assert len(combos["control: 3 seeds (spe x3)"]) == len(combos["MulDiP-Net (spe+sub+cat)"])
    assert {"SpeFiNet (spe+finer)", "control: spe+random twin"} <= set(combos)
    # every run a combination uses is trained, and a run is trained before one that needs it
    order = [t["name"] for t in plan["train"]]
    assert all(p in runs for parts in combos.values() for p in parts)
    assert all(order.index(a) < order.index(t["name"]) for t in plan["train"] for a in t["after"])
    seeds = [runs[n][runs[n].index("--seed") + 1] for n in ("specific", "specific-seed1",
                                                             "specific-seed2")]
    assert len(set(seeds)) == 3
    if scale != "pilot":
        assert {"mnist", "digits", "emoji-twitter-subcategory"} <= set(plan["targets"])
        assert any(t.startswith("fashion-mnist") for t in plan["targets"])
    assert "twitter" not in plan["source"]  # the cross-style target is never trained on


def test_twitter_target_is_labelled_by_subcategory(tmp_path):
    assert study.STYLE_TARGETS["emoji-twitter-subcategory"] == "emoji:styles=twitter,label=subcategory"
    root = stages.resolve_target("emoji-twitter-subcategory", str(tmp_path))
    assert root == str(tmp_path / "targets" / "emoji-twitter-subcategory")  # the page's name
    target = load_dataset(root)
    source = load_dataset("emoji:styles=twitter")
    assert len(target.levels) == 1
    assert 90 <= len(target.leaf_classes) <= 110            # the 99 subcategories (+/- styles)
    labels = target.labels(next(iter(target.splits)))
    assert len(labels) == len(source.paths(next(iter(source.splits))))
    assert np.bincount(labels).max() > 20                   # several images per class
    assert all("--" in c for c in target.leaf_classes)      # category--subcategory
    # the files of a folder an older study built: category--subcategory/emoji--style.png
    rel = os.path.relpath(target.paths(next(iter(target.splits)))[0], root)
    assert rel.count(os.sep) == 1 and rel.endswith("--twitter.png")
    assert stages.resolve_target("emoji-twitter-subcategory", str(tmp_path)) == root   # reused
    assert stages.resolve_target("digits", str(tmp_path)) == "digits"    # other specs as given


def test_seeded_plan_has_replicates_the_lite0_arm_and_known_pairs():
    plan = _plan_json("--scale", "smoke", "--seeds", "2")
    runs = {t["name"]: t["args"] for t in plan["train"]}
    # the specific networks (replicates and the seed controls) all have their own seed
    seeds = [a[a.index("--seed") + 1] for n, a in runs.items() if n.startswith("specific")]
    assert len(seeds) == 6 and len(set(seeds)) == 6
    assert {"specific", "specific-r1", "lite0-fsft", "lite0-fsft-r1"} <= set(runs)
    assert "efficientnet-lite0-r1" not in runs             # ImageNet weights: seed-independent
    assert [t["after"] for t in plan["train"] if t["name"] == "fsft-r1"] == [["specific-r1"]]
    assert "--pretrained" in runs["lite0-multilevel"] and "--pretrained" not in runs["lite0-random"]
    sizes = {a[a.index("--input-size") + 1] for n, a in runs.items()
             if "lite0" in n and "--input-size" in a}
    assert len(sizes) == 1                                 # the arm's networks combine
    rows = set(plan["singles"].values()) | set(plan["combinations"])
    assert all(a in rows and c in rows for a, c in plan["pairs"])
    assert "--finer-mode" in plan["finer_check"]


def test_page_view_turns_groups_into_mean_rows():
    def model(accs):
        return {"embedding_dim": 8, "images_per_s": 100.0,
                "targets": {t: {"top1": a, "mean_per_class": a} for t, a in accs.items()}}
    report = {"models": {"ref": model({"x": 0.5, "y": 0.6}),
                         "G[0]": model({"x": 0.7, "y": 0.8}), "G[1]": model({"x": 0.9, "y": 0.8})},
              "groups": {"G": {"members": ["G[0]", "G[1]"]}}, "comparisons": []}
    view = views.page_view(report, ["ref", "G"], "ref")
    assert set(view["models"]) == {"ref", "G"}
    assert view["models"]["G"]["targets"]["x"]["top1"] == pytest.approx(0.8)
    assert view["models"]["G"]["mean"] == pytest.approx(0.8)
    # mNRG of G vs ref: median of (80-50)/50 and (80-60)/40 = median(0.6, 0.5) x 100
    assert view["models"]["G"]["mnrg"] == pytest.approx(55.0)


# What RUN_DIR/study_args.json holds for `specific` at `small` (the data spec, then the options,
# as before the Fashion-MNIST arm): a finished run is reused only when its record is the same.
SPECIFIC_SMALL_RECORD = ["emoji:styles=google,skin=5", "--method", "specific", "--input-size",
                         "48", "--arch-kwargs", "width=32", "--epochs", "8", "--seed", "0",
                         "--augment", "strong"]


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_fashion_arm_is_planned_and_the_emoji_records_are_unchanged():
    steps = {t.name: t for t in study.training_plan("small", seed=0, replicate=1)}
    first = {t.name: t for t in study.training_plan("small", seed=0)}
    assert first["specific"].record() == SPECIFIC_SMALL_RECORD
    assert all(t.data == study.SOURCE for n, t in first.items() if not n.startswith("fashion"))
    fashion = {n: t for n, t in first.items() if n.startswith("fashion")}
    assert set(fashion) == {"fashion-specific", "fashion-generic", "fashion-multilevel",
                            "fashion-finer", "fashion-specific-seed1", "fashion-random"}
    assert {t.data for t in fashion.values()} == {"fashion-mnist:per_class=200"}
    for t in fashion.values():           # the small CNN at the scale's size; default augmentation
        assert _option(t.args, "--input-size") == "48" and "--augment" not in t.args
        assert t.record() == ["fashion-mnist:per_class=200"] + t.args + t.after
    assert _option(fashion["fashion-generic"].args, "--level") == "generic"
    assert _option(fashion["fashion-multilevel"].args, "--method") == "multilevel"
    finer = fashion["fashion-finer"]
    assert (_option(finer.args, "--finer-mode"), _option(finer.args, "--finer-min-size")) == (
        "auto", "20")
    assert finer.after == ["fashion-specific"]
    assert _option(fashion["fashion-random"].args, "--epochs") == "0"
    assert _option(fashion["fashion-specific"].args, "--epochs") == "5"
    # replicate 1: suffixed names, seeds from 10, --from the replicate's own Net-S
    assert steps["fashion-finer-r1"].after == ["fashion-specific-r1"]
    assert _option(steps["fashion-specific-r1"].args, "--seed") == "10"
    assert _option(steps["fashion-specific-seed1-r1"].args, "--seed") == "11"
    assert not any(n.startswith("fashion") and not n.endswith("-r1") for n in steps)
    # the page's F rows and pairs refer to planned runs and known rows
    f_rows = {n for n in [*study.SINGLES.values(), *study.COMBINATIONS] if study.in_fashion_arm(n)}
    assert len(f_rows) == 10 and study.FASHION_REFERENCE_NAME in f_rows
    assert all(p in fashion for n, parts in study.COMBINATIONS.items() if study.in_fashion_arm(n)
               for p in parts)
    f_pairs = [p for p in study.PAIRS if study.in_fashion_arm(p[0])]
    assert all(study.in_fashion_arm(c) and c in f_rows for _, c in f_pairs) and len(f_pairs) == 7
    assert study.is_fashion_source_domain("fashion-mnist:per_class=100")
    assert not study.is_fashion_source_domain("emoji-twitter-category")


@pytest.mark.parametrize("scale,per_class,epochs", [("smoke", 10, 1), ("pilot", 20, 1),
                                                    ("small", 200, 5), ("full", 500, 10)])
def test_fashion_scale_settings(scale, per_class, epochs):
    plan = study.study_plan(scale, seeds=1)
    runs = {t["name"]: t for t in plan["train"]}
    assert plan["fashion_source"] == runs["fashion-specific"]["data"] == (
        f"fashion-mnist:per_class={per_class}")
    assert _option(runs["fashion-specific"]["args"], "--epochs") == str(epochs)
    # every cluster FiNet keeps has at least min_size images: two of them must fit in a class
    assert 2 * int(_option(runs["fashion-finer"]["args"], "--finer-min-size")) <= per_class


def test_fashion_view_counts_every_target_but_its_source_domain():
    def model(accs):
        return {"embedding_dim": 8, "images_per_s": 100.0,
                "targets": {t: {"top1": a, "mean_per_class": a} for t, a in accs.items()}}

    def comparison(diff, targets):
        d = {"diff": diff, "low": diff - 0.01, "high": diff + 0.01, "n": 1,
             "method": "paired bootstrap", "significant": True}
        return {"model": "F: FiNet (finer)", "control": "F: Net-S specific",
                "targets": {t: d for t in targets}, "mean": d}
    fm = "fashion-mnist:per_class=100"
    counted = {"models": {"F: Net-S specific": model({"x": 0.5, "y": 0.6}),
                          "F: FiNet (finer)": model({"x": 0.75, "y": 0.8})},
               "groups": {}, "comparisons": [comparison(0.25, ["x", "y"])],
               "targets": {"x": {}, "y": {}}}
    source = {"models": {"F: Net-S specific": model({fm: 0.9}),
                         "F: FiNet (finer)": model({fm: 0.1})},
              "groups": {}, "comparisons": [comparison(-0.8, [fm])], "targets": {fm: {}}}
    merged = views.merge_target_reports(counted, source, [fm, "x", "y"])
    assert list(merged["targets"]) == [fm, "x", "y"]
    assert list(merged["models"]["F: FiNet (finer)"]["targets"]) == [fm, "x", "y"]
    assert merged["comparisons"][0]["targets"][fm]["diff"] == -0.8
    assert merged["comparisons"][0]["mean"]["diff"] == 0.25        # the counted targets' mean
    view = views.page_view(merged, ["F: Net-S specific", "F: FiNet (finer)"],
                           "F: Net-S specific", counted=["x", "y"])
    finer = view["models"]["F: FiNet (finer)"]
    # fashion-mnist (0.1 against 0.9) would pull both down; over x and y only:
    assert finer["mean"] == pytest.approx(0.775)
    assert finer["mnrg"] == pytest.approx(100 * np.median([0.25 / 0.5, 0.2 / 0.4]))
    vs = views.aggregate_counted(view["models"], "F: Net-S specific", ["x", "y"])
    table = study_page.results_table(view["models"], [fm, "x", "y"], ["x", "y"], vs, {})
    assert f"| {fm} (source domain, not counted) | x | y |" in table[0]
    assert table[3].startswith("| F: FiNet (finer) | 8 | 0.00M | 10.0 | 75.0 | 80.0 | 77.5 |")


def test_a_finished_emoji_run_is_reused_and_a_changed_one_refused(tmp_path):
    import click
    specific = next(t for t in study.training_plan("small") if t.name == "specific")
    run = tmp_path / "specific"
    run.mkdir()
    (run / "study_args.json").write_text(json.dumps(SPECIFIC_SMALL_RECORD))
    (run / "model.pt").write_bytes(b"")          # finished: train_run must not start training
    assert stages.train_run(specific, str(run), threads=1) is False
    (run / "study_args.json").write_text(json.dumps(SPECIFIC_SMALL_RECORD[:-1] + ["standard"]))
    with pytest.raises(click.ClickException, match="other options"):
        stages.train_run(specific, str(run), threads=1)


def test_the_page_is_the_same_for_the_same_records(tmp_path):
    """records.json: synthetic evaluation records (every row, 2 replicates, the F arm's source
    domain apart); page.md: what scripts/study.py wrote for them before the study became a
    package. The page must not change while only the code around it moves."""
    with open(os.path.join(FIXTURES, "records.json")) as f:
        records = json.load(f)
    with open(os.path.join(FIXTURES, "page.md")) as f:
        expected = f.read()
    rows = {arm: [r.label for r in study.ROWS.values() if r.arm == arm]
            for arm in ("emoji", "fashion")}
    text, page_views = study_page.build_page(records, rows, "results.png")
    assert text == expected
    with_reading, _ = study_page.build_page(records, rows, "results.png", reading="Read me.\n")
    assert with_reading.replace("Read me.\n\n", "", 1) == expected
    assert with_reading.index("Read me.") < with_reading.index("## Discussion (generated")
    png = tmp_path / "results.png"
    plot_results(page_views["report"], str(png))
    from PIL import Image
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 600


def test_rows_pairs_and_claims_refer_to_known_rows():
    assert set(study.BY_LABEL) == set(study.SINGLES.values()) | set(study.COMBINATIONS)
    assert all(a in study.ROWS and c in study.ROWS for a, c in study.PAIR_IDS)
    assert all(r.runs[0] == r.id for r in study.ROWS.values() if r.single)
    claimed = [row for _, _, row, _ in study_page.PAPER_CLAIMS]
    claimed += [r for r, c, _ in study_page.SIZE_CLAIMS] + [c for _, c, _ in study_page.SIZE_CLAIMS]
    assert all(r in study.ROWS for r in claimed)
