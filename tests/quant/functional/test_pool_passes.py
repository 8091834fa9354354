"""The max-pool passes against torch's ``max_pool2d`` with indices and its backward, through autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_amct.quant.functional import pool_passes
from lightning_amct.quant.functional.pool_passes import MaxPoolInput
from lightning_amct.quant.functional.ulq import ulq_fake_quant

POOLS = {
    "2x2": (nn.MaxPool2d(2), (3, 4, 8, 6)),
    "2x2, odd sizes": (nn.MaxPool2d(2), (3, 4, 9, 7)),
    "2x2, ceil_mode": (nn.MaxPool2d(2, ceil_mode=True), (3, 4, 9, 7)),
    "3x3 stride 2 padding 1": (nn.MaxPool2d(3, 2, 1), (3, 5, 9, 7)),
    "overlapping, ceil_mode": (nn.MaxPool2d(3, 2, ceil_mode=True), (2, 3, 7, 7)),
    "rectangular, dilated": (nn.MaxPool2d((3, 2), (2, 1), (1, 0), (1, 2), ceil_mode=True), (2, 3, 10, 11)),
}


def _input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random values with ties (rounded ones), signed zeros, infinities and NaNs."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * 1.5
    flat = x.view(-1)
    flat[::7] = flat[::7].round()
    flat[3::11] = 0.0
    flat[5::13] = -0.0
    flat[9] = float("inf")
    flat[2] = float("-inf")
    flat[4] = flat[17] = float("nan")
    return x


def _torch_pool(x: torch.Tensor, pool: nn.MaxPool2d, grad: torch.Tensor) -> tuple:
    """torch's pooled values, indices and ``dL/dx`` for ``grad = dL/dpooled``, through autograd."""
    x = x.clone().requires_grad_(True)
    spec = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
    values, indices = F.max_pool2d(x, *spec, return_indices=True)
    values.backward(grad)
    return values.detach(), indices, x.grad


@pytest.mark.parametrize("case", list(POOLS))
def test_the_maxima_places_and_scatter_are_torchs_bit_for_bit(case: str) -> None:
    pool, shape = POOLS[case]
    x = _input(shape, seed=len(case))
    spec = MaxPoolInput.of(pool, x)
    grad = torch.randn(pool(x).shape, generator=torch.Generator().manual_seed(1))
    expected, indices, expected_grad = _torch_pool(x, pool, grad)

    values, places = pool_passes.maxima(x, spec)
    assert values.shape == places.shape == spec.output_shape(x) and places.dtype == torch.int32
    torch.testing.assert_close(values, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(places.long(), indices)  # torch's pick of the maximum, ties and NaNs included
    assert torch.equal(pool_passes.scatter(grad, places, spec, x.shape), expected_grad)


@pytest.mark.parametrize("case", ["2x2", "3x3 stride 2 padding 1"])
def test_a_relu_before_the_pool_is_applied_to_the_maxima(case: str) -> None:
    """``ulq(max_pool2d(relu(x)))`` as ``ulq(relu(maxima))`` with the gradient scattered to the
    maxima's places in ``x``: windows with nothing above 0 pass no gradient, wherever their place."""
    pool, shape = POOLS[case]
    x = _input(shape, seed=5)
    x.view(-1)[::3] = -x.view(-1)[::3].abs()  # windows with nothing above 0
    clips = (torch.tensor([2.0]), torch.tensor([0.0]))
    grad = torch.randn(pool(x).shape, generator=torch.Generator().manual_seed(6))
    leaf = x.clone().requires_grad_(True)
    expected = ulq_fake_quant(pool(torch.relu(leaf)), *clips, 8)
    expected.backward(grad)

    values, places = pool_passes.maxima(x, MaxPoolInput.of(pool, x))
    values.requires_grad_(True)
    y = ulq_fake_quant(torch.relu(values), *clips, 8)
    y.backward(grad)
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(pool_passes.scatter(values.grad, places, MaxPoolInput.of(pool, x), x.shape), leaf.grad)


def test_every_value_of_a_window_of_negative_infinities_and_a_plane_of_nans() -> None:
    x = torch.full((1, 2, 4, 4), float("-inf"))
    x[0, 1] = float("nan")
    x[0, 1, 0, 0] = 3.0
    pool = nn.MaxPool2d(2)
    grad = torch.ones(1, 2, 2, 2)
    expected, indices, expected_grad = _torch_pool(x, pool, grad)
    spec = MaxPoolInput.of(pool, x)
    values, places = pool_passes.maxima(x, spec)
    torch.testing.assert_close(values, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(places.long(), indices)
    assert torch.equal(pool_passes.scatter(grad, places, spec, x.shape), expected_grad)


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1)], ids=["2x2", "3x3"])
def test_the_results_do_not_depend_on_the_number_of_threads(pool: nn.MaxPool2d) -> None:
    """A batch large enough for torch's team: every thread count gives the same bits."""
    x = _input((16, 32, 16, 16), seed=3)
    spec = MaxPoolInput.of(pool, x)
    grad = torch.randn(spec.output_shape(x), generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            values, places = pool_passes.maxima(x, spec)
            results.append((values, places, pool_passes.scatter(grad, places, spec, x.shape)))
    finally:
        torch.set_num_threads(threads)
    expected = _torch_pool(x, pool, grad)
    for values, places, grad_x in results:
        torch.testing.assert_close(values, expected[0], rtol=0, atol=0, equal_nan=True)
        assert torch.equal(places.long(), expected[1]) and torch.equal(grad_x, expected[2])


@pytest.mark.parametrize(
    ("pool", "x", "why"),
    [
        (nn.MaxPool2d(2, return_indices=True), torch.zeros(1, 1, 4, 4), "indices"),
        (nn.MaxPool2d(2), torch.zeros(1, 4, 4), "no batch axis"),
        (nn.MaxPool2d(2), torch.zeros(1, 2, 4, 4).contiguous(memory_format=torch.channels_last), "channels-last"),
        (nn.MaxPool2d(2), torch.zeros(1, 1, 4, 4, dtype=torch.float64), "float64"),
        (nn.MaxPool2d(2, padding=2), torch.zeros(1, 1, 4, 4), "padding over half the window"),
        (nn.MaxPool2d(5), torch.zeros(1, 1, 4, 4), "window larger than the input"),
    ],
)
def test_inputs_the_passes_leave_to_torch(pool: nn.MaxPool2d, x: torch.Tensor, why: str) -> None:
    assert MaxPoolInput.of(pool, x) is None, why


def test_the_geometry_and_the_fallback() -> None:
    pool = nn.MaxPool2d((3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), ceil_mode=True)
    x = torch.randn(2, 3, 10, 11)
    spec = MaxPoolInput.of(pool, x)
    assert (spec.kernel_size, spec.stride, spec.padding, spec.dilation) == ((3, 2), (2, 1), (1, 0), (1, 2))
    assert spec.output_shape(x) == pool(x).shape and torch.equal(spec.apply(x), pool(x))
    assert spec.replayed() is spec
