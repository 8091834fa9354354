"""ULQ scale/offset, forward and backward against an element-by-element reference of algorithms.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_amct.quant.functional import ulq_fake_quant, ulq_scale_offset

pytestmark = pytest.mark.usefixtures("kernel_path")

F32 = np.float32
EPS = F32(1.1920929e-7)


def _fp16_scale(s: np.float32) -> np.float32:
    if 2.0**-14 <= s <= 65504.0:
        return F32(np.float16(s))
    root = F32(np.float16(np.sqrt(s)))
    return F32(root * root)


def ref_scale_offset(clip_max: float, clip_min: float, bits: int, fp16: bool) -> tuple[np.float32, np.float32]:
    """Step 3, in float32 scalars."""
    big_m = max(F32(clip_max), F32(0))
    small_m = min(F32(clip_min), F32(0))
    s = F32(big_m - small_m) / F32(2**bits - 1)
    if fp16:
        s = _fp16_scale(s)
    if s < EPS:
        return F32(1), F32(-(2 ** (bits - 1)))
    return s, np.round(F32(-(2 ** (bits - 1))) - small_m / s)


def ref_ulq(x: np.ndarray, g: np.ndarray, clip_max: float, clip_min: float, bits: int, fp16: bool):
    """Step 4 and the backward formulas, one element at a time; gradient sums in float64."""
    s, o = ref_scale_offset(clip_max, clip_min, bits, fp16)
    q_lo, q_hi = F32(-(2 ** (bits - 1))), F32(2 ** (bits - 1) - 1)
    levels = 2**bits - 1
    lo, hi = s * (q_lo - o), s * (q_hi - o)
    y = np.empty_like(x)
    grad_x = np.empty_like(x)
    grad_max = grad_min = 0.0
    for i, (xi, gi) in enumerate(zip(x.flat, g.flat)):
        y.flat[i] = (min(max(np.round(xi / s + o), q_lo), q_hi) - o) * s
        upper, lower = xi > hi, xi < lo
        x_hat = F32(clip_max) if upper else F32(clip_min) if lower else xi
        e = float(np.round(x_hat / s) - x_hat / s) / levels
        grad_max += float(gi) * (e + upper)
        grad_min += float(gi) * (lower - e)
        grad_x.flat[i] = 0.0 if (upper or lower) else gi
    return y, grad_x, grad_max, grad_min


def _operator(x: torch.Tensor, clip_max: torch.Tensor, clip_min: torch.Tensor, bits: int, fp16: bool) -> torch.Tensor:
    """The custom operator that ``torch.compile`` traces in place of :func:`ulq_fake_quant`, run eagerly."""
    return torch.ops.lightning_amct.ulq_fake_quant(x, clip_max, clip_min, bits, fp16)


def _run(
    x: torch.Tensor,
    g: torch.Tensor,
    clip_max: float,
    clip_min: float,
    bits: int,
    fp16: bool,
    shape=(1,),
    op=ulq_fake_quant,
):
    xt = x.clone().requires_grad_(True)
    cmax = torch.full(shape, clip_max).requires_grad_(True)
    cmin = torch.full(shape, clip_min).requires_grad_(True)
    y = op(xt, cmax, cmin, bits, fp16)
    y.backward(g)
    return y.detach(), xt.grad, cmax.grad, cmin.grad


CASES = [
    # (clip_max, clip_min): ordinary, saturating both sides, fixed_min (0), one-sided ranges
    (1.0, -0.5),
    (0.3, -0.2),
    (2.5, 0.0),
    (3.0, -7.0),
    (-0.5, -1.0),  # M = 0
    (0.7, 0.2),  # m = 0
]


@pytest.mark.parametrize("op", [ulq_fake_quant, _operator], ids=["function", "operator"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize(("clip_max", "clip_min"), CASES)
def test_forward_backward_match_reference(bits: int, fp16: bool, clip_max: float, clip_min: float, op) -> None:
    gen = torch.Generator().manual_seed(bits * 100 + int(fp16))
    x = torch.randn(3, 4, 5, generator=gen) * 1.5
    g = torch.randn(3, 4, 5, generator=gen)
    y, gx, gmax, gmin = _run(x, g, clip_max, clip_min, bits, fp16, op=op)
    ry, rgx, rgmax, rgmin = ref_ulq(x.numpy(), g.numpy(), clip_max, clip_min, bits, fp16)
    np.testing.assert_array_equal(y.numpy(), ry)
    np.testing.assert_array_equal(gx.numpy(), rgx)
    tol = 1e-5 * (float(g.abs().sum()) + 1)
    assert gmax.shape == (1,) and gmin.shape == (1,)
    assert gmax.item() == pytest.approx(rgmax, abs=tol)
    assert gmin.item() == pytest.approx(rgmin, abs=tol)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize(
    ("clip_max", "clip_min"),
    [(0.0, 0.0), (1e-7, 0.0), (0.0, -5e-7), (1e-3, -1e-3), (5e6, -2e6), (40.0, -0.01)],
)
def test_scale_offset_match_reference(bits: int, fp16: bool, clip_max: float, clip_min: float) -> None:
    s, o = ulq_scale_offset(torch.tensor(clip_max), torch.tensor(clip_min), bits, fp16)
    rs, ro = ref_scale_offset(clip_max, clip_min, bits, fp16)
    assert s.dtype == o.dtype == torch.float32
    assert (s.item(), o.item()) == (rs, ro)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("clip_max", "clip_min"), [(0.0, 0.0), (1e-7, 0.0), (1e-6, -5e-7)])
def test_degenerate_range_uses_unit_scale(bits: int, clip_max: float, clip_min: float) -> None:
    """Ranges whose scale is below float32 eps: s = 1, o = -2^(n-1); gradients still per the formulas."""
    s, o = ulq_scale_offset(torch.tensor(clip_max), torch.tensor(clip_min), bits)
    assert (s.item(), o.item()) == (1.0, -(2 ** (bits - 1)))
    x = torch.tensor([0.0, 0.4, -0.3, 3.0, 400.0, -2.0])
    g = torch.linspace(-1, 1, 6)
    y, gx, gmax, gmin = _run(x, g, clip_max, clip_min, bits, False)
    ry, rgx, rgmax, rgmin = ref_ulq(x.numpy(), g.numpy(), clip_max, clip_min, bits, False)
    np.testing.assert_array_equal(y.numpy(), ry)
    np.testing.assert_array_equal(gx.numpy(), rgx)
    assert (gmax.item(), gmin.item()) == (pytest.approx(rgmax, abs=1e-6), pytest.approx(rgmin, abs=1e-6))


def test_all_zero_input_stays_zero() -> None:
    x = torch.zeros(2, 3)
    for clips in [(0.0, 0.0), (1.0, -1.0), (1.0, 0.0)]:
        y, gx, _, _ = _run(x, torch.ones(2, 3), *clips, bits=8, fp16=False)
        assert torch.equal(y, x) and torch.equal(gx, torch.ones(2, 3))


def test_scalar_clips_give_scalar_grads() -> None:
    x = torch.randn(10)
    _, _, gmax, gmin = _run(x, torch.ones(10), 1.0, -1.0, 8, False, shape=())
    assert gmax.shape == () and gmin.shape == ()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_compute_in_float32_or_better(dtype: torch.dtype) -> None:
    x = (torch.randn(64, generator=torch.Generator().manual_seed(3)) * 2).to(dtype).requires_grad_(True)
    cmax, cmin = torch.tensor([1.0], requires_grad=True), torch.tensor([-0.75], requires_grad=True)
    y = ulq_fake_quant(x, cmax, cmin, 8)
    y.backward(torch.ones_like(y))
    assert y.dtype == x.grad.dtype == dtype and cmax.grad.dtype == torch.float32
    ry, rgx, rgmax, _ = ref_ulq(x.detach().float().numpy(), np.ones(64, F32), 1.0, -0.75, 8, False)
    if dtype == torch.float64:  # x/s in float64 can differ from float32 in the last bit
        np.testing.assert_allclose(y.detach().numpy(), ry, atol=1e-6)
    else:
        assert torch.equal(y.detach(), torch.from_numpy(ry).to(dtype))
    np.testing.assert_array_equal(x.grad.float().numpy(), rgx)
    assert cmax.grad.item() == pytest.approx(rgmax, abs=1e-4)


def test_clips_may_change_in_place_before_backward() -> None:
    """The module rewrites its clips in place every forward; a pending backward must not mind."""
    x = torch.randn(8, requires_grad=True)
    cmax, cmin = torch.tensor([1.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    y = ulq_fake_quant(x, cmax, cmin, 8)
    with torch.no_grad():
        cmax.fill_(2.0)
        cmin.zero_()
    y.sum().backward()
    assert cmax.grad is not None and x.grad is not None


def test_per_channel_clips_are_rejected() -> None:
    with pytest.raises(ValueError, match="per tensor"):
        ulq_fake_quant(torch.randn(2, 3), torch.ones(3), -torch.ones(3), 8)


def test_infinite_inputs_saturate_with_finite_clip_grads() -> None:
    x = torch.tensor([float("inf"), -float("inf"), 0.25, 3.0])
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y, gx, gmax, gmin = _run(x, g, 1.0, -0.5, 8, False)
    with np.errstate(invalid="ignore"):
        ry, rgx, rgmax, rgmin = ref_ulq(x.numpy(), g.numpy(), 1.0, -0.5, 8, False)
    np.testing.assert_array_equal(y.numpy(), ry)
    np.testing.assert_array_equal(gx.numpy(), rgx)
    assert (gmax.item(), gmin.item()) == (pytest.approx(rgmax, abs=1e-6), pytest.approx(rgmin, abs=1e-6))

