"""ULQ's and ARQ's passes on torch's OpenMP team give the calling thread's results, bit for bit, sums included."""

from __future__ import annotations

from collections.abc import Iterator

import numba
import numpy as np
import pytest
import torch

from lightning_amct.quant.functional import cpu_kernels, omp_team, ulq_passes
from lightning_amct.quant.functional.arq import arq_quantized
from lightning_amct.quant.functional.cpu_kernels import pointer
from lightning_amct.quant.functional.omp_team import CHUNK, MIN_TEAM_CHUNKS, TeamPass, member_chunks, team_threads

LARGE = 3 * MIN_TEAM_CHUNKS * CHUNK + 123  # a ragged last chunk
needs_team = pytest.mark.skipif(
    omp_team._gomp_parallel() is None, reason="torch's parallel backend here is not GNU OpenMP"
)


@pytest.fixture
def torch_threads() -> Iterator[callable]:
    """Set torch's thread count inside a test; the previous count comes back afterwards."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


def test_small_passes_and_one_torch_thread_stay_on_the_calling_thread(torch_threads: callable) -> None:
    torch_threads(2)
    assert team_threads(MIN_TEAM_CHUNKS * CHUNK - 1) == 1
    torch_threads(1)
    assert team_threads(LARGE) == 1


@needs_team
def test_large_passes_run_on_every_torch_thread(torch_threads: callable) -> None:
    torch_threads(2)
    assert team_threads(LARGE) == 2
    torch_threads(3)
    assert team_threads(LARGE) == 3
    assert team_threads(MIN_TEAM_CHUNKS * CHUNK) == 3  # no more threads than chunks
    assert team_threads(2 * CHUNK) == 1


def _passes(x: torch.Tensor, grad: torch.Tensor, bits: int) -> dict[str, object]:
    """Every ULQ pass over ``x`` (clips 2.5 and -0.5): outputs, codes, rebuilt values, gradient, sums.

    The backward runs twice, the second time writing ``dL/dx`` over the gradient and ``y`` again
    (``again``): its gradient and sums must not change.
    """
    scale, offset, lower, upper, _, _ = cpu_kernels.ulq_grid(2.5, -0.5, bits)
    wide = bits > 8
    y, grad_x, rebuilt = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    codes = torch.empty_like(x, dtype=cpu_kernels.code_dtype(bits))
    q_lo, q_hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    args = (x.data_ptr(), y.data_ptr(), codes.data_ptr(), wide, x.numel(), scale, offset, q_lo, q_hi)
    complete = ulq_passes.forward(*args)
    ulq_passes.dequantize(codes.data_ptr(), wide, rebuilt.data_ptr(), x.numel(), scale, offset)
    sums = ulq_passes.backward(x.data_ptr(), grad.data_ptr(), grad_x.data_ptr(), x.numel(), scale, lower, upper)
    again, grad_x_again = torch.empty_like(x), grad.clone()  # dL/dx over the gradient
    grid = (scale, offset, lower, upper)
    sums_again = ulq_passes.backward_rebuilding(
        x.data_ptr(), grad_x_again.data_ptr(), again.data_ptr(), x.numel(), grid, q_lo, q_hi, False
    )
    assert sums_again == sums and torch.equal(grad_x_again, grad_x)
    return {
        "y": y, "codes": codes, "complete": complete, "rebuilt": rebuilt, "grad_x": grad_x, "sums": sums, "again": again
    }  # fmt: skip


@needs_team
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("with_nan", [False, True])
def test_team_passes_equal_the_calling_thread(torch_threads: callable, bits: int, with_nan: bool) -> None:
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(LARGE, generator=generator) * 2
    grad = torch.randn(LARGE, generator=generator)
    if with_nan:
        x[LARGE - 5] = float("nan")  # in the last chunk, which one thread alone takes
    torch_threads(1)
    alone = _passes(x, grad, bits)
    torch_threads(2)
    assert team_threads(LARGE) == 2
    team = _passes(x, grad, bits)
    assert team["complete"] is alone["complete"] is (not with_nan)
    assert team["sums"] == alone["sums"]
    for name in ("y", "codes", "grad_x", "again"):
        torch.testing.assert_close(team[name], alone[name], rtol=0, atol=0, equal_nan=True, msg=name)
    for run in (team, alone):  # the backward that writes y again writes the forward's y, NaN included
        torch.testing.assert_close(run["again"], run["y"], rtol=0, atol=0, equal_nan=True)
    if not with_nan:
        assert torch.equal(team["rebuilt"], team["y"])
        assert torch.equal(alone["rebuilt"], alone["y"])


def test_sums_are_the_formula_sums(torch_threads: callable) -> None:
    """Each chunked sum against float64 sums of the backward's terms, computed with tensor operations."""
    torch_threads(2)
    generator = torch.Generator().manual_seed(0)
    x, grad = torch.randn(LARGE, generator=generator) * 2, torch.randn(LARGE, generator=generator)
    scale, _, lower, upper, _, _ = cpu_kernels.ulq_grid(2.5, -0.5, 8)
    above, below = x > upper, x < lower
    ratio = x / torch.tensor(scale, dtype=torch.float32)
    terms = (grad * above, grad * below, torch.where(above | below, 0.0, grad) * (ratio.round() - ratio))
    sums = _passes(x, grad, 8)["sums"]
    for total, term in zip(sums, terms):
        # float32 terms added in float32 within a chunk: relative error of order 1e-7 * CHUNK
        assert abs(total - term.double().sum().item()) <= 1e-5 * term.double().abs().sum().item()


