"""Backbones from timm and torchvision by name: `timm:NAME` and `torchvision:NAME[.WEIGHTS]`.

Each becomes an `nn.Module` with the registry's feature API: `forward(x)` -> pooled penultimate
features (B, feature_dim). The framework's model is built whole, with its classifier, then the
classifier is removed, so a state dict in the framework's own key names fits it
(`classifier_prefixes` names the keys dropped, see `train.weights`):

- timm: `timm.create_model(NAME)`, then `reset_classifier(0)`; the features are
  `forward_head(forward_features(x), pre_logits=True)`, timm's own pooled pre-logits output.
- torchvision: `torchvision.models.get_model(NAME, weights=None)`; its last `nn.Linear` is the
  classifier (every classification model of torchvision ends in one), replaced by the identity:
  the features are that layer's input.

Preprocessing comes from the model's own configuration: timm's resolved data config (input size,
crop_pct, interpolation, mean, std), torchvision's weights' `transforms()`. Both resize with
torchvision's `Resize`, which truncates the long side (`resize_rounding="truncate"`).

Weights never download: `--pretrained` reads timm's files from the local Hugging Face cache and
torchvision's from the local torch hub cache, and says which file to put where when absent.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from common.description import Preprocessing
from common.errors import UserError

PREFIXES = ("timm:", "torchvision:")


class ArchitectureError(UserError, ValueError):
    """An external architecture name that cannot be built here (unknown, or its library missing)."""


def is_external(arch: str | None) -> bool:
    return bool(arch) and str(arch).startswith(PREFIXES)


def split_name(arch: str) -> tuple[str, str]:
    """'timm:convnext_atto' -> ('timm', 'convnext_atto')."""
    library, _, name = arch.partition(":")
    if library not in ("timm", "torchvision") or not name:
        raise ArchitectureError(f"--arch {arch!r}: write timm:NAME or torchvision:NAME")
    return library, name


def _timm():
    try:
        import timm
    except ImportError as e:
        raise ArchitectureError("timm:NAME needs the package timm: `pip install timm` (part of "
                                "the full extra: pip install -e '.[full]')") from e
    return timm


def check_known(arch: str) -> None:
    """ArchitectureError in one line if `arch` names no model of its library."""
    library, name = split_name(arch)
    if library == "timm":
        timm = _timm()
        if not timm.is_model(name.split(".")[0]):
            close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
            raise ArchitectureError(f"--arch {arch}: timm has no model {name!r}"
                                    + (f" (close: {', '.join(close)})" if close else "")
                                    + "; see timm.list_models()")
    else:
        _torchvision_weights_enum(name)


# ---------------------------------------------------------------------------------------------
# Building

class ExternalBackbone(nn.Module):
    """A timm or torchvision model without its classifier (see the module docstring)."""

    def __init__(self, arch: str, model: nn.Module, feature_dim: int,
                 classifier_prefixes: tuple[str, ...]):
        super().__init__()
        self.arch = arch
        self.library = split_name(arch)[0]
        self.model = model
        self.feature_dim = feature_dim
        self.classifier_prefixes = classifier_prefixes

    def weights_module(self) -> nn.Module:
        return self.model

    def forward(self, x):
        if self.library == "timm":
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model(x)


def build_external(arch: str, **kwargs) -> ExternalBackbone:
    check_known(arch)
    library, name = split_name(arch)
    if library == "timm":
        return _build_timm(arch, name, **kwargs)
    return _build_torchvision(arch, name, **kwargs)


def _build_timm(arch: str, name: str, **kwargs) -> ExternalBackbone:
    timm = _timm()
    model = timm.create_model(name, pretrained=False, **kwargs)
    classifier = model.pretrained_cfg.get("classifier") or "fc"
    names = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
    model.reset_classifier(0)
    dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return ExternalBackbone(arch, model, dim, tuple(f"{n}." for n in names))


def _build_torchvision(arch: str, name: str, **kwargs) -> ExternalBackbone:
    import torchvision
    model = torchvision.models.get_model(name.split(".")[0], weights=None, **kwargs)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ArchitectureError(f"--arch {arch}: this torchvision model ends in no nn.Linear "
                                "classifier, so its penultimate features are not defined here")
    path, last = linears[-1]
    _replace(model, path, nn.Identity())
    return ExternalBackbone(arch, model, int(last.in_features), (f"{path}.",))


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


# ---------------------------------------------------------------------------------------------
# Preprocessing

def external_preprocessing(arch: str) -> Preprocessing:
    """The model's own evaluation transform, as a Preprocessing (see the module docstring)."""
    check_known(arch)
    library, name = split_name(arch)
    if library == "timm":
        return _timm_preprocessing(arch, name)
    return _torchvision_preprocessing(arch, name)


