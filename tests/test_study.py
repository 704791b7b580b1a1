"""The reproduction study script: its plan covers the issue's networks, controls and targets,
and the cross-style emoji target is a real flat ImageFolder labelled by subcategory."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from common.data import load_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import study  # noqa: E402


@pytest.mark.parametrize("scale", ["pilot", "small", "full"])
def test_plan_lists_every_network_control_and_target(scale):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "study.py"), "--scale",
                          scale, "--plan-only"], capture_output=True, text=True, check=True)
    plan = json.loads(out.stdout)
    runs = {t["name"]: t["args"] for t in plan["train"]}
    methods = {a[a.index("--method") + 1] for a in runs.values() if "--method" in a}
    assert methods == {"specific", "generic", "multilevel", "finer", "fsft"}
    assert {a[a.index("--level") + 1] for a in runs.values() if "--level" in a} == {
        "subcategory", "category"}
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
    root = study.emoji_style_target("subcategory", str(tmp_path / "tw-sub"))
    target = load_dataset(root)
    source = load_dataset("emoji:styles=twitter")
    assert len(target.levels) == 1
    assert 90 <= len(target.leaf_classes) <= 110            # the 99 subcategories (+/- styles)
    labels = target.labels(next(iter(target.splits)))
    assert len(labels) == len(source.paths(next(iter(source.splits))))
    assert np.bincount(labels).max() > 20                   # several images per class
    assert all("--" in c for c in target.leaf_classes)      # category--subcategory
    assert study.emoji_style_target("subcategory", root) == root   # built once


def test_seeded_plan_has_replicates_the_lite0_arm_and_known_pairs():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "study.py"), "--scale",
                          "smoke", "--seeds", "2", "--plan-only"], capture_output=True, text=True,
                         check=True)
    plan = json.loads(out.stdout)
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
    view = study.page_view(report, ["ref", "G"], "ref")
    assert set(view["models"]) == {"ref", "G"}
    assert view["models"]["G"]["targets"]["x"]["top1"] == pytest.approx(0.8)
    assert view["models"]["G"]["mean"] == pytest.approx(0.8)
    # mNRG of G vs ref: median of (80-50)/50 and (80-60)/40 = median(0.6, 0.5) x 100
    assert view["models"]["G"]["mnrg"] == pytest.approx(55.0)