@numba.njit
def _record_members(block: int) -> None:
    """Write the team member's number into ``owners[chunk]`` for each chunk it takes (block: size, owners)."""
    size, owners = numba.carray(pointer(block, np.int64), 2)
    first, last = member_chunks(size)
    for chunk in range(first, last):
        numba.carray(pointer(owners, np.int64), last)[chunk] = omp_team._thread_number()


def _record_members_body(block: int) -> None:
    _record_members(block)


@needs_team
@pytest.mark.parametrize("threads", [2, 3])
def test_members_take_contiguous_runs_of_chunks_in_thread_order(torch_threads: callable, threads: int) -> None:
    """As torch's parallel_for splits an element-wise operator: a thread reads what it wrote before."""
    torch_threads(threads)
    chunks = 3 * MIN_TEAM_CHUNKS + 1
    owners = np.full(chunks, -1, dtype=np.int64)
    block = np.array([chunks * CHUNK - 7, owners.ctypes.data], dtype=np.int64)
    TeamPass(_record_members_body).run(block, team_threads(chunks * CHUNK - 7))
    run = -(-chunks // threads)
    assert owners.tolist() == [chunk // run for chunk in range(chunks)]


@needs_team
@pytest.mark.parametrize(("shape", "channel_axis"), [((37, 384, 5, 5), 0), ((384, 37, 5, 5), 1)])
def test_arq_on_the_team_equals_the_calling_thread(
    torch_threads: callable, shape: tuple[int, ...], channel_axis: int
) -> None:
    """Channel runs on the team, per output channel (axis 0, or 1 as a ConvTranspose weight)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    w.view(-1)[w.numel() // 2] = float("nan")
    assert w.numel() >= MIN_TEAM_CHUNKS * CHUNK
    mask = (torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    quantized = {}
    for threads in (1, 2):
        torch_threads(threads)
        quantized[threads] = arq_quantized(w, 8, channel_axis), arq_quantized(w, 8, channel_axis, mask=mask)
    for one_thread, two_threads in zip(quantized[1], quantized[2]):  # without and with the mask
        torch.testing.assert_close(two_threads, one_thread, rtol=0, atol=0, equal_nan=True)
    product = arq_quantized(w * mask, 8, channel_axis)
    torch.testing.assert_close(quantized[1][1], product, rtol=0, atol=0, equal_nan=True)
