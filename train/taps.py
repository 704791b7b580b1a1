"""Multi-depth features ("taps"): the global-average-pooled outputs of several stages of one
backbone, each L-infinity normalised (x / max|x|, as the members of a combination), concatenated.
Training-free: the weights are the backbone's own.

A tap is a stage index (0-based; negative counts from the last stage) or `final`, the backbone's
own penultimate features (what it embeds without taps). Stages are:

- EfficientNet-Lite0/1/2: the seven MBConv stages (channels 16, 24, 40, 80, 112, 192, 320 for
  Lite0/1), `final` the 1280-d head;
- timm models: the entries of the model's `feature_info` (timm's own stage list: ResNets stem +
  4 layers, ConvNeXts 4 stages, ViTs one per block), read with `forward_intermediates`; ViT
  tokens are pooled over the patch grid (the class token is not a stage output);
- torchvision models: ResNets' (and ResNeXts') layer1..layer4, RegNets' trunk blocks, and for
  the models built on a `features` sequence (EfficientNets, MobileNets, ConvNeXts, VGGs,
  DenseNets) each entry of it, read with torchvision's own feature extractor (an FX graph of
  the same modules); channels-last stage outputs (Swin) and token models (ViT) have none here;
- other backbones: only `final` (one line says so).

    tapped = TappedBackbone(backbone, parse_taps("2,4,final"))
    tapped(x)            # (B, sum of the taps' channels)
    tapped.describe()    # [{"tap": "2", "dim": 40}, ...] for the model description
"""
from __future__ import annotations

import torch
from torch import nn

from common.errors import UserError

FINAL = "final"
LINF_EPS = 1e-12


class TapError(UserError, ValueError):
    """--taps names a stage the backbone does not have, or a backbone without stages."""


def linf_normalise(f: torch.Tensor) -> torch.Tensor:
    """x / max|x| per row (the normalisation of combination members)."""
    return f / f.abs().amax(dim=1, keepdim=True).clamp_min(LINF_EPS)


def parse_taps(text: str | list | None) -> list[str]:
    """'2,4,final' -> ['2', '4', 'final'] (order kept, duplicates refused)."""
    if not text:
        return []
    items = [str(t).strip().lower() for t in (text.split(",") if isinstance(text, str) else text)]
    for item in items:
        if item != FINAL and not item.lstrip("-").isdigit():
            raise TapError(f"--taps {text}: {item!r} is neither a stage number nor 'final'")
    if len(set(items)) != len(items) or not items:
        raise TapError(f"--taps {text}: give each tap once")
    return items


def stage_channels(backbone: nn.Module) -> list[int]:
    """Channels of each stage a tap may name (empty: the backbone has no stage list here)."""
    from .efficientnet import EfficientNetLite
    from .external import ExternalBackbone
    if isinstance(backbone, EfficientNetLite):
        return list(backbone.stage_channels)
    if isinstance(backbone, ExternalBackbone) and backbone.library == "timm" \
            and hasattr(backbone.model, "forward_intermediates"):
        return [int(f["num_chs"]) for f in backbone.model.feature_info]
    if isinstance(backbone, ExternalBackbone) and backbone.library == "torchvision":
        return [c for _, c in torchvision_stages(backbone.model)]
    return []


def torchvision_stages(model: nn.Module) -> list[tuple[str, int]]:
    """(module name, channels) of each stage of a torchvision model, [] when it has no stage
    list here (see the module docstring); channels are read from one small forward pass."""
    cached = getattr(model, "_unirep_stages", None)
    if cached is not None:
        return cached
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        names = [f"layer{i}" for i in range(1, 5)]
    elif isinstance(getattr(model, "trunk_output", None), nn.Sequential):
        names = [f"trunk_output.{n}" for n, _ in model.trunk_output.named_children()]
    elif isinstance(getattr(model, "features", None), nn.Sequential) \
            and not hasattr(model, "permute"):       # Swin's features are channels-last
        names = [f"features.{n}" for n, _ in model.features.named_children()]
    else:
        names = []
    stages: list[tuple[str, int]] = []
    if names:
        from torchvision.models.feature_extraction import create_feature_extractor
        was_training = model.training
        with torch.no_grad():
            outs = create_feature_extractor(model.eval(), {n: n for n in names})(
                torch.zeros(1, 3, 224, 224))
        model.train(was_training)
        stages = [(n, int(outs[n].shape[1])) for n in names if outs[n].dim() == 4]
    model._unirep_stages = stages
    return stages


