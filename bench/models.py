"""Models shared by the benchmarks (import as ``from models import resnet_style`` from a bench script).

Example:
    >>> import torch
    >>> resnet_style()(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> small_cnn()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv/BN layers with a shortcut (a strided 1x1 conv/BN where the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet_style(num_classes: int = 10, width: int = 32) -> nn.Module:
    """A CIFAR ResNet-18 layout (4 stages of 2 basic blocks) at ``width`` base channels, for 3x32x32.

    Stages have width, 2x, 4x and 8x channels; stages 2-4 start with stride 2. ``width=64`` is the
    usual ResNet-18; the default 32 keeps benchmarks short on a CPU.
    """
    widths = [width, 2 * width, 4 * width, 8 * width]
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    in_channels = width
    for stage, channels in enumerate(widths):
        layers += [BasicBlock(in_channels, channels, 1 if stage == 0 else 2), BasicBlock(channels, channels, 1)]
        in_channels = channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)]
    return nn.Sequential(*layers)


def small_cnn(num_classes: int = 10) -> nn.Module:
    """Three conv/BN/ReLU layers and a Linear head for 1x28x28 (MNIST-sized) input.

    32 channels at 28x28, then 64 at 14x14 and 64 at 7x7 (3x3 convs, the last two with stride 2),
    flattened to 3136 features for the Linear layer: a small model whose step is short, so the fixed
    cost of every quantizer call shows.
    """
    layers: list[nn.Module] = []
    for in_channels, out_channels, stride in ((1, 32, 1), (32, 64, 2), (64, 64, 2)):
        layers += [
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    layers += [nn.Flatten(), nn.Linear(64 * 7 * 7, num_classes)]
    return nn.Sequential(*layers)
