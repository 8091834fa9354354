"""A model trained in channels-last memory order (``model.to(memory_format=torch.channels_last)``)
quantizes on the fused CPU kernels, which read and write that order as it is, with the values
and gradients of the tensor-operation path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_amct import compress_model
from lightning_amct.quant import ulq_fake_quant
from lightning_amct.quant.functional.cpu_kernels import fused_cpu_kernels

CONFIG = """
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
retrain_weight_quant_config { arq_retrain { channel_wise: true dst_type: INT8 } }
"""
CHANNELS_LAST = torch.channels_last


def _model(x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 5),
    )  # fmt: skip
    compress_model(model, CONFIG, x)
    model.to(memory_format=CHANNELS_LAST).train()
    model(x)  # calibration
    return model


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out.detach(), {"input": x.grad, **grads}


def test_a_channels_last_model_quantizes_on_the_fused_kernels_as_the_tensor_operations_do() -> None:
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=CHANNELS_LAST)
    fused_model, plain_model = _model(x), _model(x)
    conv = fused_model[3]
    assert conv.weight.is_contiguous(memory_format=CHANNELS_LAST)
    inner = torch.relu(fused_model[1](fused_model[0](x)))
    assert inner.is_contiguous(memory_format=CHANNELS_LAST) and not inner.is_contiguous()
    assert conv._quantizes_in_node(inner)  # the fused node, not the tensor operations
    with fused_cpu_kernels(False):
        assert not conv._quantizes_in_node(inner)
        plain_out, plain_grads = _step(plain_model, x)
    fused_out, fused_grads = _step(fused_model, x)
    torch.testing.assert_close(fused_out, plain_out, rtol=0, atol=0)
    for name, plain in plain_grads.items():
        if name.endswith(("clip_max", "clip_min")):  # sums in another order
            torch.testing.assert_close(fused_grads[name], plain, rtol=1e-4, atol=1e-6, msg=name)
        else:
            torch.testing.assert_close(fused_grads[name], plain, rtol=0, atol=0, msg=name)
    assert fused_grads["3.weight"].is_contiguous(memory_format=CHANNELS_LAST)


@pytest.mark.parametrize("layout", [torch.contiguous_format, CHANNELS_LAST])
def test_a_gradient_in_the_other_layout_is_taken_in_the_inputs(layout: torch.memory_format) -> None:
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=layout).requires_grad_()
    clips = torch.tensor([1.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    other = CHANNELS_LAST if layout == torch.contiguous_format else torch.contiguous_format
    grad = torch.randn(2, 4, 3, 3).contiguous(memory_format=other)
    results = []
    for fused in (True, False):
        with fused_cpu_kernels(fused):
            y = ulq_fake_quant(x, *clips, 8)
            results.append((y, *torch.autograd.grad(y, [x, *clips], grad)))
    torch.testing.assert_close(results[0][:2], results[1][:2], rtol=0, atol=0)
    torch.testing.assert_close(results[0][2:], results[1][2:], rtol=1e-5, atol=1e-6)
