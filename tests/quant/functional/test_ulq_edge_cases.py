"""ulq_fake_quant beyond the reference comparison: shapes, layouts, partial gradients, non-finite inputs."""

from __future__ import annotations

import pytest
import torch

from lightning_amct.quant.functional import ulq_fake_quant, ulq_scale_offset

pytestmark = pytest.mark.usefixtures("kernel_path")


def _learnable_clips(clip_max: float, clip_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([clip_max], requires_grad=True), torch.tensor([clip_min], requires_grad=True)


def _grads(x: torch.Tensor, g: torch.Tensor, clip_max: torch.Tensor, clip_min: torch.Tensor, bits: int = 8):
    x = x.clone().requires_grad_(True)
    y = ulq_fake_quant(x, clip_max, clip_min, bits)
    y.backward(g)
    return y.detach(), x.grad, clip_max.grad, clip_min.grad


def test_clips_of_different_shapes_get_gradients_in_their_own_shape() -> None:
    x, g = torch.randn(40), torch.randn(40)
    _, _, gmax, gmin = _grads(x, g, torch.tensor(1.0, requires_grad=True), torch.tensor([-0.5], requires_grad=True))
    _, _, rmax, rmin = _grads(x, g, *_learnable_clips(1.0, -0.5))
    assert gmax.shape == () and gmin.shape == (1,)
    assert gmax.item() == rmax.item() and gmin.item() == rmin.item()


def test_zero_dim_input_keeps_its_shape() -> None:
    x = torch.tensor(0.3, requires_grad=True)
    y = ulq_fake_quant(x, torch.tensor([1.0], requires_grad=True), torch.tensor([-1.0]), 8)
    y.backward()
    assert y.shape == () and x.grad.shape == ()


def test_empty_input() -> None:
    clip_max = torch.tensor([1.0], requires_grad=True)
    y, gx, gmax, _ = _grads(torch.empty(0, 3), torch.empty(0, 3), clip_max, torch.tensor([-1.0]))
    assert y.shape == gx.shape == (0, 3) and gmax.item() == 0.0


def test_channels_last_input_matches_contiguous() -> None:
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(2, 3, 4, 5, generator=gen) * 2, torch.randn(2, 3, 4, 5, generator=gen)
    ref = _grads(x, g, *_learnable_clips(1.5, -0.7))
    last = torch.channels_last
    got = _grads(x.to(memory_format=last), g.to(memory_format=last), *_learnable_clips(1.5, -0.7))
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert got[2].item() == pytest.approx(ref[2].item(), abs=1e-5)
    assert got[3].item() == pytest.approx(ref[3].item(), abs=1e-5)


@pytest.mark.parametrize(("max_grad", "min_grad"), [(True, False), (False, True), (False, False)])
def test_only_the_requested_gradients(max_grad: bool, min_grad: bool) -> None:
    x, g = torch.randn(30) * 2, torch.randn(30)
    full = _grads(x, g, *_learnable_clips(1.0, -1.0))
    part = _grads(x, g, torch.tensor([1.0], requires_grad=max_grad), torch.tensor([-1.0], requires_grad=min_grad))
    assert torch.equal(part[1], full[1])
    assert (part[2] is not None) == max_grad and (part[3] is not None) == min_grad
    if max_grad:
        assert part[2].item() == full[2].item()
    if min_grad:
        assert part[3].item() == full[3].item()


def test_input_without_gradient_still_trains_the_clips() -> None:
    x, g = torch.randn(30) * 2, torch.randn(30)
    clip_max = torch.tensor([1.0], requires_grad=True)
    y = ulq_fake_quant(x, clip_max, torch.tensor([-1.0]), 8)
    y.backward(g)
    ref = _grads(x, g, torch.tensor([1.0], requires_grad=True), torch.tensor([-1.0]))
    assert clip_max.grad.item() == ref[2].item()


def test_nan_input_passes_its_gradient_and_leaves_the_clip_gradients_finite() -> None:
    """NaN is neither above nor below the grid: its gradient passes; its residual counts as 0."""
    x = torch.tensor([float("nan"), 0.25, 3.0, -2.0])
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    clip_max, clip_min = torch.tensor([1.0], requires_grad=True), torch.tensor([-0.5], requires_grad=True)
    y, gx, gmax, gmin = _grads(x, g, clip_max, clip_min)
    assert torch.isnan(y[0]) and gx.tolist() == [1.0, 2.0, 0.0, 0.0]
    _, _, rmax, rmin = _grads(x[1:], g[1:], *_learnable_clips(1.0, -0.5))
    assert gmax.item() == pytest.approx(rmax.item()) and gmin.item() == pytest.approx(rmin.item())


@pytest.mark.parametrize("bits", [2, 8, 16])
def test_degenerate_offset_is_the_grid_minimum_also_with_fp16_scales(bits: int) -> None:
    """Ranges whose scale rounds below float32 eps give (1, -2^(n-1)), without a second where."""
    degenerate = 0
    for clip_max, clip_min in [(2e-5, -1e-5), (1e-7, -1e-7), (0.0, -3e-6), (3e-6, 0.0), (0.0, -7e-3), (7e-3, -1e-4)]:
        for fp16 in (False, True):
            scale, offset = ulq_scale_offset(torch.tensor(clip_max), torch.tensor(clip_min), bits, fp16)
            if scale.item() == 1.0:  # these ranges are far below 2^n - 1: scale 1 means degenerate
                degenerate += 1
                assert offset.item() == -(2 ** (bits - 1))
    assert degenerate > 0
