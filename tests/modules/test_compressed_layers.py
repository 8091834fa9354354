"""Compressed layers: same Parameters, same results as the plain layer with Qw(W ⊙ mask), reversible."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_amct.modules.compressed_layers import COMPRESSED_CLASSES
from lightning_amct.prune.selective import n_out_of_m_mask
from lightning_amct.quant import ArqWeightQuantizer
from lightning_amct.quant.functional import arq_fake_quant

LAYERS = [
    (lambda: nn.Linear(12, 6), (5, 12)),
    (lambda: nn.Linear(12, 6, bias=False), (2, 3, 12)),
    (lambda: nn.Conv1d(8, 6, 3, stride=2, padding=1), (2, 8, 11)),
    (lambda: nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, bias=False), (2, 8, 7, 7)),
    (lambda: nn.Conv2d(4, 6, (1, 3), stride=(2, 1)), (2, 4, 6, 6)),
    (lambda: nn.Conv3d(4, 4, 2, groups=2), (1, 4, 4, 4, 4)),
    (lambda: nn.ConvTranspose1d(6, 4, 3, stride=2, output_padding=1), (2, 6, 5)),
    (lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, groups=2, dilation=1), (2, 8, 5, 5)),
]


def _reference(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The plain layer's forward with another weight (a copy of the layer, weight replaced)."""
    clone = type(layer)(**_ctor_args(layer))
    clone.load_state_dict(layer.state_dict())
    with torch.no_grad():
        clone.weight.copy_(weight)
    return clone(x)


def _ctor_args(layer: nn.Module) -> dict:
    if isinstance(layer, nn.Linear):
        return {"in_features": layer.in_features, "out_features": layer.out_features, "bias": layer.bias is not None}
    args = {k: getattr(layer, k) for k in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                                             "dilation", "groups")}  # fmt: skip
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        args["output_padding"] = layer.output_padding
    return {**args, "bias": layer.bias is not None}


@pytest.mark.parametrize(("make", "shape"), LAYERS)
def test_wrapping_shares_parameters_and_round_trips(make, shape) -> None:
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(shape)
    expected = layer(x)
    cls = COMPRESSED_CLASSES[type(layer)]
    wrapped = cls.from_float(layer)
    assert isinstance(wrapped, type(layer))
    assert wrapped.weight is layer.weight and wrapped.bias is layer.bias
    torch.testing.assert_close(wrapped(x), expected, rtol=0, atol=0)
    plain = wrapped.to_float()
    assert type(plain) is type(layer) and plain.weight is layer.weight
    assert set(plain.state_dict()) == set(layer.state_dict())


@pytest.mark.parametrize(("make", "shape"), LAYERS)
@pytest.mark.parametrize("channel_wise", [True, False])
def test_weight_quantization_uses_the_output_channel_axis(make, shape, channel_wise: bool) -> None:
    torch.manual_seed(1)
    layer = make()
    cls = COMPRESSED_CLASSES[type(layer)]
    axis = cls.out_axis if channel_wise else None
    wrapped = cls.from_float(layer, weight_quant=ArqWeightQuantizer(4, channel_axis=axis))
    x = torch.randn(shape)
    expected = _reference(layer, x, arq_fake_quant(layer.weight.detach(), 4, axis))
    torch.testing.assert_close(wrapped(x), expected)


def test_mask_schedule_counts_training_batches_only() -> None:
    torch.manual_seed(2)
    layer = COMPRESSED_CLASSES[nn.Linear].from_float(nn.Linear(8, 4), mask_update_freq=3)
    x = torch.randn(2, 8)
    for batch in range(8):
        with torch.no_grad():
            layer.weight.copy_(torch.randn_like(layer.weight))  # the dense weights keep moving
        before = layer.weight_mask.clone()
        layer.train()
        layer(x)
        if batch in (0, 3, 6):
            torch.testing.assert_close(layer.weight_mask, n_out_of_m_mask(layer.weight.detach(), 1))
            assert not torch.equal(layer.weight_mask, before) or batch == 0
        else:
            torch.testing.assert_close(layer.weight_mask, before)
        layer.eval()
        layer(x)  # eval forwards never count
    assert int(layer.mask_batches) == 8


