"""Swapping modules in: a compressed layer inside torch's encoder layer runs in every mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_amct import compress_model

SPARSE_INT8 = """
prune_config { n_out_of_m_pruner { l1_selective_prune { n_out_of_m_type: M4N2 update_freq: 0 } } }
retrain_data_quant_config: { ulq_quantize: { dst_type: INT8 } }
retrain_weight_quant_config: { arq_retrain: { dst_type: INT8 } }
"""


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(1))


@pytest.mark.parametrize("inference", [torch.no_grad, torch.inference_mode])
def test_compressed_layers_of_a_torch_encoder_layer_run_in_eval_without_gradients(inference) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 6, 16)
    with pytest.warns(UserWarning, match="self_attn.out_proj' .the model does not call it"):
        model = compress_model(Encoder(), SPARSE_INT8, x[:1])
    model.train()(x).sum().backward()  # calibration
    model.eval()
    with inference():  # Lightning's validation: torch's fused encoder would skip linear1 and linear2
        fast = model(x)
    assert torch.equal(fast, model(x).detach())
    assert model.layer.activation_relu_or_gelu == 0 and isinstance(model.layer.activation, type(nn.functional.relu))
