"""Integer grids, bit-width validation and float16 scale rounding against numpy's float16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_amct.quant.functional.precision import int_range, round_scale_fp16, validate_num_bits


def _fp16_scale(s: np.float32) -> np.float32:
    """FORCE_FP16_QUANT as the doc states it: float16 inside [2^-14, 65504], else via sqrt, squared."""
    if 2.0**-14 <= s <= 65504.0:
        return np.float32(np.float16(s))
    root = np.float32(np.float16(np.sqrt(s)))
    return np.float32(root * root)


@pytest.mark.parametrize(("bits", "grid"), [(4, (-8, 7)), (8, (-128, 127)), (2, (-2, 1))])
def test_int_range(bits: int, grid: tuple[int, int]) -> None:
    assert int_range(bits) == grid


@pytest.mark.parametrize("bad", [1, 17, 8.0, True, "8"])
def test_validate_num_bits_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="num_bits"):
        validate_num_bits(bad)


def test_round_scale_fp16_matches_numpy_in_and_out_of_range() -> None:
    rng = np.random.default_rng(0)
    scales = np.concatenate(
        [
            10.0 ** rng.uniform(-12, 9, 2000),  # far below 2^-14 and far above 65504
            [0.0, 2.0**-14, np.nextafter(2.0**-14, 0), 65504.0, 65505.0, 65519.0, 65520.0, 1.0, 1 / 3],
        ]
    ).astype(np.float32)
    got = round_scale_fp16(torch.from_numpy(scales)).numpy()
    expected = np.array([_fp16_scale(s) for s in scales], dtype=np.float32)
    np.testing.assert_array_equal(got, expected)
    assert round_scale_fp16(torch.from_numpy(scales).double()).dtype == torch.float32
    # where sqrt(s) is a normal float16, the detour keeps about float16's relative precision
    via_root = ((scales < 2.0**-14) | (scales > 65504.0)) & (scales >= 2.0**-28) & (scales < 65504.0**2)
    np.testing.assert_allclose(got[via_root], scales[via_root], rtol=2e-3)
