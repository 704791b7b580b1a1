"""The training loop and `train` command on small real data (Fashion-MNIST, tiny inputs)."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.description import ModelDescription
from common.images import ImageDecodeError, preprocess
from tests.conftest import ROOT
from train.loop import CHECKPOINT, TrainConfig, prepare, train
from train.models import load_run
from train.runs import untrained_run

pytestmark = pytest.mark.slow  # every test trains (or starts the CLI)

TINY = dict(input_size=16, arch_kwargs={"width": 4, "feature_dim": 32}, batch_size=32,
            warmup_epochs=0.0)
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture(autouse=True)
def one_thread():
    """2 shared cores: one intra-op thread avoids OpenMP spin contention (and is deterministic)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cfg(data, out, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), **{"epochs": 1, **TINY, **kw})


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), "train", *map(str, args)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def state(run_dir):
    return torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)


# ---------------------------------------------------------------------------------------------
# Methods

def test_specific_cli_on_nested_folder(nested_folder, tmp_path):
    out = tmp_path / "spe"
    proc = cli("--data", nested_folder, "--out", out, "--epochs", 2, "--input-size", 16,
               "--arch-kwargs", "width=4,feature_dim=32", "--batch-size", 32, "--lr", 0.1)
    assert "epoch 2/2" in proc.stderr and "run written" in proc.stderr
    for name in ("model.pt", "description.json", "checkpoint.pt", "metrics.jsonl", "curves.png"):
        assert (out / name).exists(), name
    model, desc = load_run(str(out))
    # every level of the data with its class names, and the head
    assert [lv.name for lv in desc.levels] == ["level0", "level1"]
    assert desc.levels[0].classes == ["bag", "bottoms", "dress", "footwear", "tops"]
    assert len(desc.levels[1].classes) == 10 and "tops/shirt" in desc.levels[1].classes
    assert desc.heads == [{"name": "level1", "classes": desc.levels[1].classes, "level": 1}]
    assert desc.arch_kwargs == {"width": 4, "feature_dim": 32} and desc.feature_dim == 32
    assert desc.preprocessing.input_size == 16 and desc.method == "specific"
    assert desc.data["num_images"] == 180 and desc.data["num_eval_images"] == 20
    assert desc.data["fingerprint"] and desc.data["skipped"] == 0
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"] + 0.5
    assert set(metrics[0]["eval_acc"]) == {"level1"} and metrics[0]["images_per_s"] > 0
    with torch.no_grad():
        logits = model(torch.zeros(2, 3, 16, 16))
    assert [tuple(t.shape) for t in logits] == [(2, 10)]


def test_specific_learns_above_chance(fmnist_small, tmp_path):
    run = train(cfg(fmnist_small, tmp_path / "s", epochs=5, lr=0.1,
                    arch_kwargs={"width": 8, "feature_dim": 64}))
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    # chance is 0.1 (test split, 200 images); seeds 0-2 reach 0.39-0.51 after 5 epochs
    assert metrics[-1]["eval_acc"]["specific"] > 0.25
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]


def test_generic_and_multilevel(fmnist_small, tmp_path):
    gen = train(cfg(fmnist_small, tmp_path / "g", method="generic", level="generic"))
    desc = ModelDescription.load(gen)
    assert desc.heads[0]["name"] == "generic" and desc.heads[0]["level"] == 0
    assert len(desc.heads[0]["classes"]) == 5 and len(desc.levels) == 2
    assert desc.method_args["level"] == 0
    ml = train(cfg(fmnist_small, tmp_path / "m", method="multilevel", loss_weights=[0.5, 1.0]))
    model, desc = load_run(ml)
    assert [(h["name"], len(h["classes"]), h["level"]) for h in desc.heads] == \
        [("generic", 5, 0), ("specific", 10, 1)]
    assert desc.method_args["loss_weights"] == [0.5, 1.0]
    m = json.loads(open(os.path.join(ml, "metrics.jsonl")).readline())
    assert set(m["train_acc"]) == set(m["eval_acc"]) == {"generic", "specific"}
    assert len(model.heads) == 2


def test_bf16_autocast_and_channels_last_path(fmnist_small, tmp_path):
    """The GPU options run through the same code on CPU (bf16 autocast, NHWC)."""
    run = train(cfg(fmnist_small, tmp_path / "amp", amp="bf16", channels_last=True, per_class=8,
                    label_smoothing=0.1, optimizer="adamw", schedule="step"))
    m = json.loads(open(os.path.join(run, "metrics.jsonl")).readline())
    assert np.isfinite(m["train_loss"]) and np.isfinite(m["eval_loss"])
    assert all(torch.isfinite(t.float()).all() for t in state(run).values())
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        prepare(cfg(fmnist_small, tmp_path / "x", amp="fp16", device="cpu"))


