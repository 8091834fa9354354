"""Channel pruning through GPT-2's ``Conv1D``: output channels are weight columns, input channels rows."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_amct.plan.specs import PruneSpec
from lightning_amct.prune import ChannelMember, find_channel_groups, prune_model

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


class Mlp(nn.Module):
    """GPT-2's MLP on a residual stream that starts at the model input (so only the hidden width prunes)."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc, self.c_proj, self.head = Conv1D(32, 8), Conv1D(8, 32), nn.Linear(8, 2)
        with torch.no_grad():
            self.c_fc.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.c_proj(F.gelu(self.c_fc(x))))


def test_the_hidden_width_prunes_by_weight_columns_and_rows() -> None:
    torch.manual_seed(0)
    model, x = Mlp(), torch.randn(2, 5, 8)
    original = copy.deepcopy(model)
    groups = {group.key: group for group in find_channel_groups(model, x)}
    assert groups["c_fc"].prunable and groups["c_fc"].members == (
        ChannelMember("c_fc", "bias", 0),
        ChannelMember("c_fc", "weight", 1),
        ChannelMember("c_proj", "weight", 0),
    )
    specs = {name: PruneSpec("filter", 0.5, False) for name in ("c_fc", "c_proj", "head")}
    result = prune_model(model, specs, x)
    # BCP by hand: the 16 columns of c_fc's weight with the largest L2 norm
    kept = sorted(original.c_fc.weight.detach().norm(dim=0).argsort()[16:].tolist())
    assert result.kept == {"c_fc": kept}  # the residual width feeds the model input's channels: whole
    assert torch.equal(model.c_fc.weight, original.c_fc.weight[:, kept])
    assert torch.equal(model.c_fc.bias, original.c_fc.bias[kept])
    assert torch.equal(model.c_proj.weight, original.c_proj.weight[kept])
    assert (model.c_fc.nf, model.c_fc.nx, model.c_proj.nf, model.c_proj.nx) == (16, 8, 8, 16)
    # the pruned model computes what the original does with the dropped hidden channels at zero (gelu(0) = 0)
    dropped = sorted(set(range(32)) - set(kept))
    with torch.no_grad():
        original.c_fc.weight[:, dropped] = 0
        original.c_fc.bias[dropped] = 0
        torch.testing.assert_close(model(x), original(x))