def resolve_taps(backbone: nn.Module, taps: list[str], arch: str) -> tuple[list[int], bool]:
    """Stage indices (non-negative, in the order given) and whether `final` is asked."""
    channels = stage_channels(backbone)
    stages = []
    for tap in taps:
        if tap == FINAL:
            continue
        k = int(tap)
        if not channels:
            raise TapError(f"--taps: {arch} has no stage list here (taps are defined for "
                           "EfficientNet-Lites, timm models and torchvision's convolutional "
                           "families); only 'final' is possible")
        if not -len(channels) <= k < len(channels):
            raise TapError(f"--taps: {arch} has stages 0..{len(channels) - 1} (channels "
                           f"{channels}), not {k}")
        stages.append(k % len(channels))
    if len(set(stages)) != len(stages):
        raise TapError(f"--taps {','.join(taps)}: names a stage twice")
    return stages, FINAL in taps


class TappedBackbone(nn.Module):
    """See the module docstring. Keeps the order of the taps as given, `final` where it was."""

    def __init__(self, backbone: nn.Module, taps: list[str], arch: str = "this backbone"):
        super().__init__()
        self.backbone = backbone
        self.taps = list(taps)
        self.stages, self.final = resolve_taps(backbone, self.taps, arch)
        channels = stage_channels(backbone)
        dims = iter([channels[s] for s in self.stages])
        self.dims = [backbone.feature_dim if t == FINAL else next(dims) for t in self.taps]
        self.feature_dim = sum(self.dims)
        self.extractor = self._torchvision_extractor() if self.stages else None

    def _torchvision_extractor(self) -> nn.Module | None:
        """torchvision's feature extractor over the asked stages (and the model's own output
        for `final`): an FX graph that shares the backbone's modules."""
        from .external import ExternalBackbone
        b = self.backbone
        if not (isinstance(b, ExternalBackbone) and b.library == "torchvision"):
            return None
        from torchvision.models.feature_extraction import (
            create_feature_extractor,
            get_graph_node_names,
        )
        names = torchvision_stages(b.model)
        nodes = {names[s][0]: f"stage{s}" for s in self.stages}
        if self.final:
            nodes[get_graph_node_names(b.model)[1][-1]] = FINAL  # the model's output node
        return create_feature_extractor(b.model, return_nodes=nodes)

    def describe(self) -> list[dict]:
        return [{"tap": t, "dim": d} for t, d in zip(self.taps, self.dims)]

    def _pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stage outputs in `self.stages` order, then the final features when asked."""
        from .efficientnet import EfficientNetLite
        b = self.backbone
        if isinstance(b, EfficientNetLite):
            return b.forward_taps(x, self.stages, self.final)
        if not self.stages:
            return [b(x)]
        if self.extractor is not None:
            out = self.extractor(x)
            pooled = [out[f"stage{s}"].mean(dim=(2, 3)) for s in self.stages]
            return pooled + ([out[FINAL].flatten(1)] if self.final else [])
        model = b.model
        if self.final:
            last, inter = model.forward_intermediates(x, indices=sorted(self.stages))
            pooled_final = [model.forward_head(last, pre_logits=True)]
        else:
            inter = model.forward_intermediates(x, indices=sorted(self.stages),
                                                intermediates_only=True)
            pooled_final = []
        by_stage = dict(zip(sorted(self.stages), inter))
        return [by_stage[s].mean(dim=(2, 3)) for s in self.stages] + pooled_final

    def forward(self, x):
        pooled = self._pooled(x)
        stage_iter = iter(pooled[:len(self.stages)])
        ordered = [pooled[-1] if t == FINAL else next(stage_iter) for t in self.taps]
        return torch.cat([linf_normalise(f) for f in ordered], dim=1)
