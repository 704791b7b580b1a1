"""The strong-backbones arm of the study (issue 21): its plan (native sizes, FSFT on an ImageNet
start, both size controls, seed-independent plain backbones), its per-model records (the
resumable state), the page section computed from records alone, and the FLOPs counter."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from study import strong, strong_page, strong_stages
from study.cost import model_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _opt(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("scale", ["small", "full"])
def test_plain_backbones_run_at_their_native_sizes(scale):
    steps = strong.strong_steps(scale, seed=0, replicate=0)
    for lite, size in strong.LITES.items():
        args = steps[f"s-{lite}"].args
        assert _opt(args, "--arch") == f"efficientnet_{lite}"
        assert _opt(args, "--input-size") == str(size) and "--pretrained" in args
        assert _opt(args, "--epochs") == "0"
    for run in ("s-fsft-emoji", "s-fsft-fashion"):
        args = steps[run].args
        assert _opt(args, "--method") == "fsft" and _opt(args, "--alpha") == "0.1"
        assert _opt(args, "--input-size") == "224"         # combines with plain Lite0
    # the FSFT starts are the ImageNet weights with one head per categorical level
    assert steps["s-fsft-emoji"].after == ["s-lite0"]
    assert steps["s-fsft-fashion"].after == ["s-lite0-fashion"]
    assert _opt(steps["s-lite0-fashion"].args, "--method") == "multilevel"
    assert "--pretrained" not in steps["s-random"].args


def test_replicates_rename_only_seeded_runs_and_move_their_seeds():
    r0, r2 = strong.strong_steps("small", 0, 0), strong.strong_steps("small", 0, 2)
    assert r2["s-lite2"].name == "s-lite2" and r2["s-lite0"].name == "s-lite0"
    assert r2["s-fsft-emoji"].name == "s-fsft-emoji-r2"
    assert r2["s-fsft-emoji"].after == ["s-lite0"]            # the shared ImageNet start
    assert int(_opt(r2["s-fsft-emoji"].args, "--seed")) == int(
        _opt(r0["s-fsft-emoji"].args, "--seed")) + 20
    assert _opt(r2["s-random"].args, "--seed") != _opt(r0["s-random"].args, "--seed")


def test_every_combined_recipe_meets_both_size_controls():
    labels = {r.id for r in strong.ROWS.values()}
    assert all(a in labels and c in labels for a, c in strong.PAIR_IDS)
    for recipe in strong.COMBINED_RECIPES:
        assert (recipe, strong.BIG) in strong.PAIR_IDS
        assert (recipe, strong.TWIN) in strong.PAIR_IDS
    assert not strong.ROWS["s-lite2"].seeded and strong.ROWS["s-plus-emoji"].seeded
    # the twin has the cost of plain Lite0 + one tuned Lite0
    assert len(strong.ROWS[strong.TWIN].runs) == len(strong.ROWS["s-plus-emoji"].runs)


def test_plan_only_lists_the_strong_arm():
    out = subprocess.run([sys.executable, "-m", "study", "--arm", "strong", "--scale", "small",
                          "--seeds", "3", "--plan-only"], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=120)
    plan = json.loads(out.stdout)
    assert {"s-fsft-emoji-r1", "s-fsft-emoji-r2", "s-random-r2"} <= set(plan["train"])
    assert "s-lite0-r1" not in plan["train"] and "s-lite2" in plan["train"]
    assert any(t.startswith("icons:theme=") for t in plan["counted"])
    assert not set(plan["counted"]) & set(plan["source_domain"])
    assert all(t.split(":")[0] != "fashion-mnist" for t in plan["counted"])


def test_taps_rows_export_from_the_imagenet_weights_at_native_sizes():
    row = strong.ROWS["s-lite2-taps"]
    assert row.runs == () and not row.seeded
    args = strong.export_args(row, "small")
    assert args[:3] == ["--arch", "efficientnet_lite2", "--pretrained"]
    assert _opt(args, "--input-size") == "260" and _opt(args, "--taps") == strong.TAPS
    assert ("s-lite2-taps", "s-lite2") in strong.PAIR_IDS


def test_needed_steps_put_dependencies_first():
    steps = strong_stages.needed_steps(strong.ROWS["s-plus-both"], "small", 0, 1)
    names = [s.name for s in steps]
    assert names == ["s-lite0", "s-fsft-emoji-r1", "s-lite0-fashion", "s-fsft-fashion-r1"]


def test_hits_survive_the_record():
    hits = np.array([True, False, True, True, False, False, True, False, True])
    assert strong_stages.hits_from_text(strong_stages._hits_to_text(hits)).tolist() == \
        hits.tolist()


COUNTED, SHOWN = ["digits", "icons"], ["fashion-mnist"]


def _record(row_id: str, replicate: int, top1: dict[str, float], n_test: int = 200) -> dict:
    """A record as run_member writes it, for a model whose hits give exactly `top1`."""
    row = strong.ROWS[row_id]
    targets, hits = {}, {}
    for t, acc in top1.items():
        k = int(round(acc * n_test))
        h = np.zeros(n_test, dtype=bool)
        h[:k] = True
        targets[t] = {"top1": k / n_test, "mean_per_class": k / n_test}
        hits[t] = strong_stages._hits_to_text(h)
    n = max(len(row.runs), 1)
    return {"key": {}, "row": row.label, "row_id": row_id, "replicate": replicate,
            "result": {"targets": targets, "embedding_dim": 1280 * n, "images_per_s": 50.0 / n},
            "hits": hits, "flops": int(0.77e9 * n), "params": 3_370_000 * n, "input_size": 224,
            "seconds": {"evaluate": 60.0}, "load_average": [2.0, 3.0]}


def _records(seeds: int, recipe_gain: float) -> dict:
    base = {"digits": 0.80, "icons": 0.60, "fashion-mnist": 0.70}
    out = {}
    for row_id, row in strong.ROWS.items():
        for r in range(seeds if row.seeded else 1):
            gain = {"s-lite2": 0.02, "s-random-twin": 0.01}.get(row_id, 0.0)
            if row_id in strong.COMBINED_RECIPES:
                gain = recipe_gain + 0.005 * r            # seed noise of the trained ones
            top1 = {t: min(v + gain, 1.0) for t, v in base.items()}
            out[strong.member_name(row, r)] = _record(row_id, r, top1)
    return out


def test_view_from_records_compares_recipes_with_both_size_controls():
    view = strong_page.arm_view(_records(3, 0.06), seeds=3, seed=0, n_counted=2)
    assert view["counted"] == COUNTED and view["shown"] == SHOWN
    # 3 plain backbones and their taps (one model each), 8 seeded rows with 3 replicates
    assert view["done"] == view["total"] == 3 + 3 + 8 * 3
    row = view["rows"]["S: Lite0 + FSFT emoji"]
    assert row["members"] == [f"S: Lite0 + FSFT emoji [r{r}]" for r in range(3)]
    assert row["mean"] == pytest.approx(0.70 + 0.06 + 0.005)
    assert row["interval"]["low"] < row["mean"] < row["interval"]["high"]
    assert row["gflops"] == pytest.approx(1.54)
    pairs = {(c["model"], c["control"]): c for c in view["comparisons"]}
    vs_big = pairs["S: Lite0 + FSFT emoji", "S: Lite2 plain"]
    assert vs_big["method"] == "t over members"
    assert 100 * vs_big["diff"] == pytest.approx(6.0 + 0.5 - 2.0)
    assert vs_big["significant"] and vs_big["low"] > 0
    # two single models: the paired bootstrap over test images
    assert pairs["S: Lite2 plain", "S: Lite0 plain"]["method"].startswith("paired bootstrap")
    text = "\n".join(strong_page.reading(view))
    assert "Met by: S: Lite0 + FSFT emoji" in text
    # the levels recipe beside Lite0 gains 6 points over the same tuning on the leaf level
    levels = pairs["S: Lite0 + FSFT fashion", "S control: Lite0 + FSFT fashion, leaf level only"]
    assert levels["significant"] and 100 * levels["diff"] == pytest.approx(6.5)
    assert ("S: Lite0 + FSFT fashion against S control: Lite0 + FSFT fashion, leaf level only: "
            "+6.5") in text and "the levels add beyond the noise" in text
    assert ("S: Lite0 FSFT fashion levels against S control: Lite0 FSFT fashion, leaf level "
            "only: +0.0") in text and "the levels' own share is within the noise" in text


def test_the_levels_control_differs_from_the_recipe_only_in_its_heads():
    """Same images, tuning options and seeds; the start has one head on the leaf labels."""
    for replicate in (0, 2):
        steps = strong.strong_steps("small", 0, replicate)
        levels, flat = steps["s-fsft-fashion"], steps["s-fsft-fashion-flat"]
        assert (levels.args, levels.data) == (flat.args, flat.data)
        start, flat_start = steps["s-lite0-fashion"], steps["s-lite0-fashion-flat"]
        assert _opt(start.args, "--method") == "multilevel"
        assert _opt(flat_start.args, "--method") == "specific"
        drop = lambda a: [x for x in a if x not in ("multilevel", "specific")]
        assert drop(start.args) == drop(flat_start.args) and start.data == flat_start.data
        assert flat.after == [flat_start.name] and flat_start.name == "s-lite0-fashion-flat"
    assert ("s-plus-fashion", "s-plus-fashion-flat") in strong.PAIR_IDS
    assert strong.ROWS["s-plus-fashion-flat"].runs == ("s-lite0", "s-fsft-fashion-flat")


def test_a_recipe_within_the_noise_does_not_meet_the_floor():
    view = strong_page.arm_view(_records(3, 0.02), seeds=3, seed=0, n_counted=2)
    text = "\n".join(strong_page.reading(view))
    assert "Not met" in text and "Met by" not in text


def test_a_partial_run_marks_its_comparisons_provisional(tmp_path):
    records = {n: r for n, r in _records(3, 0.06).items() if "[r2]" not in n}
    view = strong_page.arm_view(records, seeds=3, seed=0, n_counted=2)
    assert view["done"] < view["total"]
    assert view["rows"]["S: Lite0 + FSFT emoji"]["members"] == [
        "S: Lite0 + FSFT emoji [r0]", "S: Lite0 + FSFT emoji [r1]"]
    compared = {(c["model"], c["control"]): c for c in view["comparisons"]}
    assert compared["S: Lite2 plain", "S: Lite0 plain"]["complete"]
    provisional = compared["S: Lite0 + FSFT emoji", "S: Lite2 plain"]
    assert not provisional["complete"] and provisional["replicates"] == "2/3 vs 1/1"
    assert "provisional on 2/3 replicate(s)" in "\n".join(strong_page.reading(view))
    meta = dict(command="python -m study --arm strong", date="d", machine="m", scale="small",
                seeds=3, records="docs/study-records/strong-small", minutes=1.0, train=0.0,
                export=0.0, evaluate=1.0, load_low=2.0, load_high=3.0, cores=2, sizes="s",
                reinit=1, alpha=0.1, epochs=2, emoji="e", emoji_per_class=2, fashion="f",
                counted="c", shown="s", max_per_class=40)
    text = strong_page.section(view, meta, "results-strong.png", None)
    assert "**Partial results**" in text and "Not decided yet" in text
    page = tmp_path / "results.md"
    page.write_text("# The page\n\nthe reproduction arms\n")
    strong_page.insert_section(str(page), text)
    strong_page.insert_section(str(page), text.replace("Partial", "PARTIAL"))
    final = page.read_text()
    assert final.startswith("# The page\n\nthe reproduction arms\n")
    assert final.count(strong_page.prose.BEGIN) == final.count(strong_page.prose.END) == 1
    assert "PARTIAL" in final and "Partial" not in final


def test_a_record_of_another_plan_is_not_reused(tmp_path):
    row = strong.ROWS["s-lite2"]
    key = strong_stages.plan_key(row, "small", 0, 0)
    name = strong.member_name(row, 0)
    record = {**_record("s-lite2", 0, {"digits": 0.5}), "key": key}
    path = strong_stages.record_path(str(tmp_path), name)
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump(record, f)
    assert strong_stages.load_record(str(tmp_path), name, key)["row_id"] == "s-lite2"
    other = strong_stages.plan_key(row, "full", 0, 0)
    assert strong_stages.load_record(str(tmp_path), name, other) is None
    assert list(strong_stages.load_records(str(tmp_path))) == [name]


def test_flops_count_convolutions_and_matrix_products(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    dw = numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "dw")   # depthwise
    fc = numpy_helper.from_array(np.ones((4, 5), np.float32), "fc")
    nodes = [helper.make_node("Conv", ["image", "w"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "dw"], ["b"], pads=[1, 1, 1, 1], group=4),
             helper.make_node("GlobalAveragePool", ["b"], ["c"]),
             helper.make_node("Flatten", ["c"], ["d"]),
             helper.make_node("MatMul", ["d", "fc"], ["embedding"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                   ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 5])],
        initializer=[w, dw, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "model.onnx"))
    expected = 2 * (4 * 8 * 8 * 3 * 3 * 3) + 2 * (4 * 8 * 8 * 1 * 3 * 3) + 2 * (5 * 4)
    assert model_flops(str(tmp_path)) == expected


def test_page_only_writes_the_section_from_committed_records(tmp_path):
    """A later session with the records alone (no models, no work folder) rewrites the page."""
    records = tmp_path / "records"
    for name, record in _records(3, 0.06).items():
        path = strong_stages.record_path(str(records), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(record, f)
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text("# Reproduction study\n")
    subprocess.run([sys.executable, "-m", "study", "--arm", "strong", "--scale", "small",
                    "--seeds", "3", "--page-only", "--records", str(records), "--page",
                    str(page), "--work", str(tmp_path / "work")],
                   cwd=ROOT, check=True, timeout=300, capture_output=True)
    text = page.read_text()
    assert text.startswith("# Reproduction study\n") and "Partial results" not in text
    assert "| S: Lite0 + FSFT emoji | 3/3 | 224 | 2560 |" in text
    assert "| 76.5 [" in text                     # held-out mean 0.70 + 0.06 + 0.005
    assert "Met by: S: Lite0 + FSFT emoji" in text
    assert (tmp_path / "docs" / "results-strong.png").stat().st_size > 1000
    assert not (tmp_path / "work" / "models").exists()


def test_speed_stage_photos_are_real_jpegs_of_imagenet_size():
    from PIL import Image

    from study.strong_speed import photo_corpus
    photos = photo_corpus(4)
    assert len(photos) == 4 and len(set(photos)) == 4
    for data in photos:
        img = Image.open(__import__("io").BytesIO(data))
        assert img.format == "JPEG" and img.size == (500, 375)


def test_speed_stage_times_every_model_again_when_one_is_new(exported_model, fmnist_small,
                                                             tmp_path):
    """Throughput figures compare only within one interleaved session: unchanged models are
    not timed again, and one new or re-exported model re-times them all, together."""
    import shutil

    from study.strong_speed import measure_speeds
    models = {}
    for name in ("a", "b"):
        models[name] = str(tmp_path / name)
        shutil.copytree(exported_model(fmnist_small), models[name])
    first = measure_speeds(models, str(tmp_path), threads=1, device="cpu", n_images=8,
                           rounds=1)
    assert set(first) == {"a", "b"} and first["a"]["session"] == first["b"]["session"]
    assert all(v["images_per_s"] > 0 and len(v["rounds"]) == 1 for v in first.values())
    again = measure_speeds(models, str(tmp_path), threads=1, device="cpu", n_images=8, rounds=1)
    assert again == first                                        # nothing timed again
    onnx = os.path.join(models["b"], "model.onnx")
    os.utime(onnx, (os.path.getatime(onnx), os.path.getmtime(onnx) + 10))   # b re-exported
    third = measure_speeds(models, str(tmp_path), threads=1, device="cpu", n_images=8, rounds=1)
    assert third["a"]["session"] == third["b"]["session"] != first["a"]["session"]
    with open(tmp_path / "speed.json") as f:
        assert json.load(f) == third
