"""The bundled demo model: a small CNN for the 8x8 digits, with every structure compression meets.

It has a conv/BN/ReLU stem, a residual block (whose add couples the stem's and the block's output
channels), a depthwise-separable block (a depthwise conv that must shrink in step with its
input), global pooling and a Linear head. Widths are multiples of 16 so ``ascend_optimized``
channel pruning has room to act.

Example:
    >>> import torch
    >>> DemoNet()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    """Conv2d without bias, BatchNorm2d, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()


class ResidualBlock(nn.Module):
    """Two 3x3 conv/BN layers with an identity shortcut: ``relu(x + bn2(conv2(relu(bn1(conv1(x))))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + x)


class DemoNet(nn.Module):
    """Stem → residual block → max-pool → depthwise-separable block → pool → Linear head.

    Args:
        num_classes: outputs of the head.
        width: channels of the stem and the residual block; the pointwise conv doubles it.
    """

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.stem = ConvBNReLU(1, width)
        self.block = ResidualBlock(width)
        self.pool = nn.MaxPool2d(2)
        self.depthwise = ConvBNReLU(width, width, groups=width)
        self.pointwise = ConvBNReLU(width, 2 * width, kernel_size=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block(self.stem(x)))
        x = self.pointwise(self.depthwise(x))
        return self.fc(self.flatten(self.gap(x)))
