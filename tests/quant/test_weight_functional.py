"""ARQ and WtsULQ forward and backward against a per-channel, per-element reference of algorithms.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_amct.quant.functional import arq_fake_quant, arq_scale, wts_ulq_fake_quant

pytestmark = pytest.mark.usefixtures("kernel_path")

F32 = np.float32
EPS = F32(1.1920929e-7)


def _channels(w: np.ndarray, axis: int | None) -> list[np.ndarray]:
    """Index arrays of the elements of each channel (one group for the whole tensor)."""
    flat_index = np.arange(w.size).reshape(w.shape)
    if axis is None:
        return [flat_index.ravel()]
    return [np.take(flat_index, c, axis=axis).ravel() for c in range(w.shape[axis])]


def ref_arq_scales(w: np.ndarray, bits: int, axis: int | None) -> list[np.float32]:
    scales = []
    for idx in _channels(w, axis):
        big, small = abs(w.flat[idx].max()), abs(w.flat[idx].min())
        s = big / F32(2 ** (bits - 1) - 1) if big >= small else small / F32(2 ** (bits - 1))
        scales.append(F32(1) if s < EPS else F32(s))
    return scales


def ref_quantize(w: np.ndarray, scales: list[np.float32], bits: int, axis: int | None) -> np.ndarray:
    q_lo, q_hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out = np.empty_like(w)
    for s, idx in zip(scales, _channels(w, axis)):
        for i in idx:
            out.flat[i] = min(max(np.round(w.flat[i] / s), q_lo), q_hi) * s
    return out


def ref_scale_grad(w: np.ndarray, g: np.ndarray, scales: list[np.float32], bits: int, axis: int | None) -> list[float]:
    q_lo, q_hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    grads = []
    for s, idx in zip(scales, _channels(w, axis)):
        kappa = 1 / math.sqrt(len(idx) * q_hi)
        total = 0.0
        for i in idx:
            wi = w.flat[i]
            if wi < q_lo * s:
                r = q_lo
            elif wi > q_hi * s:
                r = q_hi
            else:
                r = float(np.round(wi / s) - wi / s)
            total += float(g.flat[i]) * r
        grads.append(kappa * total)
    return grads


AXES = [((6, 3, 2, 2), 0), ((3, 6, 2, 2), 1), ((5, 7), 0), ((6, 3, 2, 2), None), ((5, 7), -2)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("shape", "axis"), AXES)
def test_arq_matches_reference_with_straight_through_grad(bits: int, shape: tuple, axis: int | None) -> None:
    gen = torch.Generator().manual_seed(bits + len(shape))
    w = torch.randn(shape, generator=gen)
    w[0] = -w[0].abs()  # a channel (or slice) where |min| > |max| decides
    if axis is not None:
        w.select(axis, 1).zero_()  # an all-zero channel: scale 1
    g = torch.randn(shape, generator=gen)
    scales = ref_arq_scales(w.numpy(), bits, axis)
    got_scale = arq_scale(w, bits, axis)
    expected_view = [1] * w.dim()
    if axis is not None:
        expected_view[axis] = w.shape[axis]
    assert list(got_scale.shape) == expected_view and got_scale.dtype == torch.float32
    np.testing.assert_array_equal(got_scale.reshape(-1).numpy(), np.array(scales, F32))
    wt = w.clone().requires_grad_(True)
    y = arq_fake_quant(wt, bits, axis)
    y.backward(g)
    np.testing.assert_array_equal(y.detach().numpy(), ref_quantize(w.numpy(), scales, bits, axis))
    assert torch.equal(wt.grad, g)


def test_arq_all_zero_tensor() -> None:
    w = torch.zeros(4, 3)
    assert torch.equal(arq_scale(w, 8, None), torch.ones(1, 1))
    assert torch.equal(arq_fake_quant(w, 8, 0), w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_arq_keeps_dtype(dtype: torch.dtype) -> None:
    w = torch.randn(4, 5).to(dtype)
    y = arq_fake_quant(w, 8, 0)
    assert y.dtype == dtype and arq_scale(w, 8, 0).dtype == torch.float32
    expected = ref_quantize(w.double().numpy(), ref_arq_scales(w.float().numpy(), 8, 0), 8, 0)
    np.testing.assert_allclose(y.double().numpy(), expected, rtol=1e-2 if dtype != torch.float64 else 1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("shape", "axis"), AXES)
def test_wts_ulq_matches_reference(bits: int, shape: tuple, axis: int | None) -> None:
    gen = torch.Generator().manual_seed(10 + bits + len(shape))
    w = torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen)
    # learned scales from 0.4x to 1.6x of ARQ's: saturation on both sides and a wide grid
    channels = 1 if axis is None else shape[axis]
    base = arq_scale(w, bits, axis).reshape(-1)
    scale = base * torch.linspace(0.4, 1.6, channels)
    scales = [F32(v) for v in scale.tolist()]
    wt, st = w.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    y = wts_ulq_fake_quant(wt, st, bits, axis)
    y.backward(g)
    np.testing.assert_array_equal(y.detach().numpy(), ref_quantize(w.numpy(), scales, bits, axis))
    assert torch.equal(wt.grad, g)
    assert st.grad.shape == scale.shape
    expected = ref_scale_grad(w.numpy(), g.numpy(), scales, bits, axis)
    np.testing.assert_allclose(st.grad.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_wts_ulq_accepts_broadcast_shaped_scale() -> None:
    w = torch.randn(3, 4, 2)
    scale = arq_scale(w, 8, 1).requires_grad_(True)  # shape (1, 4, 1)
    y = wts_ulq_fake_quant(w, scale, 8, 1)
    y.sum().backward()
    assert torch.equal(y, arq_fake_quant(w, 8, 1)) and scale.grad.shape == (1, 4, 1)


def test_wts_ulq_degenerate_scale_acts_as_one_without_grad() -> None:
    w = torch.tensor([[0.3, -2.0], [0.5, 0.25]])
    scale = torch.tensor([0.0, 0.1], requires_grad=True)
    y = wts_ulq_fake_quant(w, scale, 8, 0)
    y.sum().backward()
    assert torch.equal(y[0], torch.tensor([0.0, -2.0]))  # round(w / 1) * 1
    assert scale.grad[0] == 0 and scale.grad[1] != 0


def test_wts_ulq_rejects_wrong_scale_size() -> None:
    with pytest.raises(ValueError, match="expected 4"):
        wts_ulq_fake_quant(torch.randn(4, 3), torch.ones(3), 8, 0)