def test_a_layer_called_twice_a_forward_counts_one_batch_and_trains() -> None:
    torch.manual_seed(4)
    shared = COMPRESSED_CLASSES[nn.Linear].from_float(nn.Linear(8, 8), mask_update_freq=1)
    optimizer = torch.optim.SGD(shared.parameters(), lr=0.5)
    masks = []
    for _ in range(3):  # each call once re-chose the mask that the other call had saved for backward
        optimizer.zero_grad()
        shared(torch.relu(shared(torch.randn(4, 8)))).square().sum().backward()
        masks.append(shared.weight_mask.clone())
        torch.testing.assert_close(shared.weight_mask, n_out_of_m_mask(shared.weight.detach(), 1))
        optimizer.step()
    assert int(shared.mask_batches) == 3 and not torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("stepped", [False, True], ids=["copied-after-a-forward", "copied-after-a-step"])
def test_a_copy_counts_the_mask_batches_its_original_counts(stepped: bool) -> None:
    """A deep copy's or an unpickled layer's Parameters start new version counters: the copy counts the
    next batch exactly where the original does, so that both keep one mask schedule."""
    torch.manual_seed(5)
    layer = COMPRESSED_CLASSES[nn.Linear].from_float(nn.Linear(8, 4), mask_update_freq=2).train()
    x = torch.randn(2, 8)
    layer(x)
    if stepped:
        with torch.no_grad():
            layer.weight.add_(0.5)  # an optimizer step: the next forward counts a batch
    copies = [copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))]
    for model in (layer, *copies):
        model(x)
    assert [int(model.mask_batches) for model in (layer, *copies)] == [1 + stepped] * 3


def test_masked_weights_get_no_gradient_but_keep_their_values() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 4, 3)
    original = conv.weight.detach().clone()
    layer = COMPRESSED_CLASSES[nn.Conv2d].from_float(conv, mask_update_freq=0)
    layer(torch.randn(2, 8, 5, 5)).sum().backward()
    mask = layer.weight_mask
    assert torch.all(conv.weight.grad[mask == 0] == 0)
    assert torch.all(conv.weight.grad[mask == 1] != 0)
    torch.testing.assert_close(conv.weight.detach(), original, rtol=0, atol=0)
    assert mask.sum() == mask.numel() // 2


def test_mask_counter_survives_a_state_dict_round_trip() -> None:
    make = lambda: COMPRESSED_CLASSES[nn.Linear].from_float(nn.Linear(8, 4), mask_update_freq=0)  # noqa: E731
    first = make()
    first(torch.randn(1, 8))
    second = make()
    second.load_state_dict(first.state_dict())
    with torch.no_grad():
        second.weight.mul_(-3).add_(1)
    mask = second.weight_mask.clone()
    second(torch.randn(1, 8))  # not the first batch any more: no refresh
    torch.testing.assert_close(second.weight_mask, mask)


def test_wrong_layer_class_is_refused() -> None:
    with pytest.raises(TypeError, match="expects Conv2d, got Linear"):
        COMPRESSED_CLASSES[nn.Conv2d].from_float(nn.Linear(2, 2))


def test_functional_op_matches_for_linear_with_quantized_weight() -> None:
    torch.manual_seed(4)
    linear = nn.Linear(6, 3)
    wrapped = COMPRESSED_CLASSES[nn.Linear].from_float(linear, weight_quant=ArqWeightQuantizer(8, None))
    x = torch.randn(4, 6)
    torch.testing.assert_close(wrapped(x), F.linear(x, arq_fake_quant(linear.weight.detach(), 8, None), linear.bias))
