"""MobileNetV2 (Sandler et al., CVPR 2018), compact, for 28×28×1 (Fashion-MNIST) or 32×32×3 inputs.

Inverted residual blocks (paper Table 1): 1×1 expansion conv + BN + ReLU6 -> 3×3 depthwise
conv + BN + ReLU6 -> 1×1 linear projection conv + BN (no activation), with an identity
shortcut when stride is 1 and the channel count is unchanged.

Adaptation to small inputs (as CIFAR ports of MobileNetV2 do): a stride-1 stem; the block
table is MobileNetV2's at width 0.5 with the 160/320-channel stages dropped and strides at
28->14 (first block), 14->7 and 7->4; the final 1×1 conv has 256 channels instead of 1280.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.zoo import FASHION_MNIST, register_model


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def conv_bn_relu6(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers = [conv_bn_relu6(cin, hidden, 1)] if expand != 1 else []
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),  # linear bottleneck
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


# t (expansion), c (channels), n (repeats), s (stride of the first block): MobileNetV2's table
# without its 160/320 rows. With the stride-1 stem, the first (t=1) block takes the paper's
# stem stride, so the maps are 14×14, 7×7 and 4×4 for a 28×28 input.
CONFIG = (
    (1, 16, 1, 2),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 2, 2),
    (6, 96, 2, 1),
)


class MobileNetV2(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: float = 0.5, config=CONFIG,
                 last_channels: int = 256, dropout: float = 0.2, stem_stride: int = 1):
        super().__init__()
        stem = _make_divisible(32 * width)
        layers = [conv_bn_relu6(in_channels, stem, 3, stem_stride)]
        cin = stem
        for t, c, n, s in config:
            cout = _make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(conv_bn_relu6(cin, last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last_channels, num_classes)

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.classifier(self.dropout(torch.flatten(x, 1)))


register_model(
    "mobilenetv2",
    **FASHION_MNIST,
    description="MobileNetV2 (inverted residuals, linear bottlenecks, ReLU6), width 0.5, stride-1 stem",
    int8_max_steps=12,  # measured 7.67 steps on the regression suite's fixed inputs (XNNPACK, 4 threads), x1.5
)(MobileNetV2)  # its defaults are the Fashion-MNIST model: 1 channel in, 10 classes
