"""BatchNorm fused with the ReLU and ULQ after it: torch's BatchNorm within float32 rounding, ULQ's
kernels bit for bit on the normalised values, the same results on any number of threads."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from lightning_amct.quant.functional import norm_passes
from lightning_amct.quant.functional.norm_passes import BIAS, INVSTD, MEAN, SCALE
from lightning_amct.quant.functional.omp_team import CHUNK, MIN_TEAM_CHUNKS, _gomp_parallel
from lightning_amct.quant.functional.ulq import ulq_backward_rebuilding, ulq_forward, ulq_grid

CODES = (-128, 127)
SHAPES = [(6, 3, 5, 5), (7, 4), (3, 2, 9), (2, 3, 2, 3, 4)]


@pytest.fixture
def torch_threads() -> Iterator[callable]:
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


def _grid(clip_max: float = 2.5) -> tuple[float, ...]:
    return ulq_grid(torch.tensor([clip_max]), torch.tensor([0.0]), 8, True, on_host=True)


def _batch(shape: tuple[int, ...], seed: int = 0, mean: float = 0.7) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]
    z = torch.randn(shape, generator=generator) * 1.5 + mean
    weight = torch.rand(channels, generator=generator) + 0.5
    bias = torch.randn(channels, generator=generator) * 0.3
    return z, weight, bias


def _per_channel(row: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return row.view(1, -1, *[1] * (z.dim() - 2))


@pytest.mark.parametrize("shape", SHAPES)
def test_statistics_are_the_batch_mean_and_variance_and_update_the_running_ones_as_torch(shape: tuple) -> None:
    z, weight, bias = _batch(shape)
    mean_ours, var_ours = torch.zeros(shape[1]), torch.ones(shape[1])
    mean_torch, var_torch = mean_ours.clone(), var_ours.clone()
    table = norm_passes.statistics(z, weight, bias, mean_ours, var_ours, 0.1, 1e-5)
    axes = [0, *range(2, z.dim())]
    exact_mean = z.double().mean(axes)
    exact_var = z.double().var(axes, unbiased=False)
    torch.testing.assert_close(table[MEAN].double(), exact_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(table[INVSTD].double(), (exact_var + 1e-5).rsqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(table[SCALE], table[INVSTD] * weight, rtol=0, atol=0)
    torch.testing.assert_close(table[BIAS], bias - table[MEAN] * table[SCALE], rtol=0, atol=0)
    torch_out = F.batch_norm(z, mean_torch, var_torch, weight, bias, True, 0.1, 1e-5)
    torch.testing.assert_close(mean_ours, mean_torch, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var_ours, var_torch, rtol=1e-6, atol=1e-7)
    ours = z * _per_channel(table[SCALE], z) + _per_channel(table[BIAS], z)
    torch.testing.assert_close(ours, torch_out, rtol=1e-6, atol=1e-6)


def test_a_large_mean_costs_no_precision() -> None:
    """The sums are of values less each channel's first: a mean of 10^4 over a spread of 10^-2."""
    z = 1e4 + torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(3)) * 1e-2
    table = norm_passes.statistics(z, None, None, None, None, 0.0, 0.0)
    exact_var = z.double().var([0, 2], unbiased=False)
    torch.testing.assert_close(table[INVSTD].double(), exact_var.rsqrt(), rtol=1e-5, atol=0)