def test_epochs_zero_is_seeded_random_control(fmnist_small, tmp_path):
    a = train(cfg(fmnist_small, tmp_path / "a", epochs=0, seed=3))
    b = train(cfg(fmnist_small, tmp_path / "b", epochs=0, seed=3))
    c = train(cfg(fmnist_small, tmp_path / "c", epochs=0, seed=4))
    sa, sb, sc = state(a), state(b), state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["heads.0.weight"], sc["heads.0.weight"])
    assert load_run(a)[1].heads[0]["name"] == "specific"


def test_eval_images_match_reference_preprocess(fmnist_small, tmp_path):
    plan = prepare(cfg(fmnist_small, tmp_path / "p", input_size=20))
    x, y = plan.eval_set[3]
    ref = preprocess(plan.eval_set.paths[3], plan.desc.preprocessing)
    assert x.shape == (3, 20, 20) and np.allclose(x.numpy(), ref, atol=1e-5)
    assert int(y[0]) == plan.problem.eval_targets[3, 0]


# ---------------------------------------------------------------------------------------------
# Resume and checkpoints

class Interrupt(Exception):
    pass


def test_resume_gives_identical_weights(fmnist_small, tmp_path):
    kw = dict(epochs=3, seed=5, per_class=8, warmup_epochs=1.0)
    full = train(cfg(fmnist_small, tmp_path / "full", **kw))

    def stop_after_first(epoch, record):
        if epoch == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg(fmnist_small, tmp_path / "cut", **kw), on_epoch_end=stop_after_first)
    cut = str(tmp_path / "cut")
    assert not os.path.exists(os.path.join(cut, "model.pt"))
    ckpt = torch.load(os.path.join(cut, CHECKPOINT), weights_only=True)
    assert ckpt["epoch"] == 1 and set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "rng"}
    with pytest.raises(ValueError, match="--resume"):  # refuses to overwrite silently
        prepare(cfg(fmnist_small, cut, **kw))
    with pytest.raises(ValueError, match="seed"):      # refuses other options
        prepare(cfg(fmnist_small, cut, resume=True, **dict(kw, seed=6)))
    # resumed with DataLoader workers: augmentation does not depend on who computes it
    train(cfg(fmnist_small, cut, resume=True, workers=2, **kw))
    a, b = state(full), state(cut)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(line)["epoch"] for line in open(os.path.join(cut, "metrics.jsonl"))]
    assert epochs == [1, 2, 3]


def test_ddp_two_gloo_processes(fmnist_small, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "cli.py"), "train", "--data", fmnist_small, "--out", str(out),
           "--epochs", "1", "--input-size", "16", "--arch-kwargs", "width=4,feature_dim=32",
           "--batch-size", "16", "--per-class", "10", "--device", "cpu", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    assert proc.stderr.count("run written to") == 1  # rank 0 only
    for name in ("model.pt", "description.json", "checkpoint.pt", "metrics.jsonl", "curves.png"):
        assert (out / name).exists(), name
    model, desc = load_run(str(out))
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(metrics) == 1 and 0 <= metrics[0]["eval_acc"]["specific"] <= 1
    assert desc.data["num_images"] == 100


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors before training, corrupt images skipped and counted

