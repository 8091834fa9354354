"""A layer over its ULQ-quantized input as one autograd node, for training on the CPU.

A compressed layer computes ``op(Qa(x), W, b)``. As two autograd nodes, the quantizer's and the
layer's, the layer keeps ``y = Qa(x)`` for its weight gradient (as integer codes,
:mod:`~lightning_amct.quant.functional.saved_codes`, to save memory), and a training step pays
for both nodes, the codes in the forward pass and rebuilding ``y`` from them in the backward. One
node does less:

* forward: ``y`` from one fused pass (no codes), then the layer; it keeps ``x``, which the
  quantizer's backward needs anyway (and a ReLU before the layer keeps already), and ``W``;
* backward: ``dL/dy`` from the layer's backward-data pass, then one fused pass over ``x`` and
  ``dL/dy`` writes ``dL/dx`` over ``dL/dy``, the clip-gradient sums and ``y`` again
  (:func:`~lightning_amct.quant.functional.ulq.ulq_backward_rebuilding`); the weight and bias
  gradients come last, from that ``y``.

The kernels and the torch operations (:mod:`~lightning_amct.modules.layer_ops`) are those of the
two nodes, so every output and gradient is theirs bit for bit, the clip gradients included. The
grid must be a host grid (:func:`~lightning_amct.quant.functional.ulq.ulq_grid` with
``on_host``), and ``x`` float32 CPU data in contiguous or channels-last order, the fused kernels'
domain (:func:`~lightning_amct.quant.functional.cpu_kernels.applies_elementwise`).

Example:
    >>> import torch
    >>> from lightning_amct.modules.layer_ops import Affine
    >>> from lightning_amct.quant.functional.ulq import ulq_grid
    >>> x = torch.tensor([[0.2, -1.5, 3.0]], requires_grad=True)
    >>> weight = torch.ones(2, 3, requires_grad=True)
    >>> clips = torch.tensor([2.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    >>> grid = ulq_grid(*clips, 8, False, on_host=True)
    >>> out = ulq_layer(Affine(transposed=False), x, weight, None, *clips, grid, 8)
    >>> out.sum().backward()
    >>> x.grad
    tensor([[2., 0., 0.]])
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from lightning_amct.modules.layer_ops import LayerOp
from lightning_amct.quant.functional import cpu_kernels
from lightning_amct.quant.functional.arq import ArqSettings
from lightning_amct.quant.functional.node_weight import masked_gradient, node_weight
from lightning_amct.quant.functional.ulq import (
    as_clip_gradients,
    clip_meta,
    ulq_backward_rebuilding,
    ulq_clip_gradients,
    ulq_forward,
)


def ulq_layer(
    op: LayerOp,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    clip_max: Tensor,
    clip_min: Tensor,
    grid: tuple[float, ...],
    num_bits: int,
    relu: bool = False,
    arq: ArqSettings | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """``op.forward(ulq_fake_quant(x, clip_max, clip_min, num_bits), weight, bias)`` as one autograd node.

    With ``arq``, ``(num_bits, channel_axis)`` of an ARQ weight quantizer, and with ``mask``, a 4:2
    mask, the node applies them to the weight too, ``Qw(weight ⊙ mask)``, and gives the gradient
    that their own nodes would give (:mod:`~lightning_amct.quant.functional.node_weight`).

    With ``relu``, of ``relu(x)`` instead: the ReLU before the layer is applied here, at no cost
    (:mod:`~lightning_amct.modules.input_relu`). The forward pass needs no change for it where
    the grid's lower bound is 0 (``fixed_min``), which maps every ``x <= 0`` to 0 as ReLU does;
    the backward pass computes ReLU's gradient on the way.

    Args:
        op: the layer's operation.
        x: the layer's input, float32 on the CPU, contiguous or channels-last.
        weight: the layer's (compressed) weight.
        bias: the layer's bias, or None.
        clip_max: upper clip of the quantizer, one element.
        clip_min: lower clip, one element.
        grid: the host grid of the clips (the clips must not change before backward).
        num_bits: bits of the grid.
        relu: quantize ``relu(x)``.
        arq: quantize the weight with ARQ here: ``(num_bits, channel_axis)``; None: ``weight`` is used as it is.
        mask: multiply the weight by this mask (of its shape) first; None: no mask.

    Raises:
        ValueError: ``relu`` on a grid whose lower bound is not 0.
    """
    if relu and grid[2] != 0.0 and grid[2] == grid[2]:
        raise ValueError(f"a ReLU applied in the layer needs a grid from 0 (fixed_min), got the lower bound {grid[2]}")
    out = _UlqLayer.apply(x, weight, bias, clip_max, clip_min, op, grid, num_bits, relu, arq, mask)
    return out if out.dim() == x.dim() else out.view(*x.shape[:-1], out.shape[-1])


class _UlqLayer(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        clip_max: Tensor,
        clip_min: Tensor,
        op: LayerOp,
        grid: tuple[float, ...],
        num_bits: int,
        relu: bool,
        arq: ArqSettings | None,
        mask: Tensor | None,
    ) -> Tensor:
        weight = node_weight(weight, mask, arq)
        y, _ = ulq_forward(x, grid, num_bits, keep_codes=False)
        ctx.op, ctx.grid, ctx.num_bits, ctx.relu = op, grid, num_bits, relu
        ctx.bias_shape = None if bias is None else tuple(bias.shape)
        ctx.clip_meta = clip_meta(clip_max, clip_min)
        ctx.save_for_backward(x, weight, mask)
        out = op.forward(y, weight, bias)
        # F.linear views its flat product for an input of three dimensions or more, and a view
        # that an autograd Function returns cannot be modified in place (wav2vec2 writes over
        # masked time steps of a Linear's output): the node returns the product, ulq_layer views it
        return out if out._base is None else out._base

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mask = ctx.saved_tensors
        need_x, need_weight, need_bias, need_max, need_min = ctx.needs_input_grad[:5]
        op, grid = ctx.op, ctx.grid
        grad_x, clip_gradients = None, [None, None]
        if need_x or need_max or need_min:
            # a new buffer in x's layout: dL/dx goes over it
            grad_y = cpu_kernels.in_layout_of(op.input_gradient(grad, x, weight), x)
            grad_x, y, sums = ulq_backward_rebuilding(x, grad_y, grid, ctx.num_bits, ctx.relu)
            totals = ulq_clip_gradients(sums, grid, ctx.num_bits)
            clip_gradients = as_clip_gradients(totals, ctx.clip_meta, (need_max, need_min))
        else:
            y, _ = ulq_forward(x, grid, ctx.num_bits, keep_codes=False)
        grad_weight, grad_bias = op.parameter_gradients(grad, y, weight, ctx.bias_shape, (need_weight, need_bias))
        grad_weight = masked_gradient(grad_weight, mask)
        return grad_x if need_x else None, grad_weight, grad_bias, *clip_gradients, None, None, None, None, None, None