def test_without_affine_parameters_or_running_statistics() -> None:
    z, _, _ = _batch((5, 3, 4))
    table = norm_passes.statistics(z, None, None, None, None, 0.1, 1e-5)
    torch.testing.assert_close(table[SCALE], table[INVSTD], rtol=0, atol=0)
    torch.testing.assert_close(table[BIAS], -table[MEAN] * table[SCALE], rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_is_ulq_of_relu_of_the_normalised_values_bit_for_bit(shape: tuple) -> None:
    z, weight, bias = _batch(shape, seed=1)
    table = norm_passes.statistics(z, weight, bias, None, None, 0.1, 1e-5)
    normalised = z * _per_channel(table[SCALE], z) + _per_channel(table[BIAS], z)
    grid = _grid()
    expected, _ = ulq_forward(torch.relu(normalised), grid, 8, keep_codes=False)
    assert torch.equal(norm_passes.forward(z, table, grid, CODES), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_is_ulq_then_torchs_batch_norm_backward(shape: tuple) -> None:
    """The quantizer's part bit for bit (ULQ's kernel on the normalised values, ReLU included);
    BatchNorm's as ``native_batch_norm_backward`` computes it from the same statistics."""
    z, weight, bias = _batch(shape, seed=2)
    table = norm_passes.statistics(z, weight, bias, None, None, 0.1, 1e-5)
    grid = _grid()
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    normalised = z * _per_channel(table[SCALE], z) + _per_channel(table[BIAS], z)
    g, y_expected, sums_expected = ulq_backward_rebuilding(normalised, grad.clone(), grid, 8, relu=True)

    grad_z, y, sums, parameters = norm_passes.backward(z, grad.clone(), table, grid, CODES, need_input=True)
    assert torch.equal(y, y_expected)
    expected = torch.ops.aten.native_batch_norm_backward(
        g, z, weight, None, None, table[MEAN], table[INVSTD], True, 1e-5, [True, True, True]
    )
    torch.testing.assert_close(grad_z, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parameters[0], expected[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parameters[1], expected[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(sums).double(), torch.tensor(sums_expected).double(), rtol=1e-5, atol=1e-5)

    g_only, *_ = norm_passes.backward(z, grad.clone(), table, grid, CODES, need_input=False)
    assert torch.equal(g_only, g)  # without dL/dz wanted, the buffer keeps dL/du


def test_end_to_end_gradients_equal_autograd_through_torch_ops() -> None:
    """Against autograd of ``ulq(relu(batch_norm(z)))`` written with torch operations in float64
    (ULQ's straight-through gradient, its clip gradients left aside): inputs, scale and shift."""
    z, weight, bias = _batch((4, 3, 6), seed=5)
    grid = _grid(clip_max=40.0)  # wide: no value reaches the top, so the gradient passes wherever u > 0
    table = norm_passes.statistics(z, weight, bias, None, None, 0.1, 1e-5)
    grad = torch.randn(z.shape, generator=torch.Generator().manual_seed(6))
    grad_z, _, _, parameters = norm_passes.backward(z, grad.clone(), table, grid, CODES, need_input=True)

    z64, weight64, bias64 = (t.double().requires_grad_() for t in (z, weight, bias))
    u = F.batch_norm(z64, None, None, weight64, bias64, True, 0.1, 1e-5)
    assert u.max() < grid[3]
    (torch.relu(u) * grad.double()).sum().backward()
    torch.testing.assert_close(grad_z.double(), z64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(parameters[0].double(), weight64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(parameters[1].double(), bias64.grad, rtol=1e-4, atol=1e-5)


def test_a_grid_that_does_not_start_at_zero_is_refused() -> None:
    z, weight, bias = _batch((2, 2, 3))
    table = norm_passes.statistics(z, weight, bias, None, None, 0.1, 1e-5)
    below_zero = ulq_grid(torch.tensor([2.0]), torch.tensor([-1.0]), 8, False, on_host=True)
    with pytest.raises(ValueError, match="grid from 0"):
        norm_passes.forward(z, table, below_zero, CODES)


def test_nan_in_the_batch_reaches_the_statistics_and_the_output() -> None:
    z, weight, bias = _batch((4, 2, 5))
    z[1, 0, 2] = float("nan")
    table = norm_passes.statistics(z, weight, bias, None, None, 0.1, 1e-5)
    assert table[MEAN, 0].isnan() and not table[MEAN, 1].isnan()
    y = norm_passes.forward(z, table, _grid(), CODES)
    assert y[:, 0].isnan().all() and not y[:, 1].isnan().any()


@pytest.mark.skipif(_gomp_parallel() is None, reason="torch's parallel backend here is not GNU OpenMP")
def test_the_team_gives_the_calling_threads_results_bit_for_bit(torch_threads: callable) -> None:
    shape = (8, 5, MIN_TEAM_CHUNKS * CHUNK // 20, 3)
    z, weight, bias = _batch(shape, seed=7)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    results = []
    for threads in (1, 2):
        torch_threads(threads)
        running = torch.zeros(5), torch.ones(5)
        table = norm_passes.statistics(z, weight, bias, *running, 0.1, 1e-5)
        y = norm_passes.forward(z, table, _grid(), CODES)
        grad_z, y_again, sums, parameters = norm_passes.backward(z, grad.clone(), table, _grid(), CODES, True)
        results.append((table, *running, y, grad_z, y_again, torch.tensor(sums), parameters))
    for one, two in zip(*results):
        assert torch.equal(one, two)