def _make_folder(root, classes, per_class=4, src=None):
    """An ImageFolder with real Fashion-MNIST images copied into the given class paths."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs if f.endswith(".png"))
    for i, c in enumerate(classes):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for j in range(per_class):
            shutil.copy(files[(i * per_class + j) % len(files)], os.path.join(root, c, f"{j}.png"))
    return str(root)


def test_errors_before_training(fmnist_small, tmp_path):
    src = os.path.join(fmnist_small, "train")
    one_top = _make_folder(tmp_path / "onetop", ["all/a", "all/b"], src=src)
    proc = cli("--data", one_top, "--method", "generic", "--level", "0", "--out", tmp_path / "x",
               check=False)
    assert proc.returncode == 2 and "at least two" in proc.stderr and "'level0'" in proc.stderr
    assert not (tmp_path / "x").exists()

    with pytest.raises(ValueError, match="unknown level 'kingdom'"):
        prepare(cfg(fmnist_small, tmp_path / "x", method="generic", level="kingdom"))
    with pytest.raises(ValueError, match="out of range"):
        prepare(cfg(fmnist_small, tmp_path / "x", method="generic", level=5))

    empty = _make_folder(tmp_path / "empty", ["a", "b"], src=src)
    os.makedirs(os.path.join(empty, "c"))
    with pytest.raises(ValueError, match="empty class folder.*c"):
        prepare(cfg(empty, tmp_path / "x"))

    with pytest.raises(ValueError, match="needs --from"):
        prepare(cfg(fmnist_small, tmp_path / "x", method="fsft"))
    with pytest.raises(ValueError, match="not a run folder"):
        prepare(cfg(fmnist_small, tmp_path / "x", method="finer", from_run=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="loss-weights has 1 values for 2 heads"):
        prepare(cfg(fmnist_small, tmp_path / "x", method="multilevel", loss_weights=[1.0]))
    with pytest.raises(ValueError, match="no checkpoint.pt to resume"):
        prepare(cfg(fmnist_small, tmp_path / "x", resume=True))


def test_from_run_with_other_architecture_or_data(fmnist_small, nested_folder, tmp_path):
    src = train(cfg(fmnist_small, tmp_path / "src", epochs=0))
    with pytest.raises(ValueError, match="small_cnn run but this run is resnet18"):
        prepare(cfg(fmnist_small, tmp_path / "x", method="fsft", from_run=src, arch="resnet18"))
    with pytest.raises(ValueError, match="other data"):
        prepare(cfg(nested_folder, tmp_path / "x", method="fsft", from_run=src))


def test_corrupt_image_skipped_and_counted_or_fatal(nested_folder, tmp_path, capsys):
    bad = os.path.join(nested_folder, "tops", "shirt", "zz-corrupt.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    train(cfg(nested_folder, tmp_path / "ok", val_fraction=0.0))
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image" in err and "zz-corrupt.png" in err
    desc = ModelDescription.load(str(tmp_path / "ok"))
    assert desc.data["skipped"] == 1 and desc.data["num_images"] == 200
    assert "zz-corrupt.png" in desc.data["skipped_examples"][0]
    with pytest.raises(ImageDecodeError, match="zz-corrupt.png.*--strict-images"):
        prepare(cfg(nested_folder, tmp_path / "strict", strict_images=True))
    # too big for the memory cache: decoded per batch, the bad one dropped and counted each epoch
    lazy = train(cfg(nested_folder, tmp_path / "lazy", val_fraction=0.0, cache_gb=0.0))
    m = json.loads(open(os.path.join(lazy, "metrics.jsonl")).readline())
    assert m["skipped_images"] == 1 and ModelDescription.load(lazy).data["skipped"] == 1


def test_help_lists_methods_and_every_architecture():
    import train.efficientnet  # noqa: F401  (registers efficientnet_lite0 where available)
    from train.commands import ARCH_HELP
    from train.models import ARCHITECTURES
    text = cli("--help").stdout
    for word in ("specific", "generic", "multilevel", "finer", "fsft", "--resume", "--amp",
                 "torchrun", "Examples"):
        assert word in text
    assert all(name in ARCH_HELP for name in ARCHITECTURES)


# ---------------------------------------------------------------------------------------------
# Methods that build on a first run (train.levels, train.fsft)

@pytest.fixture(scope="module")
def specific_run(tmp_path_factory, fmnist_small):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "spe"
    return train(cfg(fmnist_small, out, epochs=2, lr=0.1))


def test_finer_from_run(fmnist_small, specific_run, tmp_path, capsys):
    pytest.importorskip("train.levels")
    run = train(cfg(fmnist_small, tmp_path / "fin", method="finer", from_run=specific_run,
                    finer_k=2, finer_min_size=5))
    desc = ModelDescription.load(run)
    head = desc.heads[0]
    assert head["level"] is None and head["name"] == "specific-finer"
    assert 10 < len(head["classes"]) <= 20 and head["classes"][0].startswith("bag/bag#")
    # the log says how many classes were split, and it agrees with the head's classes
    said = re.search(r"finer: (\d+) of 10 classes split, into (\d+) pseudo-classes \((\d+) classes",
                     capsys.readouterr().err)
    assert said, "no finer split report"
    n_split, n_pseudo, total = map(int, said.groups())
    leaves = [name.rsplit("#", 1)[0] for name in head["classes"]]
    split_leaves = {leaf for leaf in leaves if leaves.count(leaf) > 1}
    assert n_split == len(split_leaves) >= 1 and total == len(leaves)
    assert n_pseudo == sum(leaves.count(leaf) for leaf in split_leaves)
    assert desc.method_args["from"] == os.path.abspath(specific_run)
    m = json.loads(open(os.path.join(run, "metrics.jsonl")).readline())
    assert 0 <= m["eval_acc"]["specific-finer"] <= 1  # scored on the leaf labels


def test_finer_refuses_when_no_class_can_be_split(tmp_path, capsys):
    """Classes of 5 images cannot give pseudo-classes of >= 3: the run would equal the specific
    one, so it is refused with the reason and what to do, unless --allow-unsplit."""
    pytest.importorskip("train.levels")
    from common.data import load_dataset
    tiny = "digits:per_class=5"
    source = str(tmp_path / "src")
    untrained_run("small_cnn", source, heads=[("digit", load_dataset(tiny).leaf_classes)],
                  input_size=16, width=4, feature_dim=32)
    options = dict(method="finer", from_run=source, finer_k=2, finer_min_size=3, val_fraction=0)
    with pytest.raises(ValueError) as refused:
        prepare(cfg(tiny, tmp_path / "fin", **options))
    message = str(refused.value)
    assert "\n" not in message and "no class of" in message and "was split" in message
    assert "largest class has 5 training images" in message and "--finer-min-size 3" in message
    assert "--allow-unsplit" in message and "at most 2" in message
    assert "finer: 0 of 10 classes split, into 0 pseudo-classes" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "fin")  # refused before anything was written

    plan = prepare(cfg(tiny, tmp_path / "fin", allow_unsplit=True, **options))
    assert plan.problem.heads[0]["classes"] == [f"{c}#0" for c in plan.problem.dataset.leaf_classes]


def test_fsft_from_run(fmnist_small, specific_run, tmp_path):
    pytest.importorskip("train.fsft")
    run = train(cfg(fmnist_small, tmp_path / "fs", method="fsft", from_run=specific_run,
                    reinit=2, alpha=0.1, lr=0.05, arch_kwargs={}))
    desc = ModelDescription.load(run)
    assert desc.method == "fsft" and desc.method_args["reinit"] == 2
    assert desc.heads == ModelDescription.load(specific_run).heads
    assert desc.arch_kwargs == {"width": 4, "feature_dim": 32}
    before, after = state(specific_run), state(run)
    # first block kept (trained at alpha * lr: moved a little), heads re-initialised and retrained
    assert not torch.equal(before["heads.0.weight"], after["heads.0.weight"])
    first = "backbone.features.0.weight"
    assert torch.allclose(before[first], after[first], atol=0.2) and not torch.equal(
        before[first], after[first])


def test_generic_from_mapping_and_clustering(nested_folder, specific_run, tmp_path):
    pytest.importorskip("train.levels")
    leaves = sorted(f"{g}/{c}" for g in os.listdir(nested_folder)
                    for c in os.listdir(os.path.join(nested_folder, g)))
    mapping = tmp_path / "map.csv"
    mapping.write_text("\n".join(f"{leaf},{'upper' if leaf.startswith('tops') else 'other'}"
                                 for leaf in leaves))
    run = train(cfg(nested_folder, tmp_path / "map", method="generic", mapping=str(mapping)))
    desc = ModelDescription.load(run)
    assert desc.heads[0]["classes"] == ["other", "upper"] and desc.heads[0]["level"] == 0
    assert len(desc.levels) == 2 and len(desc.levels[1].classes) == 10

    mapping.write_text("\n".join(f"{leaf},x" for leaf in leaves[:-1]))
    with pytest.raises(ValueError, match="unmapped"):
        prepare(cfg(nested_folder, tmp_path / "bad", method="generic", mapping=str(mapping)))

    run = train(cfg(nested_folder, tmp_path / "clu", method="generic",
                    group_by_clustering=specific_run, k=3))
    desc = ModelDescription.load(run)
    assert desc.heads[0]["name"] == "cluster3" and len(desc.heads[0]["classes"]) == 3
    assert desc.levels[0].name == "cluster3" and desc.source_runs == [os.path.abspath(specific_run)]


def test_strong_augmentation_keeps_shape_and_varies_views():
    import torch

    from common.description import Preprocessing
    from train.augment import train_transform
    pre = Preprocessing(input_size=32, resize_size=32)
    img = (torch.arange(3 * 32 * 32) % 255).to(torch.uint8).reshape(3, 32, 32)
    strong = train_transform(pre, strength="strong")
    torch.manual_seed(0)
    views = [strong(img) for _ in range(4)]
    assert all(v.shape == (3, 32, 32) and v.dtype == torch.float32 for v in views)
    assert not torch.equal(views[0], views[1])
    with pytest.raises(ValueError, match="unknown augmentation"):
        train_transform(pre, strength="extreme")
