"""Integer form of compressed layers: dequantizing gives exactly the weight the forward uses."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_amct.export import FakeQuantLayer, integer_layer
from lightning_amct.export.integer import ActivationGrid, IntegerLayer
from lightning_amct.modules.compressed_layers import COMPRESSED_CLASSES
from lightning_amct.quant import ActivationQuantizer, ArqWeightQuantizer, UlqWeightQuantizer
from lightning_amct.quant.functional import ulq_fake_quant

LAYERS = [
    lambda: nn.Linear(10, 6),
    lambda: nn.Conv2d(8, 6, 3, groups=2),
    lambda: nn.Conv1d(6, 4, 3),
    lambda: nn.ConvTranspose2d(8, 6, 3, stride=2),
]


def _weight_quant(kind: str, bits: int, cls: type, layer: nn.Module, channel_wise: bool) -> nn.Module:
    axis = cls.out_axis if channel_wise else None
    if kind == "arq":
        return ArqWeightQuantizer(bits, axis)
    return UlqWeightQuantizer(bits, axis, layer.weight.shape[cls.out_axis])


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize(("kind", "bits", "channel_wise"), [("arq", 8, True), ("arq", 4, False), ("ulq", 4, True)])
@pytest.mark.parametrize("masked", [False, True])
def test_dequantized_weight_is_the_forward_weight(make, kind: str, bits: int, channel_wise: bool, masked: bool) -> None:
    torch.manual_seed(0)
    layer = make()
    cls = COMPRESSED_CLASSES[type(layer)]
    wrapped = cls.from_float(layer, None, _weight_quant(kind, bits, cls, layer, channel_wise), 0 if masked else None)
    wrapped.train()
    wrapped.compressed_weight()  # first training batch: chooses the 4:2 mask, initialises a learned scale
    if kind == "ulq":
        with torch.no_grad():
            wrapped.weight_quant.scale.mul_(0.9)  # a trained scale, no longer the ARQ one
    wrapped.eval()
    data = integer_layer("layer", wrapped)
    assert data.weight_int.dtype == torch.int8
    q_lo, q_hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert q_lo <= int(data.weight_int.min()) and int(data.weight_int.max()) <= q_hi
    assert torch.equal(data.weight(), wrapped.compressed_weight().detach())
    assert (data.mask is not None) == masked


def test_a_learned_scale_never_initialised_is_read_without_changing_the_model() -> None:
    layer = COMPRESSED_CLASSES[nn.Linear].from_float(nn.Linear(8, 4), None, UlqWeightQuantizer(8, 0, 4))
    data = integer_layer("fc", layer)
    assert not bool(layer.weight_quant.initialized)
    assert torch.equal(data.weight(), copy.deepcopy(layer).compressed_weight().detach())


def test_a_mask_not_chosen_yet_is_stored_dense_with_a_note() -> None:
    layer = COMPRESSED_CLASSES[nn.Linear].from_float(nn.Linear(8, 4), None, ArqWeightQuantizer(8, 0), 0)
    data = integer_layer("fc", layer)
    assert data.mask is None and "not chosen yet" in data.notes[0]


def test_an_uncalibrated_activation_quantizer_leaves_the_input_float() -> None:
    act = ActivationQuantizer(8, fixed_min=False)  # IFMR: calibrates on the first training batch
    layer = COMPRESSED_CLASSES[nn.Linear].from_float(nn.Linear(4, 2), act, ArqWeightQuantizer(8, 0)).eval()
    data = integer_layer("fc", layer)
    assert data.activation is None and "never calibrated" in data.notes[0]
    x = torch.randn(3, 4)
    frozen = FakeQuantLayer(nn.Linear(4, 2), data)
    torch.testing.assert_close(frozen(x), layer(x).detach(), rtol=0, atol=0)


@pytest.mark.parametrize(("bits", "clips"), [(8, (2.0, -1.0)), (4, (2.0, -1.0)), (8, (1.5, 0.0)), (4, (0.7, -3.0))])
def test_frozen_activation_grid_matches_ulq_to_one_step(bits: int, clips: tuple[float, float]) -> None:
    # torch's fake-quant rounds x * (1/s) where ULQ rounds x/s + o: the two can differ by one step
    # on a value within float rounding of a half step; everywhere else they agree exactly.
    act = ActivationQuantizer(bits, fixed_min=clips[1] == 0.0, init_clip=clips)
    scale, offset = act.scale_offset()
    grid = ActivationGrid(bits, float(scale), int(offset), *clips)
    weight = IntegerLayer("id", "Linear", 0, 1, None, None, None, torch.eye(1), None, grid, None)
    frozen = FakeQuantLayer(nn.Linear(1, 1, bias=False), weight)
    x = torch.linspace(-4.0, 4.0, 100_003).reshape(-1, 1)
    expected = ulq_fake_quant(x, act.clip_max.detach(), act.clip_min.detach(), bits)
    got = frozen(x)
    differ = (got - expected).abs() > 1e-6
    assert int(differ.sum()) <= 2
    assert float((got - expected).abs().max()) <= float(scale) * 1.0001
    low, high = grid.bounds
    assert float(got.min()) == pytest.approx(low) and float(got.max()) == pytest.approx(high)
