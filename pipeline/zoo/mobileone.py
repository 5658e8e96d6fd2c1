"""MobileOne (Vasu et al., CVPR 2023), compact, for 28×28×1 (Fashion-MNIST) or 32×32×3 inputs.

A MobileOne block is a depthwise 3×3 block followed by a pointwise 1×1 block. While training,
each of them is over-parameterised (paper Fig. 3):

- ``k`` parallel conv-BN branches of the block's kernel size,
- for the depthwise block, a 1×1 ("scale") conv-BN branch,
- when input and output shapes match, a BN-only skip branch (identity followed by BN),

summed, then ReLU. All branches are linear, so after training they are re-parameterised
into one convolution with a bias (:meth:`MobileOneBlock.reparameterize`): BN folded into
each conv, the 1×1 kernel zero-padded to 3×3, the skip BN written as an identity kernel,
and all kernels and biases summed. The deployed network is a plain chain of conv + ReLU
(depthwise/pointwise), which converts to int8 TFLite like any MobileNet-V1-style model.

The zoo entry ``mobileone`` is the re-parameterised form (:func:`mobileone` builds it
directly with ``deploy=True``); training uses :func:`mobileone_train` and
:func:`reparameterize` turns the trained model into the form whose weights are shipped.

Adaptation to small inputs: the stem and the first two stages have stride 2 as in the
paper (28 -> 14 -> 7 -> 4), the last stage stride 1; three stages of (32, 64, 128) channels
with (2, 3, 2) blocks instead of MobileOne-S0's (48, 128, 256, 1024) with (2, 8, 10, 1);
``k = 4`` training branches as in S0.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.zoo import FASHION_MNIST, register_model


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


def _fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of conv (no bias) followed by ``bn`` in eval mode."""
    std = (bn.running_var + bn.eps).sqrt()
    t = (bn.weight / std).reshape(-1, 1, 1, 1)
    return kernel * t, bn.bias - bn.running_mean * bn.weight / std


class MobileOneBlock(nn.Module):
    """One over-parameterised conv (depthwise when ``groups == cin``) + ReLU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, branches: int = 4,
                 deploy: bool = False):
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.groups = cin, cout, k, stride, groups
        self.act = nn.ReLU(inplace=True)
        if deploy:
            self.reparam = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=True)
            return
        self.reparam = None
        self.skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.scale = ConvBN(cin, cout, 1, stride, groups) if k > 1 else None
        self.convs = nn.ModuleList(ConvBN(cin, cout, k, stride, groups) for _ in range(branches))

    def forward(self, x):
        if self.reparam is not None:
            return self.act(self.reparam(x))
        out = sum(conv(x) for conv in self.convs)
        if self.scale is not None:
            out = out + self.scale(x)
        if self.skip is not None:
            out = out + self.skip(x)
        return self.act(out)

    @torch.no_grad()
    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single conv kernel and bias equal to the sum of all branches (BN in eval mode)."""
        kernel = torch.zeros(self.cout, self.cin // self.groups, self.k, self.k)
        bias = torch.zeros(self.cout)
        for branch in self.convs:
            w, b = _fuse_bn(branch.conv.weight, branch.bn)
            kernel += w
            bias += b
        if self.scale is not None:
            w, b = _fuse_bn(self.scale.conv.weight, self.scale.bn)
            pad = self.k // 2
            kernel += F.pad(w, (pad, pad, pad, pad))
            bias += b
        if self.skip is not None:
            identity = torch.zeros(self.cout, self.cin // self.groups, self.k, self.k)
            per_group = self.cin // self.groups
            for c in range(self.cout):
                identity[c, c % per_group, self.k // 2, self.k // 2] = 1.0
            w, b = _fuse_bn(identity, self.skip)
            kernel += w
            bias += b
        return kernel, bias

    def reparameterize(self) -> None:
        """Replace the training branches by one conv with bias (in place)."""
        if self.reparam is not None:
            return
        kernel, bias = self.fused_kernel_bias()
        self.reparam = nn.Conv2d(self.cin, self.cout, self.k, self.stride, self.k // 2, groups=self.groups, bias=True)
        self.reparam.weight.data.copy_(kernel)
        self.reparam.bias.data.copy_(bias)
        for name in ("convs", "scale", "skip"):
            delattr(self, name)


class MobileOne(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, stem: int = 32,
                 stage_channels: tuple[int, ...] = (32, 64, 128), repeats: tuple[int, ...] = (2, 3, 2),
                 strides: tuple[int, ...] = (2, 2, 1), branches: int = 4, deploy: bool = False,
                 dropout: float = 0.1, stem_stride: int = 2):
        super().__init__()
        kw = dict(branches=branches, deploy=deploy)
        # The stem is a full 3×3 conv block (over-parameterised like the others), stride 2 as in the paper.
        self.stem = MobileOneBlock(in_channels, stem, 3, stem_stride, 1, **kw)
        blocks, cin = [], stem
        for cout, n, first_stride in zip(stage_channels, repeats, strides):
            for i in range(n):
                stride = first_stride if i == 0 else 1
                blocks.append(MobileOneBlock(cin, cin, 3, stride, groups=cin, **kw))  # depthwise 3×3
                blocks.append(MobileOneBlock(cin, cout, 1, 1, 1, **kw))  # pointwise 1×1
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.pool(self.blocks(self.stem(x)))
        return self.classifier(self.dropout(torch.flatten(x, 1)))


def reparameterize(model: MobileOne) -> MobileOne:
    """A re-parameterised copy of a trained MobileOne (eval mode); its state dict loads into ``mobileone()``."""
    deployed = copy.deepcopy(model).eval()
    for m in deployed.modules():
        if isinstance(m, MobileOneBlock):
            m.reparameterize()
    return deployed


def mobileone_train() -> MobileOne:
    """The over-parameterised training form of zoo:mobileone (k = 4 branches per block)."""
    return MobileOne(in_channels=1, num_classes=10, deploy=False)


@register_model(
    "mobileone",
    **FASHION_MNIST,
    description="MobileOne, re-parameterised (trained with k=4 conv-BN branches + scale + skip BN per block)",
    train_factory=mobileone_train,
    to_deploy=reparameterize,
    int8_max_steps=6,  # measured 3.80 steps on the regression suite's fixed inputs (XNNPACK, 4 threads), x1.5
)
def mobileone() -> nn.Module:
    return MobileOne(in_channels=1, num_classes=10, deploy=True)
