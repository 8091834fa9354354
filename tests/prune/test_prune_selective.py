"""4:2 masks against a plain loop, odd channel counts, ConvTranspose, ties, and bit packing."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightning_amct.prune import (
    compare_stats,
    input_channel_axis,
    model_stats,
    n_out_of_m_mask,
    pack_mask_bits,
    unpack_mask_bits,
)


def loop_mask(weight: torch.Tensor, in_axis: int) -> torch.Tensor:
    """One run of 4 at a time: keep the two largest |w|, the lower index first among equals."""
    moved = weight.movedim(in_axis, -1)
    mask = torch.zeros_like(moved)
    for index in itertools.product(*(range(s) for s in moved.shape[:-1])):
        row = moved[index]
        for start in range(0, row.numel(), 4):
            run = list(range(start, min(start + 4, row.numel())))
            for c in sorted(run, key=lambda c: (-abs(row[c].item()), c))[:2]:
                mask[index][c] = 1
    return mask.movedim(-1, in_axis)


@pytest.mark.parametrize(
    ("shape", "in_axis"),
    [((6, 8, 3, 3), 1), ((5, 10), 1), ((3, 7, 2, 2), 1), ((4, 2), 1), ((9, 6, 3, 3), 0), ((4, 3, 5), 1)],
)
def test_mask_matches_the_loop(shape: tuple[int, ...], in_axis: int) -> None:
    weight = torch.randn(shape)
    mask = n_out_of_m_mask(weight, in_axis)
    assert mask.shape == weight.shape and mask.dtype == weight.dtype
    assert torch.equal(mask, loop_mask(weight, in_axis))


def test_every_full_run_keeps_exactly_its_two_largest() -> None:
    weight = torch.randn(16, 12)
    mask = n_out_of_m_mask(weight, 1)
    runs, kept = weight.abs().reshape(16, 3, 4), mask.reshape(16, 3, 4).bool()
    assert torch.equal(kept.sum(-1), torch.full((16, 3), 2))
    assert torch.all(runs[kept].reshape(16, 3, 2).amin(-1) >= runs[~kept].reshape(16, 3, 2).amax(-1))


def test_ties_keep_the_lower_index() -> None:
    weight = torch.tensor([[1.0, -1.0, 1.0, 0.5, 0.0, 0.0]])
    assert n_out_of_m_mask(weight, 1).tolist() == [[1, 1, 0, 0, 1, 1]]


def test_conv_transpose_masks_along_axis_zero() -> None:
    deconv = nn.ConvTranspose2d(10, 4, 3)
    assert input_channel_axis(deconv) == 0 and input_channel_axis(nn.Conv2d(10, 4, 3)) == 1
    mask = n_out_of_m_mask(deconv.weight, input_channel_axis(deconv))
    assert torch.equal(mask, loop_mask(deconv.weight.detach(), 0))
    assert torch.equal(mask[:8].reshape(2, 4, -1).sum(1), torch.full((2, 4 * 9), 2.0))


def test_mask_keeps_dtype_and_needs_no_grad() -> None:
    weight = nn.Parameter(torch.randn(4, 8, dtype=torch.float64))
    mask = n_out_of_m_mask(weight, 1)
    assert mask.dtype == torch.float64 and not mask.requires_grad


@pytest.mark.parametrize("shape", [(6, 8, 3, 3), (5, 3), (1,), (17,)])
def test_bit_pack_round_trip(shape: tuple[int, ...]) -> None:
    mask = (torch.rand(shape) > 0.5).float()
    packed = pack_mask_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask_bits(packed, mask.shape).float(), mask)


def test_bit_order_is_lsb_first() -> None:
    assert pack_mask_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1])).tolist() == [129, 1]


def test_pack_rejects_values_other_than_zero_and_one() -> None:
    with pytest.raises(ValueError, match="zeros and ones"):
        pack_mask_bits(torch.tensor([0.0, 0.5]))


def test_report_counts_masked_weights_as_sparsity() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    mask = n_out_of_m_mask(model[0].weight, 1)
    before = model_stats(model, torch.zeros(1, 8))
    rows = compare_stats(before, model_stats(model, torch.zeros(1, 8), masks={"0": mask}))
    assert rows[0]["sparsity"] == 0.5 and rows[1]["sparsity"] == 0.0
    assert rows[-1]["sparsity"] == 16 / 40 and rows[-1]["params_after"] == rows[-1]["params_before"] == 46
