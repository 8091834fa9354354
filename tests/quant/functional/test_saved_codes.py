"""Saved codes give the weight gradient the exact quantized input, and stand aside where they must."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lightning_amct.quant.functional import ulq_fake_quant
from lightning_amct.quant.functional.saved_codes import saving_codes

pytestmark = pytest.mark.usefixtures("kernel_path")

CLIPS = (torch.tensor([1.0]), torch.tensor([-0.75]))


def _weight_gradient(x: torch.Tensor, num_bits: int, keep_codes: bool, change=None, wrap=None) -> torch.Tensor:
    """``dL/dw`` of ``sum(ulq(x) @ w)``; ``change`` edits ``ulq(x)`` in place, ``wrap`` runs the matmul."""
    w = torch.ones(x.shape[-1], 3, requires_grad=True)
    y = ulq_fake_quant(x, *CLIPS, num_bits, keep_codes=keep_codes)
    if change is not None:
        change(y)
    with saving_codes():
        out = wrap(torch.matmul, y, w) if wrap else torch.matmul(y, w)
    out.sum().backward()
    return w.grad


@pytest.mark.parametrize("num_bits", [4, 8, 12])
def test_weight_gradient_is_exact(num_bits: int) -> None:
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(num_bits))
    expected = _weight_gradient(x, num_bits, keep_codes=False)
    assert torch.equal(_weight_gradient(x, num_bits, keep_codes=True), expected)


def test_an_output_changed_in_place_is_saved_as_it_is() -> None:
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))

    def double(y: torch.Tensor) -> None:
        with torch.no_grad():
            y.mul_(2)

    assert torch.equal(_weight_gradient(x, 8, True, double), _weight_gradient(x, 8, False, double))


def test_nan_inputs_keep_their_nans() -> None:
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    x[1, 2] = float("nan")
    grad = _weight_gradient(x, 8, keep_codes=True)
    assert torch.equal(grad.isnan(), _weight_gradient(x, 8, keep_codes=False).isnan()) and grad.isnan().any()


def test_activation_checkpointing_sees_every_tensor() -> None:
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))

    def checkpointed(fn, *args):
        return checkpoint(fn, *args, use_reentrant=False)

    expected = _weight_gradient(x, 8, keep_codes=False)
    assert torch.equal(_weight_gradient(x, 8, keep_codes=True, wrap=checkpointed), expected)
