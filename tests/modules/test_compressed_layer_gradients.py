"""Compressed layers' training step equals the fake-quant formulas, whichever way the backward is taken.

A layer that alone reads its input quantizes it inside its own autograd node and rebuilds the
quantized input in its backward; one whose quantizer is shared saves the quantized input as integer
codes; a first convolution over few channels takes its input quantizer's clip gradients from a
weight-gradient pass. Outputs, input and weight gradients stay bit-identical to the plain
composition of the fake-quant functions; clip gradients equal up to summation order.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_amct.modules.compressed_layers import COMPRESSED_CLASSES, CompressedLinear, compressed_class
from lightning_amct.quant import ActivationQuantizer, ArqWeightQuantizer
from lightning_amct.quant.functional import arq_fake_quant, ulq_fake_quant

pytestmark = pytest.mark.usefixtures("kernel_path")

LAYERS = {
    "conv2d-1-channel": (lambda: nn.Conv2d(1, 6, 3, padding=1), (4, 1, 9, 9)),
    "conv2d-3-channels-strided": (
        lambda: nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2, bias=False),
        (2, 3, 11, 11),
    ),
    "conv1d-2-channels": (lambda: nn.Conv1d(2, 4, 5, padding=1), (3, 2, 16)),
    "conv2d-8-channels": (lambda: nn.Conv2d(8, 4, 3), (2, 8, 6, 6)),
    "conv2d-depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (2, 6, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(5, 3, 2, stride=(1, 2, 1)), (2, 5, 4, 5, 3)),
    "linear": (lambda: nn.Linear(12, 5, bias=False), (7, 12)),
    "linear-3d-input": (lambda: nn.Linear(12, 5), (2, 3, 12)),
    "linear-4d-input": (lambda: nn.Linear(12, 5), (2, 2, 3, 12)),
}


def _layer_and_input_shape(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A layer of :data:`LAYERS`, or GPT-2's ``Conv1D`` (``"gpt2-conv1d"``), and its input's shape."""
    if name == "gpt2-conv1d":
        return pytest.importorskip("transformers.pytorch_utils").Conv1D(5, 12), (2, 3, 12)
    make, shape = LAYERS[name]
    return make(), shape


def _plain(layer: nn.Module, x: torch.Tensor, clips: list[torch.Tensor], axis: int | None) -> torch.Tensor:
    quantized = ulq_fake_quant(x, *clips, 8)
    weight = arq_fake_quant(layer.weight, 8, axis)
    if isinstance(layer, nn.Linear):
        return F.linear(quantized, weight, layer.bias)
    return layer._conv_forward(quantized, weight, layer.bias)


@pytest.mark.parametrize("input_needs_grad", [False, True])
@pytest.mark.parametrize("name", list(LAYERS))
def test_step_matches_the_fake_quant_formulas(name: str, input_needs_grad: bool) -> None:
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make()
    x = torch.rand(shape) * 3 - 1  # beyond both clips
    grad = torch.randn(_plain(layer, x, [torch.tensor([1.5]), torch.tensor([-0.5])], None).shape)
    cls = COMPRESSED_CLASSES[type(layer)]
    quantizer = ActivationQuantizer(8, fixed_min=False, init_clip=(1.5, -0.5)).train()
    compressed = cls.from_float(layer, act_quant=quantizer, weight_quant=ArqWeightQuantizer(8, channel_axis=0))

    results = []
    for run in ("compressed", "plain"):
        layer.zero_grad()
        quantizer.zero_grad()
        inputs = x.clone().requires_grad_(input_needs_grad)
        clips = [quantizer.clip_max, quantizer.clip_min]
        out = compressed(inputs) if run == "compressed" else _plain(layer, inputs, clips, 0)
        out.backward(grad)
        results.append((out.detach(), inputs.grad, layer.weight.grad.clone(), *(c.grad.clone() for c in clips)))
    (out, grad_x, grad_w, *grad_clips), (plain_out, plain_x, plain_w, *plain_clips) = results
    assert torch.equal(out, plain_out)
    assert torch.equal(grad_w, plain_w)
    assert (grad_x is None) == (not input_needs_grad) and (grad_x is None or torch.equal(grad_x, plain_x))
    for clip_grad, plain_clip_grad in zip(grad_clips, plain_clips):
        torch.testing.assert_close(clip_grad, plain_clip_grad, rtol=1e-5, atol=1e-6 * float(grad.abs().sum()))


