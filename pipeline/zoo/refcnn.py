"""The reference CNN for 28×28 grayscale images (Fashion-MNIST).

Three 3×3 conv blocks with batch norm (folded into the convolutions at ONNX export) and
ReLU, two max-pools, global average pooling and one linear classifier: every op has a
plain int8 TFLite kernel, so it converts fully int8.
"""
from __future__ import annotations

import torch.nn as nn

from pipeline.zoo import FASHION_MNIST, register_model


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class RefCNN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_block(in_channels, w), *_block(w, w), nn.MaxPool2d(2),
            *_block(w, 2 * w), *_block(2 * w, 2 * w), nn.MaxPool2d(2),
            *_block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.classifier(self.dropout(self.features(x)))


@register_model(
    "refcnn",
    **FASHION_MNIST,  # mean and std: the Fashion-MNIST training split's, after scaling by 1/255
    description="Reference 5-conv CNN for Fashion-MNIST (BN folded, ReLU, GAP, linear head)",
    int8_max_steps=11,  # measured 7.07 steps on the regression suite's fixed inputs (XNNPACK, 4 threads), x1.5
)
def refcnn() -> nn.Module:
    return RefCNN(in_channels=1, num_classes=10, width=32)
