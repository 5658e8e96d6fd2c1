"""GhostNet (Han et al., CVPR 2020), compact, for 28×28×1 (Fashion-MNIST) or 32×32×3 inputs.

Ghost module (paper Fig. 2b): a primary 1×1 conv makes ``ceil(out / 2)`` "intrinsic"
feature maps, a cheap 3×3 depthwise conv makes one "ghost" map from each, and the two are
concatenated (and cut to ``out`` channels). Ghost bottleneck (Fig. 3): ghost module (expand,
ReLU) -> [3×3 depthwise conv, stride 2] -> [squeeze-excite] -> ghost module (project, no
ReLU), plus a shortcut (identity, or depthwise + 1×1 conv when the shape changes).

Squeeze-excite is GhostNet's: global average pool -> 1×1 conv (reduce to a quarter) -> ReLU
-> 1×1 conv (expand) -> hard sigmoid -> multiply. The reference implementation writes the
hard sigmoid as ``relu6(x + 3) / 6``; here it is ``F.hardsigmoid``, the same function
(``clamp(x / 6 + 1/2, 0, 1)``), which exports as one ONNX HardSigmoid op (see
:class:`SqueezeExcite` for what that becomes in int8).

Adaptation to small inputs: the bottleneck table is the first nine rows of GhostNet-1.0's at
width 0.75, after the paper's stride-2 stem (28 -> 14 -> 7 -> 4: the third stride-2 row is
stride 1 here); the final 1×1 conv has 240 channels and the head 1×1 conv 320 (instead of 960
and 1280).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.zoo import FASHION_MNIST, register_model


def _make_divisible(v: float, divisor: int = 4) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class GhostModule(nn.Module):
    def __init__(self, cin: int, cout: int, relu: bool = True, ratio: int = 2, dw_size: int = 3):
        super().__init__()
        self.cout = cout
        init = math.ceil(cout / ratio)
        act = [nn.ReLU(inplace=True)] if relu else []
        self.primary = nn.Sequential(nn.Conv2d(cin, init, 1, bias=False), nn.BatchNorm2d(init), *act)
        self.cheap = nn.Sequential(
            nn.Conv2d(init, init * (ratio - 1), dw_size, 1, dw_size // 2, groups=init, bias=False),
            nn.BatchNorm2d(init * (ratio - 1)), *act)

    def forward(self, x):
        x1 = self.primary(x)
        out = torch.cat([x1, self.cheap(x1)], 1)
        return out if out.shape[1] == self.cout else out[:, : self.cout]


class SqueezeExcite(nn.Module):
    """GhostNet's SE gate with a hard sigmoid.

    int8 note (measured with onnx2tf 1.28.8 + TFLiteConverter, TF 2.21): ``F.hardsigmoid``
    exports as one ONNX HardSigmoid; the converter folds its ``x / 6 + 1/2`` into the expand
    conv and leaves an int8 RELU_0_TO_1, then one broadcast int8 MUL applies the gate. The
    reference form ``relu6(x + 3) / 6`` also converts fully int8, but with one more int8 MUL
    (one more requantization) per gate. The gate lies in [0, 1], so its int8 range is fixed.
    """

    def __init__(self, channels: int, se_ratio: float = 0.25):
        super().__init__()
        reduced = _make_divisible(channels * se_ratio, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x):
        gate = self.expand(self.act(self.reduce(self.pool(x))))
        return x * F.hardsigmoid(gate)


class GhostBottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, k: int = 3, stride: int = 1, se_ratio: float = 0.0):
        super().__init__()
        self.ghost1 = GhostModule(cin, mid, relu=True)
        self.dw = (nn.Sequential(nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False), nn.BatchNorm2d(mid))
                   if stride > 1 else None)
        self.se = SqueezeExcite(mid, se_ratio) if se_ratio > 0 else None
        self.ghost2 = GhostModule(mid, cout, relu=False)
        if cin == cout and stride == 1:
            self.shortcut = None
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cin, k, stride, k // 2, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
            )

    def forward(self, x):
        y = self.ghost1(x)
        if self.dw is not None:
            y = self.dw(y)
        if self.se is not None:
            y = self.se(y)
        y = self.ghost2(y)
        return y + (x if self.shortcut is None else self.shortcut(x))


# k, expansion, out, SE ratio, stride: the first nine rows of GhostNet-1.0 (Table 7 of the paper).
# After the stride-2 stem a 28×28 input is 14×14; the paper's third stride-2 row (240 -> 80) is
# stride 1 here so that the last map is 4×4 rather than 2×2.
CONFIG = (
    (3, 16, 16, 0.0, 1),
    (3, 48, 24, 0.0, 2),
    (3, 72, 24, 0.0, 1),
    (5, 72, 40, 0.25, 2),
    (5, 120, 40, 0.25, 1),
    (3, 240, 80, 0.0, 1),
    (3, 200, 80, 0.0, 1),
    (3, 184, 80, 0.0, 1),
    (3, 480, 112, 0.25, 1),
)


class GhostNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: float = 0.75,
                 config=CONFIG, last_channels: int = 240, head_channels: int = 320, dropout: float = 0.2,
                 stem_stride: int = 2):
        super().__init__()
        stem = _make_divisible(16 * width, 4)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(stem),
                                  nn.ReLU(inplace=True))
        blocks, cin = [], stem
        for k, exp, c, se, s in config:
            cout = _make_divisible(c * width, 4)
            blocks.append(GhostBottleneck(cin, _make_divisible(exp * width, 4), cout, k, s, se))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.conv_last = nn.Sequential(nn.Conv2d(cin, last_channels, 1, bias=False), nn.BatchNorm2d(last_channels),
                                       nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(last_channels, head_channels, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head_channels, num_classes)

    def forward(self, x):
        x = self.pool(self.conv_last(self.blocks(self.stem(x))))
        x = self.act(self.conv_head(x))
        return self.classifier(self.dropout(torch.flatten(x, 1)))


@register_model(
    "ghostnet",
    **FASHION_MNIST,
    description="GhostNet (ghost modules, ghost bottlenecks, SE with hard sigmoid), width 0.75, 9 bottlenecks",
    # Measured 10.50 steps on the regression suite's fixed inputs on XNNPACK (4 threads; 5.59 on the
    # reference kernels: the two kernel families' raw outputs differ by up to 7 steps here), x1.5.
    int8_max_steps=16,
)
def ghostnet() -> nn.Module:
    return GhostNet(in_channels=1, num_classes=10)
