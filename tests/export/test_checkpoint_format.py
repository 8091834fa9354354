"""The checkpoint's layer entries: INT8, INT4 packed, float, dense or 4:2, round-trip exactly."""

from __future__ import annotations

import io

import pytest
import torch

from lightning_amct.export.checkpoint import decode_layer, encode_layer
from lightning_amct.export.integer import ActivationGrid, IntegerLayer
from lightning_amct.prune.selective import n_out_of_m_mask


def _layer(bits: int | None, masked: bool, shape: tuple[int, ...] = (6, 10, 3, 3)) -> IntegerLayer:
    generator = torch.Generator().manual_seed(bits or 0)
    weight = torch.randn(shape, generator=generator)
    mask = n_out_of_m_mask(weight, 1).bool() if masked else None
    if mask is not None:
        weight = weight * mask
    ints = scale = floats = None
    if bits is None:
        floats = weight
    else:
        q_hi = 2 ** (bits - 1) - 1
        ints = (weight / weight.abs().max() * q_hi).round().to(torch.int8)
        scale = torch.rand(shape[0], generator=generator) + 0.01
    grid = ActivationGrid(8, 0.02, -3, 2.6, -2.5) if bits else None
    return IntegerLayer("conv", "Conv2d", 0, 1, bits, ints, scale, floats, torch.randn(shape[0]), grid, mask, "bn")


def _through_file(entry: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(entry, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("bits", [8, 4, None])
@pytest.mark.parametrize("masked", [False, True])
def test_layer_entry_round_trips_exactly(bits: int | None, masked: bool) -> None:
    data = _layer(bits, masked)
    entry = encode_layer(data)
    back = decode_layer("conv", _through_file(entry))
    if bits is None:
        assert back.weight_int is None and torch.equal(back.weight_float, data.weight_float)
    else:
        assert torch.equal(back.weight_int, data.weight_int) and torch.equal(back.weight_scale, data.weight_scale)
    assert torch.equal(back.weight(), data.weight())
    assert torch.equal(back.bias, data.bias) and back.activation == data.activation
    assert back.folded_batchnorm == "bn"
    assert (back.mask is None) == (not masked)
    if masked:
        assert torch.equal(back.mask, data.mask)


def test_storage_is_compact() -> None:
    numel = 6 * 10 * 9
    assert encode_layer(_layer(8, False))["weight"]["values"].numel() == numel  # one byte a weight
    assert encode_layer(_layer(4, False))["weight"]["values"].numel() == numel // 2  # two a byte
    sparse = encode_layer(_layer(8, True))["weight"]
    runs = 6 * 3 * 9  # 10 input channels padded to 12: 3 runs of 4
    assert sparse["values"].numel() == runs * 2 and sparse["positions"].numel() == runs * 2 // 4
    sparse4 = encode_layer(_layer(4, True))["weight"]
    assert sparse4["values"].numel() == runs and sparse4["positions"].numel() == runs // 2
