"""The summary's measurements on a model that takes a dict batch (a transformers-style module)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_amct.pipeline.measure import measure_model, onnx_latencies, save_float_onnx


class TokenClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(20, 8), nn.Linear(8, 3)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return self.head((self.embed(batch["input_ids"]) * mask).sum(1))


def test_a_dict_batch_is_measured_and_timed(tmp_path: Path) -> None:
    ids = torch.zeros(2, 5, dtype=torch.long)
    example = ({"input_ids": ids, "attention_mask": torch.ones_like(ids)},)
    numbers = measure_model(TokenClassifier(), example)
    assert numbers.flops_per_sample == 2 * 8 * 3  # per sample of the batch of 2
    path = save_float_onnx(TokenClassifier(), example, tmp_path / "float.onnx")
    latencies = onnx_latencies({"float": path}, example, batch_size=4, runs=3)
    assert latencies["float"] > 0
