"""ArqWeightQuantizer and UlqWeightQuantizer: thin wrappers, ARQ initialisation, resume."""

from __future__ import annotations

import pytest
import torch

from lightning_amct.quant import (
    ArqWeightQuantizer,
    UlqWeightQuantizer,
    arq_fake_quant,
    arq_scale,
    wts_ulq_fake_quant,
)


@pytest.mark.parametrize(("shape", "axis"), [((6, 3, 3, 3), 0), ((3, 6, 3, 3), 1), ((6, 5), None)])
def test_arq_quantizer_wraps_the_function(shape: tuple, axis: int | None) -> None:
    w = torch.randn(shape, requires_grad=True)
    q = ArqWeightQuantizer(4, axis)
    assert torch.equal(q(w), arq_fake_quant(w, 4, axis))
    scale = q.scale(w)
    assert scale.shape == ((shape[axis],) if axis is not None else (1,)) and not scale.requires_grad
    assert torch.equal(scale, arq_scale(w, 4, axis).reshape(-1))
    assert list(q.parameters()) == [] and q.state_dict() == {}


@pytest.mark.parametrize(("shape", "axis", "channels"), [((6, 3, 3, 3), 0, 6), ((3, 6, 3), 1, 6), ((6, 5), None, 1)])
def test_ulq_quantizer_initialises_by_arq_then_learns(shape: tuple, axis: int | None, channels: int) -> None:
    w = torch.randn(shape, requires_grad=True)
    q = UlqWeightQuantizer(8, axis, channels)
    assert q.scale.shape == (channels,) and not q.initialized
    y = q(w)
    assert q.initialized and torch.equal(q.scale.detach(), arq_scale(w, 8, axis).reshape(-1))
    assert torch.equal(y, arq_fake_quant(w, 8, axis))
    y.sum().backward()
    assert q.scale.grad is not None and q.scale.grad.shape == (channels,)
    with torch.no_grad():
        q.scale.mul_(0.5)  # an optimizer step: no re-initialisation
        w.mul_(3)
    assert torch.equal(q(w), wts_ulq_fake_quant(w, q.scale, 8, axis))


def test_ulq_quantizer_does_not_reinitialise_after_loading() -> None:
    w = torch.randn(4, 3)
    trained = UlqWeightQuantizer(8, 0, 4)
    trained(w)
    with torch.no_grad():
        trained.scale.mul_(1.7)
    fresh = UlqWeightQuantizer(8, 0, 4)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh(w * 5), trained(w * 5))
    assert torch.equal(fresh.scale, trained.scale)


def test_ulq_quantizer_loading_an_uninitialised_state_initialises_again() -> None:
    q = UlqWeightQuantizer(8, 0, 2)
    q(torch.randn(2, 3))
    q.load_state_dict(UlqWeightQuantizer(8, 0, 2).state_dict())
    w = torch.randn(2, 3)
    q(w)
    assert torch.equal(q.scale.detach(), arq_scale(w, 8, 0).reshape(-1))


def test_ulq_effective_scale_guards_degenerate_scales() -> None:
    q = UlqWeightQuantizer(8, 0, 2)
    q(torch.randn(2, 3))
    with torch.no_grad():
        q.scale[0] = 0.0
    assert q.effective_scale()[0] == 1.0 and q.effective_scale()[1] == q.scale[1]


def test_ulq_quantizer_rejects_a_weight_with_other_channels() -> None:
    q = UlqWeightQuantizer(8, 0, 5)
    with pytest.raises(ValueError, match="built for 5"):
        q(torch.randn(4, 3))


@pytest.mark.parametrize("make", [lambda: ArqWeightQuantizer(1, 0), lambda: UlqWeightQuantizer(8, 0, 0)])
def test_bad_arguments(make) -> None:
    with pytest.raises(ValueError):
        make()
