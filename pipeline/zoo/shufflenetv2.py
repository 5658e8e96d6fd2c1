"""ShuffleNetV2 (Ma et al., ECCV 2018), compact, for 28×28×1 (Fashion-MNIST) or 32×32×3 inputs.

Units as in the paper (Fig. 3c/d): a stride-1 unit splits the channels in two, passes one
half through unchanged and sends the other through 1×1 conv -> 3×3 depthwise conv -> 1×1
conv, concatenates both and shuffles the channels; a stride-2 unit sends the whole input
through two branches and concatenates them (doubling the channels).

Channel shuffle + split are written as the Megvii reference implementation computes them
(megvii-model/ShuffleNet-Series, ``ShuffleV2Block.channel_shuffle``): the shuffle of the
previous unit's output followed by this unit's split takes the even channels as the
pass-through half and the odd channels as the branch input (:func:`shuffle_split`), two
strided channel slices that become int8 STRIDED_SLICE ops on the NHWC channel axis. The
stride-2 units need no shuffle before them: both of their branches start with a convolution
over all input channels, which absorbs any input permutation (Megvii skips it there too).

Why not the torchvision form (reshape to N×2×C/2×H×W, transpose, reshape back, chunk)?
Measured with onnx2tf 1.28.8 on the pipeline's dynamic-batch ONNX: with sizes read from the
tensor the reshape targets are computed at run time and a later Conv2D is left with unknown
channels (TFLiteConverter: "'tf.Conv2D' op is neither a custom op nor a flex op"); with
constant sizes onnx2tf keeps the 5-D result in NCHW and the next Concat fails. The strided
slices convert once their Constant operands are initializers, which ``pipeline.conversion.onnx2tf_tflite``
arranges (``constants_as_initializers``).

Adaptation to small inputs (as CIFAR ports of ShuffleNetV2 do): the stem is a stride-1
3×3 conv without max-pool, and the stages are shortened (repeats 2, 3, 2 instead of
4, 8, 4); the 1×1 conv before pooling has 256 channels instead of 1024.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.zoo import FASHION_MNIST, register_model


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def shuffle_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel shuffle (2 groups) of the previous unit's output, then this unit's channel split.

    Megvii's ``channel_shuffle`` reshapes to (N*C/2, 2, H*W), permutes and reshapes to
    (2, N, C/2, H, W), which returns exactly the even and the odd channels. With the previous
    output being cat(passed-through, branch), each half therefore gets half of the passed-through
    channels and half of the branch's: the mixing that channel shuffle exists for.
    """
    return x[:, 0::2], x[:, 1::2]


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        branch_in = cin if stride == 2 else cin // 2
        mid = cout // 2
        if stride == 1 and cin != cout:
            raise ValueError("a stride-1 ShuffleNetV2 unit keeps its channel count")
        self.branch = nn.Sequential(
            conv_bn(branch_in, mid, 1),
            conv_bn(mid, mid, 3, stride, groups=mid, relu=False),  # depthwise, no ReLU (paper)
            conv_bn(mid, mid, 1),
        )
        if stride == 2:
            self.proj = nn.Sequential(
                conv_bn(cin, cin, 3, 2, groups=cin, relu=False),
                conv_bn(cin, mid, 1),
            )
        else:
            self.proj = None

    def forward(self, x):
        if self.stride == 1:
            keep, x = shuffle_split(x)
            return torch.cat((keep, self.branch(x)), 1)
        return torch.cat((self.proj(x), self.branch(x)), 1)


class ShuffleNetV2(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, stem: int = 24,
                 stage_channels: tuple[int, ...] = (48, 96, 192), repeats: tuple[int, ...] = (2, 3, 2),
                 last_channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.stem = conv_bn(in_channels, stem, 3, 1)
        stages, cin = [], stem
        for cout, n in zip(stage_channels, repeats):
            units = [ShuffleUnit(cin, cout, 2)] + [ShuffleUnit(cout, cout, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.conv_last = conv_bn(cin, last_channels, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last_channels, num_classes)

    def forward(self, x):
        x = self.conv_last(self.stages(self.stem(x)))
        return self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))


register_model(
    "shufflenetv2",
    **FASHION_MNIST,
    description="ShuffleNetV2 (channel split + shuffle, depthwise units), stride-1 stem for 28x28",
    int8_max_steps=11,  # measured 6.71 steps on the regression suite's fixed inputs (XNNPACK, 4 threads), x1.5
)(ShuffleNetV2)  # its defaults are the Fashion-MNIST model: 1 channel in, 10 classes
