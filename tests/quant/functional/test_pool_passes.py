"""The fused max-pool + ULQ passes against torch's ``max_pool2d`` followed by the quantizer, through autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_amct.quant.functional import pool_passes
from lightning_amct.quant.functional.pool_passes import MaxPoolInput
from lightning_amct.quant.functional.precision import int_range
from lightning_amct.quant.functional.ulq import ulq_clip_gradients, ulq_fake_quant, ulq_grid

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


def _reference(x: torch.Tensor, pool: nn.MaxPool2d, clips: tuple, grad: torch.Tensor) -> tuple:
    """``ulq_fake_quant(max_pool2d(x))`` through autograd: output, ``dL/dx`` and the clips' gradients."""
    x = x.clone().requires_grad_(True)
    clip_max, clip_min = (c.detach().clone().requires_grad_(True) for c in clips)
    out = ulq_fake_quant(pool(x), clip_max, clip_min, 8)
    out.backward(grad)
    return out.detach(), x.grad, clip_max.grad, clip_min.grad


@pytest.mark.parametrize("case", list(POOLS))
@pytest.mark.parametrize("clips", [(2.0, 0.0), (1.0, -0.5)], ids=["from-0", "signed"])
def test_the_passes_equal_torchs_pool_then_the_quantizer(case: str, clips: tuple[float, float]) -> None:
    pool, shape = POOLS[case]
    x = _input(shape, seed=len(case))
    clips = tuple(torch.tensor([c]) for c in clips)
    grid = ulq_grid(*clips, 8, False, on_host=True)
    spec = MaxPoolInput.of(pool, x)
    grad = torch.randn(pool(x).shape, generator=torch.Generator().manual_seed(1))
    expected, expected_grad, expected_max, expected_min = _reference(x, pool, clips, grad)

    y = pool_passes.forward(x, spec, grid, int_range(8))
    rebuilt = torch.full_like(y, 7.0)
    grad_x, sums = pool_passes.backward(x, grad, rebuilt, spec, grid, int_range(8))

    assert y.shape == expected.shape == spec.output_shape(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(rebuilt, y, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(grad_x, expected_grad)  # torch's pick of the maximum, ties and NaNs included
    clip_max_grad, clip_min_grad = (float(t) for t in ulq_clip_gradients(sums, grid, 8))
    assert clip_max_grad == pytest.approx(float(expected_max), rel=1e-5, abs=1e-5)  # summed in another order
    assert clip_min_grad == pytest.approx(float(expected_min), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("case", ["2x2", "3x3 stride 2 padding 1"])
def test_a_relu_before_the_pool_takes_its_gradient_in_the_backward(case: str) -> None:
    """``ulq(max_pool2d(relu(x)))`` on a grid from 0: the forward's values as they are, ``dL/dx`` torch's."""
    pool, shape = POOLS[case]
    x = _input(shape, seed=5)
    x.view(-1)[::3] = -x.view(-1)[::3].abs()  # windows with nothing above 0
    clips = (torch.tensor([2.0]), torch.tensor([0.0]))
    grid = ulq_grid(*clips, 8, False, on_host=True)
    grad = torch.randn(pool(x).shape, generator=torch.Generator().manual_seed(6))
    expected, expected_grad, expected_max, _ = _reference(torch.relu(x), pool, clips, grad)
    relu_grad = expected_grad * (x > 0)  # ReLU's backward: 0 at 0 and below; NaN keeps its gradient
    relu_grad[x.isnan()] = expected_grad[x.isnan()]
    spec = MaxPoolInput.of(pool, x)
    y = pool_passes.forward(x, spec, grid, (-128, 127))
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
    grad_x, sums = pool_passes.backward(x, grad, torch.empty_like(expected), spec, grid, (-128, 127), relu=True)
    assert torch.equal(grad_x, relu_grad)
    assert float(ulq_clip_gradients(sums, grid, 8)[0]) == pytest.approx(float(expected_max), rel=1e-5, abs=1e-5)


def test_every_value_of_a_window_of_negative_infinities_and_a_plane_of_nans() -> None:
    x = torch.full((1, 2, 4, 4), float("-inf"))
    x[0, 1] = float("nan")
    x[0, 1, 0, 0] = 3.0
    pool = nn.MaxPool2d(2)
    clips = (torch.tensor([2.0]), torch.tensor([0.0]))
    grid = ulq_grid(*clips, 8, False, on_host=True)
    grad = torch.ones(1, 2, 2, 2)
    expected, expected_grad, _, _ = _reference(x, pool, clips, grad)
    spec = MaxPoolInput.of(pool, x)
    y = pool_passes.forward(x, spec, grid, (-128, 127))
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
    grad_x, _ = pool_passes.backward(x, grad, torch.empty_like(expected), spec, grid, (-128, 127))
    assert torch.equal(grad_x, expected_grad)


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1)], ids=["2x2", "3x3"])
def test_the_results_do_not_depend_on_the_number_of_threads(pool: nn.MaxPool2d) -> None:
    """A batch large enough for torch's team: every thread count gives the same bits, sums included."""
    x = _input((16, 32, 16, 16), seed=3)
    grid = ulq_grid(torch.tensor([2.5]), torch.tensor([-0.5]), 8, False, on_host=True)
    spec = MaxPoolInput.of(pool, x)
    grad = torch.randn(spec.output_shape(x), generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            y = pool_passes.forward(x, spec, grid, (-128, 127))
            grad_x, sums = pool_passes.backward(x, grad, torch.empty_like(y), spec, grid, (-128, 127))
            results.append((y, grad_x, sums))
    finally:
        torch.set_num_threads(threads)
    for y, grad_x, sums in results[1:]:
        torch.testing.assert_close(y, results[0][0], rtol=0, atol=0, equal_nan=True)
        assert torch.equal(grad_x, results[0][1]) and sums == results[0][2]


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
