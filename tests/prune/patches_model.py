"""A model with MobileViT's unfolding of a feature map into patches (shared by the pruning tests)."""

from __future__ import annotations

import torch
from torch import nn


class Patches(nn.Module):
    """A feature map unfolded into 2x2 patches (channels last, the batch merged with the patch
    positions), a Linear with a residual over the channels of each patch, and folded back:
    MobileViT's layer, its reshapes written as ``transformers`` writes them."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, channels, 1)
        self.mix = nn.Linear(channels, channels)
        self.b = nn.Conv2d(channels, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        batch, channels, height, width = h.shape
        # (batch * channels * patch rows, 2, patch columns, 2): the channels folded with the batch
        patches = h.reshape(batch * channels * (height // 2), 2, width // 2, 2).transpose(1, 2)
        patches = patches.reshape(batch, channels, -1, 4).transpose(1, 3).reshape(batch * 4, -1, channels)
        patches = patches + self.mix(patches)
        folded = patches.contiguous().view(batch, 4, -1, channels).transpose(1, 3)
        folded = folded.reshape(batch * channels * (height // 2), width // 2, 2, 2).transpose(1, 2)
        return self.b(folded.reshape(batch, channels, height, width))

