"""ResNet-8, the MLPerf Tiny image-classification network (Banbury et al., 2021).

As in the reference (mlcommons/tiny, ``benchmark/training/image_classification/keras_model.py``):
a 3×3 conv (16) + BN + ReLU, then three residual stacks of two 3×3 convs each with 16, 32
and 64 filters (stacks 2 and 3 start with stride 2 and use a 1×1 stride-2 conv shortcut),
ReLU after each addition, average pooling over the final map and one dense layer.
The reference network is for 32×32×3 CIFAR-10 (its 8×8 final map is pooled with an 8×8
average pool); here the pool is global so that 28×28×1 input (7×7 final map) works too.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.zoo import FASHION_MNIST, register_model


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class ResidualStack(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv_bn(cout, cout, 3, 1)
        # The reference's first stack adds the input unchanged; the others project it with a
        # 1×1 stride-2 conv (no BN in the reference, so none here).
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=True)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv2(self.relu1(self.conv1(x)))
        return self.relu2(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet8(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, filters: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_channels, filters[0]), nn.ReLU(inplace=True))
        self.stacks = nn.Sequential(
            ResidualStack(filters[0], filters[0], 1),
            ResidualStack(filters[0], filters[1], 2),
            ResidualStack(filters[1], filters[2], 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(filters[2], num_classes)

    def forward(self, x):
        x = self.pool(self.stacks(self.stem(x)))
        return self.classifier(torch.flatten(x, 1))


@register_model(
    "resnet8",
    **FASHION_MNIST,
    description="ResNet-8 (MLPerf Tiny image classification), 1-channel input, global average pool",
    int8_max_steps=5,  # measured 2.98 steps on the regression suite's fixed inputs (XNNPACK, 4 threads), x1.5
)
def resnet8() -> nn.Module:
    return ResNet8(in_channels=1, num_classes=10)
