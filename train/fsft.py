"""Focused Self Fine-Tuning (FSFT; Tamaazousti et al., TPAMI 2020).

Retrain a trained network on its own source problem: the first blocks keep their weights and
learn at a reduced rate alpha * lr, the last `reinit` blocks and the heads start again from a
random initialisation at the full rate lr. Paper values (AlexNet): the last two layers
re-initialised, lr = 1e-2, alpha = 0.1.
"""
from __future__ import annotations

import torch
from torch import nn

from .models import Network, SmallCNN, _TorchvisionTrunk


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's blocks in forward order, the unit that FSFT keeps or re-initialises.

    small_cnn: its four conv blocks, then the 1x1 projection. ResNets: the stem (conv1, bn1),
    layer1..layer4. MobileNetV3: each child of `features`, then the hidden classifier layer.
    EfficientNet-Lite0/1/2: the stem, each MBConv block, the head. Grouped layers are returned as an
    `nn.ModuleList` that references (does not copy) the network's own modules.
    """
    from .efficientnet import EfficientNetLite

    if isinstance(backbone, SmallCNN):
        blocks, current = [], []
        for layer in backbone.features:
            if isinstance(layer, nn.Conv2d) and current:
                blocks.append(nn.ModuleList(current))
                current = []
            current.append(layer)
        return blocks + [nn.ModuleList(current), backbone.project]
    if isinstance(backbone, EfficientNetLite):
        return ([nn.ModuleList([backbone._conv_stem, backbone._bn0])] + list(backbone._blocks)
                + [nn.ModuleList([backbone._conv_head, backbone._bn1])])
    if isinstance(backbone, _TorchvisionTrunk):
        import torchvision
        trunk = backbone.trunk
        if isinstance(trunk, torchvision.models.ResNet):
            return [nn.ModuleList([trunk.conv1, trunk.bn1]), trunk.layer1, trunk.layer2,
                    trunk.layer3, trunk.layer4]
        if isinstance(trunk, torchvision.models.MobileNetV3):
            return list(trunk.features) + [trunk.classifier[0]]
    raise ValueError(f"FSFT does not know the blocks of {type(backbone).__name__}; "
                     "add it to train.fsft.backbone_blocks")


def _reinitialise(module: nn.Module) -> None:
    for m in module.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()  # BatchNorm's also resets its running statistics


def fsft_param_groups(model: Network, reinit: int, alpha: float, lr: float, seed: int
                      ) -> list[dict]:
    """Prepare `model` (trained, modified in place) for FSFT and return optimizer param groups.

    Re-initialises the last `reinit` backbone blocks and every head with each layer's own default
    initialisation (`reset_parameters`), drawn from a generator seeded with `seed` (the global
    RNG state is left as it was). Returns
    [{"name": "kept", "params": [...], "lr": lr * alpha},
     {"name": "reinit", "params": [...], "lr": lr}].
    """
    blocks = backbone_blocks(model.backbone)
    if not 1 <= reinit < len(blocks):
        raise ValueError(f"--reinit must be between 1 and {len(blocks) - 1} (this backbone has "
                         f"{len(blocks)} blocks and FSFT keeps at least the first); got {reinit}")
    if alpha < 0:
        raise ValueError(f"--alpha must be >= 0 (0 freezes the kept blocks); got {alpha}")
    fresh_modules = blocks[-reinit:] + list(model.heads)
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices[:1]):
        torch.manual_seed(seed)
        for module in fresh_modules:
            _reinitialise(module)
    fresh_ids = {id(p) for m in fresh_modules for p in m.parameters()}
    kept = [p for p in model.parameters() if id(p) not in fresh_ids]
    fresh = [p for p in model.parameters() if id(p) in fresh_ids]
    return [{"name": "kept", "params": kept, "lr": lr * alpha},
            {"name": "reinit", "params": fresh, "lr": lr}]
