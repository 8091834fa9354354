"""arq_fake_quant's straight-through gradient and its paths with and without gradient recording."""

from __future__ import annotations

import pytest
import torch

from lightning_amct.quant.functional import arq_fake_quant, arq_scale
from lightning_amct.quant.functional.arq import quantize_symmetric

pytestmark = pytest.mark.usefixtures("kernel_path")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_recorded_result_equals_the_plain_quantization(dtype: torch.dtype) -> None:
    w = (torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(1)) * 0.2).to(dtype)
    expected = quantize_symmetric(w, arq_scale(w, 8, 0), 8)
    w.requires_grad_(True)
    y = arq_fake_quant(w, 8, 0)
    assert y.requires_grad and y.dtype == dtype
    assert torch.equal(y.detach(), expected)
    g = torch.randn(6, 3, 3, 3).to(dtype)
    y.backward(g)
    assert torch.equal(w.grad, g)


def test_result_does_not_alias_the_weight() -> None:
    w = torch.randn(4, 5, requires_grad=True)
    expected = arq_fake_quant(w.detach(), 4, 0)
    y = arq_fake_quant(w, 4, 0)
    with torch.no_grad():
        w.mul_(2)
    assert torch.equal(y.detach(), expected)


def test_without_gradient_recording_returns_a_plain_tensor() -> None:
    w = torch.randn(4, 5, requires_grad=True)
    with torch.no_grad():
        y = arq_fake_quant(w, 8, None)
    assert not y.requires_grad and y.grad_fn is None
    assert torch.equal(y, arq_fake_quant(w.detach(), 8, None))
    with torch.inference_mode():
        assert torch.equal(arq_fake_quant(w, 8, None), y)
