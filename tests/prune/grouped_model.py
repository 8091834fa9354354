"""A model with grouped and depthwise convolutions, shared by the pruning tests."""

from __future__ import annotations

import torch
from torch import nn


class Grouped(nn.Module):
    """A 1x1 conv, a grouped conv (4 groups), a depthwise conv with channel multiplier 2, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(32, 64, 3, padding=1, groups=32)  # depthwise, channel multiplier 2
        self.out = nn.Conv2d(64, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dw(self.g(self.a(x))))