def _timm_preprocessing(arch: str, name: str) -> Preprocessing:
    timm = _timm()
    from timm.data import resolve_data_config
    cfg = timm.models.get_pretrained_cfg(name)
    data = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg else {})
    _, height, width = data["input_size"]
    if height != width:
        raise ArchitectureError(f"--arch {arch}: its input is {height}x{width}; only square "
                                "inputs are supported (pass --input-size S to choose one)")
    if data.get("crop_mode", "center") != "center":
        raise ArchitectureError(f"--arch {arch}: its crop mode {data['crop_mode']!r} is not "
                                "supported (only 'center')")
    interpolation = data["interpolation"] if data["interpolation"] in ("bilinear", "bicubic",
                                                                       "nearest") else "bilinear"
    return Preprocessing(input_size=int(height),
                         resize_size=int(math.floor(height / data["crop_pct"])),
                         mean=[float(v) for v in data["mean"]], std=[float(v) for v in data["std"]],
                         interpolation=interpolation, resize_rounding="truncate")


def _torchvision_weights_enum(name: str):
    import torchvision
    model_name, _, tag = name.partition(".")
    try:
        weights = torchvision.models.get_model_weights(model_name)
    except (ValueError, KeyError) as e:
        close = [m for m in torchvision.models.list_models() if model_name[:5] in m][:5]
        raise ArchitectureError(f"--arch torchvision:{name}: torchvision has no model "
                                f"{model_name!r}" + (f" (close: {', '.join(close)})" if close
                                                     else "")
                                + "; see torchvision.models.list_models()") from e
    if not tag:
        return weights.DEFAULT
    try:
        return weights[tag]
    except KeyError as e:
        raise ArchitectureError(f"--arch torchvision:{name}: {model_name} has no weights {tag!r}; "
                                f"choose from {', '.join(w.name for w in weights)}") from e


def _torchvision_preprocessing(arch: str, name: str) -> Preprocessing:
    t = _torchvision_weights_enum(name).transforms()
    crop, resize = t.crop_size[0], t.resize_size[0]
    interpolation = str(t.interpolation.value)
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        raise ArchitectureError(f"--arch {arch}: its interpolation {interpolation!r} is not "
                                "supported")
    return Preprocessing(input_size=int(crop), resize_size=int(resize),
                         mean=[float(v) for v in t.mean], std=[float(v) for v in t.std],
                         interpolation=interpolation, resize_rounding="truncate")


# ---------------------------------------------------------------------------------------------
# Pretrained weights from the local caches (nothing downloads)

def pretrained_file(arch: str) -> str:
    """Path of the framework's pretrained weights in the local cache; UserError saying which file
    to put where when it is absent."""
    check_known(arch)
    library, name = split_name(arch)
    if library == "timm":
        return _timm_cached_file(arch, name)
    return _torchvision_cached_file(arch, name)


def _timm_cached_file(arch: str, name: str) -> str:
    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(name)
    repo = cfg.hf_hub_id if cfg else None
    if not repo:
        raise ArchitectureError(f"--arch {arch}: timm names no Hugging Face repository for its "
                                "weights; pass --weights FILE")
    repo, _, revision = repo.partition("@")
    from huggingface_hub import constants, try_to_load_from_cache
    for file_name in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, file_name, revision=revision or None)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    folder = os.path.join(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--"))
    raise ArchitectureError(
        f"--arch {arch} --pretrained: no local copy of {repo}/model.safetensors (nothing downloads "
        f"here); put it at {folder}/snapshots/main/model.safetensors with refs/main holding "
        "'main' (e.g. `huggingface-cli download " + repo + "` where the hub is reachable, then "
        "copy the folder), or pass --weights FILE")


def _torchvision_cached_file(arch: str, name: str) -> str:
    weights = _torchvision_weights_enum(name)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if os.path.isfile(path):
        return path
    raise ArchitectureError(f"--arch {arch} --pretrained: no local copy of {weights} (nothing "
                            f"downloads here); put {os.path.basename(weights.url)} (from "
                            f"{weights.url}) at {path}, or pass --weights FILE")
