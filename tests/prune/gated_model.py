"""Models whose layers' output channels a split of the channel axis divides, shared by the pruning tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GatedMlp(nn.Module):
    """Phi-3's MLP: one Linear makes the gate and the values, ``chunk`` parts them."""

    def __init__(self, width: int = 6, hidden: int = 8) -> None:
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * hidden)
        self.down = nn.Linear(hidden, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.head(self.down(F.silu(gate) * up))


class ConvGlu(nn.Module):
    """A conv whose output a gated linear unit halves (Speech2Text's subsampler, Conformer's conv module)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(3, 8, 3)
        self.b = nn.Conv1d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.glu(self.a(x), dim=1))

