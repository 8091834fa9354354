"""GPT-2's ``Conv1D`` (``transformers.pytorch_utils``) compressed: a Linear whose weight is ``(nx, nf)``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_amct.export.integer import integer_layer
from lightning_amct.modules.compressed_layers import CompressedConv1D, CompressedLinear, compressed_class
from lightning_amct.quant import ActivationQuantizer, ArqWeightQuantizer

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


def conv1d(nf: int = 6, nx: int = 12, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = Conv1D(nf, nx)
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def test_wrapping_shares_parameters_computes_the_same_and_round_trips() -> None:
    layer = conv1d()
    x = torch.randn(2, 5, 12)
    expected = layer(x)
    wrapped = compressed_class(layer).from_float(layer, act_quant=None)
    assert type(wrapped) is CompressedConv1D and (wrapped.out_axis, wrapped.in_axis) == (1, 0)
    assert wrapped.weight is layer.weight and wrapped.bias is layer.bias
    torch.testing.assert_close(wrapped(x), expected, rtol=0, atol=0)
    plain = wrapped.to_float()
    assert type(plain) is Conv1D and plain.weight is layer.weight and (plain.nf, plain.nx) == (6, 12)
    assert set(plain.state_dict()) == set(layer.state_dict())
    torch.testing.assert_close(plain(x), expected, rtol=0, atol=0)


def test_per_channel_weight_scales_lie_along_the_output_axis() -> None:
    layer = conv1d()
    wrapped = CompressedConv1D.from_float(layer, weight_quant=ArqWeightQuantizer(8, channel_axis=1))
    # ARQ by hand, one scale per column (output channel): max / 127, or |min| / 128 where it is larger
    weight = layer.weight.detach()
    high, low = weight.amax(0).abs(), weight.amin(0).abs()
    scale = torch.where(high >= low, high / 127, low / 128)
    quantized = (weight / scale).round().clamp(-128, 127) * scale
    x = torch.randn(3, 12)
    torch.testing.assert_close(wrapped(x), x @ quantized + layer.bias)
    data = integer_layer("c_fc", wrapped)
    assert data.layer_type == "Conv1D" and data.out_axis == 1
    torch.testing.assert_close(data.weight_scale, scale)


def test_four_two_masks_runs_of_four_input_rows() -> None:
    layer = conv1d(nf=5, nx=10)
    wrapped = CompressedConv1D.from_float(layer, mask_update_freq=0)
    wrapped.train()
    x = torch.randn(4, 10)
    out = wrapped(x)  # the first training batch chooses the mask
    mask = wrapped.weight_mask
    runs = nn.functional.pad(mask.T, (0, 2)).reshape(5, 3, 4)  # per column, 10 inputs padded to 12
    assert torch.all(runs.sum(-1) == 2)
    magnitude = nn.functional.pad(layer.weight.detach().abs().T, (0, 2), value=-1.0).reshape(5, 3, 4)
    kept, dropped = torch.where(runs == 1, magnitude, torch.inf), torch.where(runs == 0, magnitude, -1.0)
    assert torch.all(kept.amin(-1) >= dropped.amax(-1))  # the two kept are the largest of their four
    torch.testing.assert_close(out, x @ (layer.weight * mask) + layer.bias)


def test_input_quantizer_and_gradients() -> None:
    layer = conv1d()
    quantizer = ActivationQuantizer(8, fixed_min=False)
    wrapped = CompressedConv1D.from_float(layer, act_quant=quantizer)
    wrapped.train()
    x = torch.randn(2, 3, 12, requires_grad=True)
    wrapped(x).square().sum().backward()
    assert int(quantizer.calibrated_batches) == 1
    assert layer.weight.grad.shape == (12, 6) and layer.bias.grad.shape == (6,) and x.grad.shape == x.shape
    assert quantizer.clip_max.grad is not None


def test_other_layers_are_refused() -> None:
    with pytest.raises(TypeError, match="expects Conv1D, got Linear"):
        CompressedConv1D.from_float(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expects Linear, got Conv1D"):
        CompressedLinear.from_float(conv1d())
