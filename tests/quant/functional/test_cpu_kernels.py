"""The fused CPU kernels against the tensor-op path: bit-identical values, sums equal up to order."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
import torch

from lightning_amct.quant.functional import arq_fake_quant, ulq_fake_quant
from lightning_amct.quant.functional.arq import arq_quantized
from lightning_amct.quant.functional.cpu_kernels import applies, compiled, fused_cpu_kernels, ulq_grid
from lightning_amct.quant.functional.ulq import _grid

CLIPS = [(1.0, -0.5), (6.0, 0.0), (0.3, -2.0), (-0.5, -1.0), (0.7, 0.2), (0.0, 0.0), (1e-6, -5e-7), (4e4, -3e3)]


def _ulq_run(x: torch.Tensor, g: torch.Tensor, clip_max: float, clip_min: float, bits: int, fp16: bool, fused: bool):
    assert applies(x)
    xt = x.clone().requires_grad_(True)
    cmax = torch.tensor([clip_max], requires_grad=True)
    cmin = torch.tensor([clip_min], requires_grad=True)
    with fused_cpu_kernels(fused):
        y = ulq_fake_quant(xt, cmax, cmin, bits, fp16)
        y.backward(g)
    return y.detach(), xt.grad, cmax.grad.item(), cmin.grad.item()


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize(("clip_max", "clip_min"), CLIPS)
def test_ulq_fused_matches_tensor_ops(bits: int, fp16: bool, clip_max: float, clip_min: float) -> None:
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(8, 16, 9, 9, generator=gen) * 2
    x.view(-1)[:5] = torch.tensor([math.inf, -math.inf, 0.0, clip_max, clip_min])
    g = torch.randn(x.shape, generator=gen)
    fused = _ulq_run(x, g, clip_max, clip_min, bits, fp16, fused=True)
    ops = _ulq_run(x, g, clip_max, clip_min, bits, fp16, fused=False)
    assert torch.equal(fused[0], ops[0]) and torch.equal(fused[1], ops[1])
    tol = 1e-5 * (float(g.abs().sum()) + 1)
    assert fused[2] == pytest.approx(ops[2], abs=tol) and fused[3] == pytest.approx(ops[3], abs=tol)


def test_ulq_grid_is_the_tensor_grid() -> None:
    """Random clip pairs (both signs, crossed, tiny, huge) and special values, at every width."""
    gen = np.random.default_rng(0)
    pairs = [*CLIPS, (math.nan, -1.0), (1.0, math.nan), (3e38, -3e38)]
    pairs += [tuple(float(v) for v in gen.standard_normal(2) * 10.0 ** gen.integers(-8, 6)) for _ in range(300)]
    for bits in (2, 4, 8, 16):
        for clip_max, clip_min in pairs:
            host = ulq_grid(clip_max, clip_min, bits)
            tensor = _grid(torch.tensor([clip_max]), torch.tensor([clip_min]), bits, False)
            np.testing.assert_array_equal(np.array(host, dtype=np.float32), tensor.numpy(), err_msg=f"{bits} bits")


def _weights(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.1
    w.view(-1)[: w.numel() // 7] *= 30  # some channels with large values
    return w


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    ("shape", "axis"),
    [((16, 8, 3, 3), 0), ((8, 4, 3, 3), 1), ((10, 32), 0), ((10, 32), None), ((12,), 0), ((5, 6, 7), 2)],
)
def test_arq_fused_matches_tensor_ops(bits: int, shape: tuple[int, ...], axis: int | None) -> None:
    w = _weights(shape, bits)
    w.view(-1)[0] = math.nan  # a NaN channel quantizes to NaN on both paths
    if len(shape) > 1:
        w.select(axis or 0, 1).zero_()  # an all-zero channel: scale 1
    results = []
    for fused in (True, False):
        wt = w.clone().requires_grad_(True)
        with fused_cpu_kernels(fused):
            y = arq_fake_quant(wt, bits, axis)
            y.backward(torch.ones_like(y))
            plain = arq_fake_quant(w, bits, axis)
        results.append((y.detach(), wt.grad, plain))
    (y_fused, grad_fused, plain_fused), (y_ops, grad_ops, plain_ops) = results
    torch.testing.assert_close(y_fused, y_ops, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(plain_fused, y_ops, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(grad_fused, grad_ops) and torch.equal(grad_fused, torch.ones_like(w))


@pytest.mark.parametrize("axis", [0, None])
def test_arq_fused_range_of_special_values_matches_tensor_ops(axis: int | None) -> None:
    """The fused kernel finds a channel's range through integer order keys: infinities, NaN of
    either sign and zeros of either sign give the tensor path's scales."""
    w = _weights((7, 5), 0)
    w[0, 1], w[1, 3], w[2, 0], w[3, 4] = math.inf, -math.inf, -math.nan, math.nan
    w[4] = -0.0
    w[5] = torch.tensor([0.0, -0.0, 0.0, -0.0, 0.0])
    w[6] = torch.tensor([-1e-30, -3.0, 2.0, 1e-45, -0.0])  # the minimum's magnitude wins
    with fused_cpu_kernels(True):
        fused = arq_fake_quant(w, 8, axis)
    with fused_cpu_kernels(False):
        plain = arq_fake_quant(w, 8, axis)
    torch.testing.assert_close(fused, plain, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    ("shape", "axis", "layout"),
    [((16, 8, 3, 3), 0, "contiguous"), ((16, 8, 3, 3), 0, "channels-last"), ((10, 32), None, "contiguous")],
)
def test_arq_of_a_masked_weight_applies_the_mask_in_its_pass(shape: tuple, axis: int | None, layout: str) -> None:
    """A 4:2 mask multiplied in the fused pass gives what ``weight * mask`` then ARQ gives, the signs of
    the zeros included; a mask in another layout than the weight's takes the product first."""
    w = _weights(shape, 3)
    if axis is not None:
        w.view(-1)[5] = math.nan  # its channel quantizes to NaN
    mask = (torch.rand(shape, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    if layout == "channels-last":
        w, mask = (t.contiguous(memory_format=torch.channels_last) for t in (w, mask))
    expected = arq_quantized(w * mask, 8, axis)
    other_layout = mask.contiguous() if layout == "channels-last" else mask.transpose(0, 1).contiguous().transpose(0, 1)
    for given in (mask, other_layout):
        masked = arq_quantized(w, 8, axis, mask=given)
        torch.testing.assert_close(masked, expected, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(masked.signbit(), expected.signbit())
    assert ((expected == 0) & expected.signbit()).any()  # negative weights under a 0 of the mask: -0.0


def test_applies_only_to_contiguous_float32_cpu_tensors() -> None:
    x = torch.randn(4, 6)
    assert applies(x) and applies(x, torch.zeros(1))
    assert not applies(x.double()) and not applies(x.half())
    assert not applies(x.t()) and not applies(torch.empty(0, 3))
    with fused_cpu_kernels(False):
        assert not applies(x)
    assert applies(x)


def test_non_contiguous_input_takes_the_tensor_path_with_the_same_result() -> None:
    x = torch.randn(6, 10) * 2
    g = torch.randn(10, 6)
    clips = (torch.tensor([1.5], requires_grad=True), torch.tensor([-1.0], requires_grad=True))
    y = ulq_fake_quant(x.t(), *clips, 8)
    y.backward(g)
    ref = _ulq_run(x.t().contiguous(), g, 1.5, -1.0, 8, False, fused=True)
    assert torch.equal(y.detach(), ref[0])
    assert clips[0].grad.item() == pytest.approx(ref[2], abs=1e-4)


def test_kernels_compile_without_a_writable_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Numba raises at decoration when no cache directory is writable: compile per process then."""

    def no_locator(*args: object) -> None:
        raise RuntimeError("cannot cache function: no locator available")

    monkeypatch.setattr(numba.core.dispatcher, "FunctionCache", no_locator)

    @compiled()
    def twice(x: float) -> float:
        return 2 * x

    assert twice(1.5) == 3.0 and twice._cache.__class__.__name__ == "NullCache"
