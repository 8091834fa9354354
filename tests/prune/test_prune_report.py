"""The size report's FLOP count on model code that feeds a layer a slice of a parameter."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_amct.prune.report import model_stats


class SlicedTable(nn.Module):
    """DeBERTa's pattern: a projection of the first rows of an embedding table (``rel_embeddings[0:2k]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.table, self.proj, self.head = nn.Embedding(8, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.proj(self.table.weight[0:4]).sum(0))


def test_flops_count_a_layer_fed_a_slice_of_a_parameter_and_leave_the_model_as_it_was() -> None:
    model = SlicedTable().train()
    stats = model_stats(model, torch.zeros(3, 4))
    assert stats["layers"]["proj"]["flops"] == 2 * 4 * 4 * 4 and stats["layers"]["head"]["flops"] == 2 * 3 * 4 * 2
    assert stats["flops"] == 2 * 4 * 4 * 4 + 2 * 3 * 4 * 2
    assert model.training and all(p.requires_grad for p in model.parameters())


class TorchAttention(nn.Module):
    """torch's own encoder layer and attention, which run fused operators in eval mode without gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(x)
        return h + self.attn(h, h, h, need_weights=False)[0]


def test_flops_count_torch_attention_layers_as_training_runs_them() -> None:
    model, x = TorchAttention().eval(), torch.zeros(1, 5, 16)
    with FlopCounterMode(display=False) as counter:  # gradients on: operator by operator
        model(x)
    stats = model_stats(model, x)
    assert stats["flops"] == counter.get_total_flops() > 2 * 5 * 16 * 32 * 2  # more than the feed-forward
    assert stats["layers"]["attn"]["flops"] > 0 and torch.backends.mha.get_fastpath_enabled()
