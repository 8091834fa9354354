"""INT4 nibble packing, 2-bit position packing and 4:2 compressed storage round-trip exactly."""

from __future__ import annotations

import pytest
import torch

from lightning_amct.export.packing import pack_2bit, pack_int4, unpack_2bit, unpack_int4
from lightning_amct.export.sparse import compress_4_2, decompress_4_2, is_4_2
from lightning_amct.prune.selective import n_out_of_m_mask


@pytest.mark.parametrize("count", [0, 1, 2, 15, 16, 1001])
def test_int4_round_trip_covers_every_value(count: int) -> None:
    values = (torch.arange(count) % 16 - 8).to(torch.int8)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.numel() == (count + 1) // 2
    assert torch.equal(unpack_int4(packed, count), values)


def test_int4_layout_is_low_nibble_first_twos_complement() -> None:
    # ONNX INT4 tensors use this layout, so the bytes can go into an initializer unchanged.
    assert pack_int4(torch.tensor([1, -2])).tolist() == [0x01 | 0xE0]


def test_int4_rejects_values_outside_the_grid() -> None:
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([8]))


@pytest.mark.parametrize("count", [0, 3, 4, 5, 999])
def test_2bit_round_trip(count: int) -> None:
    values = torch.randint(0, 4, (count,), generator=torch.Generator().manual_seed(count))
    packed = pack_2bit(values)
    assert packed.numel() == -(-count // 4)
    assert torch.equal(unpack_2bit(packed, count), values.to(torch.uint8))


@pytest.mark.parametrize(
    ("shape", "in_axis"),
    [((8, 16), 1), ((6, 10, 3, 3), 1), ((5, 7), 1), ((9, 4, 3), 0), ((4, 3, 2, 2), 1)],
)
@pytest.mark.parametrize("dtype", [torch.int8, torch.float32])
def test_4_2_storage_round_trips_exactly(shape: tuple[int, ...], in_axis: int, dtype: torch.dtype) -> None:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = n_out_of_m_mask(weight, in_axis)
    masked = (weight * mask * 50).to(dtype)
    values, positions = compress_4_2(masked, mask, in_axis)
    runs = -(-shape[in_axis] // 4)
    assert values.numel() == positions.numel() == weight.numel() // shape[in_axis] * runs * 2
    assert torch.equal(decompress_4_2(values, positions, shape, in_axis), masked)
    kept = decompress_4_2(torch.ones_like(values, dtype=torch.bool), positions, shape, in_axis)
    assert torch.equal(kept, mask.bool())


def test_a_dense_mask_is_not_4_2_and_is_refused() -> None:
    ones = torch.ones(4, 8)
    assert not is_4_2(ones, 1)
    with pytest.raises(ValueError, match="at most 2 of every 4"):
        compress_4_2(ones, ones, 1)


def test_4_2_refuses_values_the_mask_drops() -> None:
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="apply the mask first"):
        compress_4_2(torch.ones(1, 4), mask, 1)
