"""Models with a residual stream that RMSNorms read, as language models have, shared by the pruning tests."""

from __future__ import annotations

import torch
from torch import nn


class RmsNorm(nn.Module):
    """An RMSNorm as model libraries write it (Llama, T5): a mean square over the channels, then a weight."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class RmsResidual(nn.Module):
    """A residual stream that RMSNorms read (a Llama block's MLP half, with a final norm and a head)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.norm = RmsNorm(width)
        self.mlp = nn.Linear(width, width)
        self.final_norm = RmsNorm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.mlp(self.norm(h))
        return self.head(self.final_norm(h))


class TiedLanguageModel(nn.Module):
    """Token embeddings, an RMSNorm'd block added to them, and an output layer that shares the
    embedding table (``tie_word_embeddings``): the stream starts at a table no layer produces."""

    def __init__(self, vocab: int = 12, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = RmsNorm(width)
        self.mlp = nn.Linear(width, width)
        self.final_norm = RmsNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.mlp(self.norm(h))
        return self.head(self.final_norm(h))


class TiedWithFixedWidth(TiedLanguageModel):
    """:class:`TiedLanguageModel` reshaping its stream to a width held in Python (as models keep
    ``self.hidden_size``): slicing the stream breaks the forward pass."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).view(-1, 8)
        h = h + self.mlp(self.norm(h))
        return self.head(self.final_norm(h))


class NormWithoutWeights(nn.Module):
    """OLMo's LayerNorm: no weight or bias, only the size it normalizes, held in Python."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.normalized_shape = (width,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, self.normalized_shape)


class StreamWithoutNormWeights(nn.Module):
    """An embedding-started stream that norms without weights read: one custom (the embeddings'
    norm), one ``nn.LayerNorm(elementwise_affine=False)`` (the final norm)."""

    def __init__(self, vocab: int = 12, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = NormWithoutWeights(width)
        self.mlp = nn.Linear(width, width)
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False)
        self.head = nn.Linear(width, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.mlp(self.norm(h))
        return self.head(self.final_norm(h))