@pytest.mark.parametrize("name", list(LAYERS))
def test_under_autocast_the_step_is_that_of_the_formulas_in_autocast(name: str) -> None:
    """``precision="bf16-mixed"`` on the CPU: the layer's operation runs in bfloat16 as autocast
    casts it, and its backward meets gradients of that dtype."""
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make()
    x = torch.rand(shape) * 3 - 1
    quantizer = ActivationQuantizer(8, fixed_min=False, init_clip=(1.5, -0.5)).train()
    compressed = COMPRESSED_CLASSES[type(layer)].from_float(layer, quantizer, ArqWeightQuantizer(8, channel_axis=0))
    results = []
    for run in ("compressed", "plain"):
        layer.zero_grad()
        quantizer.zero_grad()
        clips = [quantizer.clip_max, quantizer.clip_min]
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = compressed(inputs) if run == "compressed" else _plain(layer, inputs, clips, 0)
        out.float().square().sum().backward()
        results.append((out, inputs.grad, layer.weight.grad, *(c.grad for c in clips)))
    assert results[0][0].dtype == torch.bfloat16
    for compressed_value, plain_value in zip(*results):
        torch.testing.assert_close(compressed_value, plain_value, rtol=0, atol=0)


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "4:2"])
@pytest.mark.parametrize("input_needs_grad", [False, True])
@pytest.mark.parametrize("name", [*LAYERS, "gpt2-conv1d"])
def test_one_node_equals_the_quantizer_and_layer_nodes_bit_for_bit(
    name: str, input_needs_grad: bool, masked: bool
) -> None:
    """A layer alone on its input (one node, which applies the 4:2 mask and ARQ itself) against the
    same layer with a shared quantizer (two nodes, codes; the mask and ARQ as nodes of their own)."""
    torch.manual_seed(1)
    layer, shape = _layer_and_input_shape(name)
    x = torch.rand(shape) * 3 - 1
    x[(0,) * len(shape)] = 1.5  # on the upper clip
    results = []
    for shared in (False, True):
        quantizer = ActivationQuantizer(8, fixed_min=False, init_clip=(1.5, -0.5)).train()
        compressed = compressed_class(layer).from_float(
            layer, quantizer, ArqWeightQuantizer(8, channel_axis=None), mask_update_freq=0 if masked else None
        )
        compressed.input_shared = shared
        layer.zero_grad()
        inputs = x.clone().requires_grad_(input_needs_grad)
        out = compressed(inputs)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        grads = [inputs.grad, *(p.grad for p in (*layer.parameters(), quantizer.clip_max, quantizer.clip_min))]
        results.append((out.detach(), *grads))
    for one_node, two_nodes in zip(*results):
        assert (one_node is None) == (two_nodes is None)
        assert one_node is None or torch.equal(one_node, two_nodes)
    if masked:  # pruned weights get no gradient (a mask keeps 2 of every 4 input channels, all of 2 or fewer)
        pruned = compressed.weight_mask == 0
        assert pruned.any() == (compressed.weight.shape[compressed.in_axis] > 2)
        assert not layer.weight.grad[pruned].any()


def test_one_node_keeps_special_values_as_the_two_nodes_do() -> None:
    torch.manual_seed(2)
    layer = nn.Linear(6, 3)
    x = torch.rand(4, 6) * 3 - 1
    x[0, :5] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0])
    results = []
    for shared in (False, True):
        quantizer = ActivationQuantizer(8, fixed_min=False, init_clip=(1.5, -0.5)).train()
        compressed = CompressedLinear.from_float(layer, quantizer, ArqWeightQuantizer(8, channel_axis=0))
        compressed.input_shared = shared
        layer.zero_grad()
        inputs = x.clone().requires_grad_()
        out = compressed(inputs)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), inputs.grad, layer.weight.grad, layer.bias.grad, quantizer.clip_max.grad))
    for one_node, two_nodes in zip(*results):
        torch.testing.assert_close(one_node, two_nodes, rtol=0, atol=0, equal_nan=True)
    grad_x, grad_w = results[0][1], results[0][2]
    assert grad_x[0, 0] == grad_x[0, 1] == 0 and grad_x[0, 2] != 0  # the infinities lie outside, NaN inside
    assert torch.isnan(grad_w).any()


@pytest.mark.parametrize("name", ["linear-3d-input", "linear-4d-input", "gpt2-conv1d"])
def test_one_node_output_can_be_written_in_place(name: str) -> None:
    """wav2vec2 writes a learned vector over the masked time steps of a Linear's output, in place:
    the one-node layer's output takes it (it is not a view made inside the node), and the
    gradients are the two nodes' bit for bit."""
    torch.manual_seed(3)
    layer, shape = _layer_and_input_shape(name)
    x = torch.rand(shape) * 3 - 1
    embed = nn.Parameter(torch.randn(5))
    results = []
    for shared in (False, True):
        quantizer = ActivationQuantizer(8, fixed_min=False, init_clip=(1.5, -0.5)).train()
        compressed = compressed_class(layer).from_float(layer, quantizer, ArqWeightQuantizer(8, channel_axis=None))
        compressed.input_shared = shared
        layer.zero_grad()
        embed.grad = None
        inputs = x.clone().requires_grad_()
        out = compressed(inputs)
        out[..., 1, :] = embed
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        grads = [inputs.grad, embed.grad, *(p.grad for p in (*layer.parameters(), quantizer.clip_max))]
        results.append((out.detach(), *grads))
    for one_node, two_nodes in zip(*results):
        assert torch.equal(one_node, two_nodes)
    assert not results[0][1][..., 1, :].any()  # the overwritten rows pass no gradient back
