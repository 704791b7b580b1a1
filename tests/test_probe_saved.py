"""Probes from saved embeddings, probe diagnostics and the easy path of save_probe:
`probe fit --embeddings` equals `probe fit` on the images, `probe predict` on a labelled folder
prints the accuracy and writes the per-class report and the confusion matrix, and a probe saved
as the README's library example does is labelled with class names by `serve`."""
import json
import os
import warnings

import numpy as np
import pytest

from runtime.probes.diagnostics import classification_report, confusion_matrix, write_report
from runtime.probes.labels import LabelError, folder_class, read_label_csv
from tests.conftest import run_cli

_cli = run_cli


def test_confusion_matrix_and_report_of_a_known_case(tmp_path):
    classes = ["bolt", "nut", "washer"]
    true = ["bolt"] * 4 + ["nut"] * 3 + ["washer"] * 2 + ["screw"]
    pred = ["bolt", "bolt", "bolt", "nut", "nut", "nut", "bolt", "washer", "nut", "bolt"]
    matrix, rows = confusion_matrix(true, pred, classes)
    assert rows == ["bolt", "nut", "washer", "screw"]  # an unknown true label gets its own row
    assert matrix.tolist() == [[3, 1, 0], [1, 2, 0], [0, 1, 1], [1, 0, 0]]
    report = classification_report(true, pred, classes)
    assert report["images"] == 10 and report["correct"] == 6 and report["accuracy"] == 0.6
    bolt, nut, washer = (report["per_class"][c] for c in classes)
    assert (bolt["precision"], bolt["recall"], bolt["support"]) == (0.6, 0.75, 4)
    assert nut["precision"] == 0.5 and nut["recall"] == pytest.approx(2 / 3, abs=1e-6)
    assert (washer["precision"], washer["recall"]) == (1.0, 0.5)
    assert bolt["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35, abs=1e-6)
    assert report["macro"]["recall"] == pytest.approx((0.75 + 2 / 3 + 0.5) / 3, abs=1e-6)
    assert report["unknown_true_labels"] == ["screw"]
    assert report["top_confusions"][0] == {"true": "bolt", "predicted": "nut", "count": 1}
    written = write_report(report, str(tmp_path / "r"), title="parts")
    with open(tmp_path / "r" / "confusion.json") as f:
        assert json.load(f)["matrix"] == matrix.tolist()
    if any(w.endswith(".png") for w in written):
        with open(tmp_path / "r" / "confusion.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_labels_from_csv_and_from_folders(tmp_path):
    (tmp_path / "l.csv").write_text("label,id\nbolt,a/1.png\nnut,b/2.png\n")
    assert read_label_csv(str(tmp_path / "l.csv")) == {"a/1.png": "bolt", "b/2.png": "nut"}
    (tmp_path / "bare.csv").write_text("x.png,bolt\ny.png,nut\n")
    assert read_label_csv(str(tmp_path / "bare.csv")) == {"x.png": "bolt", "y.png": "nut"}
    (tmp_path / "bad.csv").write_text("x.png,bolt\nx.png,nut\n")
    with pytest.raises(LabelError, match="labelled both"):
        read_label_csv(str(tmp_path / "bad.csv"))
    classes = ["footwear/sandal", "sandal", "bag/bag"]
    assert folder_class("/d/test/footwear/sandal/x.png", classes) == "footwear/sandal"
    assert folder_class("photos/sandal/x.png", classes) == "sandal"
    assert folder_class("photos/other/x.png", classes) is None


def test_save_probe_records_the_model_and_class_names(tmp_path, digits_small):
    from common.data import load_dataset
    from runtime import LogisticRegressionProbe, load_probe, save_probe
    data = load_dataset(digits_small)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(len(data.paths("train")), 16)) + data.labels("train")[:, None]
    probe = LogisticRegressionProbe(C=1.0).fit(X, data.labels("train"))
    description = {"architecture": "toy", "feature_dim": 16, "preprocessing": {"input_size": 8},
                   "levels": [{"name": "digit", "classes": data.leaf_classes}]}
    save_probe(probe, str(tmp_path / "p"), model=description, class_names=data.leaf_classes)
    loaded = load_probe(str(tmp_path / "p"))
    assert list(loaded.classes_) == data.leaf_classes and loaded.classes_.dtype.kind == "U"
    assert loaded.metadata_["architecture"] == "toy" and len(loaded.metadata_["model_fingerprint"]) == 16
    with pytest.warns(UserWarning, match="no model fingerprint"):
        save_probe(probe, str(tmp_path / "q"))
    with pytest.raises(ValueError, match="class_names has 3 names"):
        save_probe(probe, str(tmp_path / "r"), model=description, class_names=["a", "b", "c"])


# ---------------------------------------------------------------------------------------------
# on a real exported model


@pytest.fixture(scope="module")
def setup(exported_model, fmnist_small, tmp_path_factory):
    """(model, a Parquet output and a .npy output of the whole data set, a probe folder fitted
    on the images, the work folder)."""
    pytest.importorskip("pyarrow")
    model = exported_model(fmnist_small)
    base = tmp_path_factory.mktemp("probe-saved")
    _cli("embed", model, fmnist_small, "--out", str(base / "feats"), "--device", "cpu",
         "--shard-size", "128")
    _cli("embed", model, os.path.join(fmnist_small, "train"), "--out", str(base / "train.npy"),
         "--device", "cpu")
    _cli("probe", "fit", model, "--data", fmnist_small, "--out", str(base / "from-images"),
         "--device", "cpu")
    return model, str(base / "feats"), str(base / "train.npy"), str(base / "from-images"), base


def _probe_state(folder):
    with open(os.path.join(folder, "probe.json")) as f:
        doc = json.load(f)
    with np.load(os.path.join(folder, "probe.npz"), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return doc, arrays


def test_probe_fit_from_parquet_equals_probe_fit_from_images(setup, fmnist_small):
    model, feats, _, from_images, base = setup
    out = _cli("probe", "fit", model, "--embeddings", feats, "--data", fmnist_small,
               "--out", str(base / "from-parquet"))
    assert "test accuracy" in out.stdout
    doc_images, arrays_images = _probe_state(from_images)
    doc_saved, arrays_saved = _probe_state(str(base / "from-parquet"))
    assert doc_saved["classes"] == doc_images["classes"]
    assert doc_saved["state"] == doc_images["state"]
    for key in ("model_fingerprint", "n_train", "level", "C", "train_accuracy",
                "test_accuracy"):
        assert doc_saved["metadata"][key] == doc_images["metadata"][key], key
    for name, values in arrays_images.items():
        np.testing.assert_allclose(arrays_saved[name], values, rtol=1e-6, atol=1e-7)


def test_probe_fit_from_npy_with_folder_or_csv_labels(setup, exported_model, fmnist_small):
    model, _, npy, _, base = setup
    _cli("probe", "fit", model, "--embeddings", npy, "--out", str(base / "by-folder"),
         "--kind", "ncm")
    doc, _ = _probe_state(str(base / "by-folder"))
    assert doc["classes"] == sorted({"bag", "trouser", "dress", "ankle-boot", "sandal",
                                     "sneaker", "coat", "pullover", "shirt", "t-shirt"})
    with open(npy[:-4] + ".ids.json") as f:
        ids = json.load(f)
    # a CSV labelling only two classes: the other rows are left out
    rows = [(i, "footwear" if "/footwear/" in i else "bag") for i in ids
            if "/footwear/" in i or "/bag/" in i]
    (base / "labels.csv").write_text("id,label\n" + "".join(f"{i},{lab}\n" for i, lab in rows))
    out = _cli("probe", "fit", model, "--embeddings", npy, "--labels", str(base / "labels.csv"),
               "--out", str(base / "by-csv"), "--kind", "ncm")
    assert f"{len(rows)} for training" in out.stderr
    assert _probe_state(str(base / "by-csv"))[0]["classes"] == ["bag", "footwear"]
    other = exported_model(fmnist_small, name="other", seed=3)
    refused = _cli("probe", "fit", other, "--embeddings", npy, "--out", str(base / "x"),
                   check=False)
    assert refused.returncode == 2 and "embedded by another model" in refused.stderr


def test_probe_predict_on_a_labelled_folder_reports_accuracy_and_confusions(setup,
                                                                            fmnist_small):
    model, _, _, probe_dir, base = setup
    test_folder = os.path.join(fmnist_small, "test")
    out = _cli("probe", "predict", model, probe_dir, test_folder, "--out",
               str(base / "preds.jsonl"), "--device", "cpu")
    with open(base / "preds.report" / "report.json") as f:
        report = json.load(f)
    with open(base / "preds.jsonl") as f:
        preds = [json.loads(line) for line in f]
    with open(os.path.join(probe_dir, "probe.json")) as f:
        probe_doc = json.load(f)
    classes = probe_doc["classes"]
    truth = [folder_class(p["id"], classes) for p in preds]
    accuracy = np.mean([p["label"] == t for p, t in zip(preds, truth)])
    assert report["images"] == len(preds) == 200
    assert report["accuracy"] == pytest.approx(accuracy)
    # the same images and probe as fit's test side: the same accuracy
    assert report["accuracy"] == pytest.approx(probe_doc["metadata"]["test_accuracy"])
    assert f"accuracy {accuracy:.4f} on 200 labelled images" in out.stdout
    assert sum(map(sum, report["confusion"]["matrix"])) == 200
    assert report["confusion"]["columns_predicted"] == classes
    assert os.path.isfile(base / "preds.report" / "confusion.png")


def test_the_readme_probe_is_labelled_with_class_names_by_serve(setup, fmnist_small, tmp_path):
    import httpx

    from common.data import load_dataset
    from runtime import FeaturePipeline, LogisticRegressionProbe, save_probe
    from tests.test_serve import running_server
    model = setup[0]
    data = load_dataset(fmnist_small)
    with FeaturePipeline(model, device="cpu", batch_size=64) as pipe:   # as the README does
        train = pipe.embed(data.paths("train"))
        probe = LogisticRegressionProbe().fit(train.vectors[train.ok],
                                              data.labels("train")[train.ok])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the easy path warns of nothing
            save_probe(probe, str(tmp_path / "fm"), model=pipe, class_names=data.leaf_classes)
    images = data.paths("test")[:6]
    files = [("image", (os.path.basename(p), open(p, "rb").read(), "image/png")) for p in images]
    with running_server(model, "--probe", f"fm={tmp_path / 'fm'}") as (port, _):
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embed", files=files, timeout=60)
    assert r.status_code == 200, r.text
    labels = [row["probes"]["fm"]["label"] for row in r.json()["results"]]
    assert set(labels) <= set(data.leaf_classes) and all("/" in lab for lab in labels)
    from runtime import load_probe
    from runtime.probes import description_fingerprint
    saved = load_probe(str(tmp_path / "fm"))  # it proves its backbone: served without a warning
    assert saved.metadata_["model_fingerprint"] == description_fingerprint(pipe.description_)
    assert saved.metadata_["model_dir"] == os.path.abspath(model)
