"""grid_tensors: the cached float32 constants of an n-bit grid."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from lightning_amct.quant.functional.precision import SCALE_EPS, grid_tensors, int_range


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_values_match_the_integer_grid(bits: int) -> None:
    k = grid_tensors(bits, torch.zeros(3))
    q_lo, q_hi = int_range(bits)
    assert (k.q_lo.item(), k.q_hi.item(), k.half.item(), k.levels.item()) == (q_lo, q_hi, -q_lo, 2**bits - 1)
    assert k.ends.tolist() == [q_lo, q_hi]
    assert k.eps.item() == torch.tensor(SCALE_EPS, dtype=torch.float32).item() == 2.0**-23
    assert k.one.item() == 1.0
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in k)
    assert [t.shape for t in k] == [(), (), (), (), (2,), (), ()]


def test_cached_per_bit_width_and_device() -> None:
    cpu = torch.zeros(3)
    assert grid_tensors(8, cpu) is grid_tensors(8, torch.nn.Parameter(torch.ones(2)))
    assert grid_tensors(8, cpu) is not grid_tensors(4, cpu)


def test_a_tracing_mode_gets_constants_of_its_own_kind() -> None:
    """Fake tensors (the compiler's, opcheck's) get fake constants, never the cached real ones."""
    real = grid_tensors(8, torch.zeros(3))
    with FakeTensorMode() as mode:
        fake = grid_tensors(8, mode.from_tensor(torch.zeros(3)))
    assert all(isinstance(t, FakeTensor) for t in fake)
    assert grid_tensors(8, torch.zeros(3)) is real
