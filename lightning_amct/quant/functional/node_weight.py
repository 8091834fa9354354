"""The weight that a fused layer node applies itself: ``Qw(W ⊙ mask)``, and its gradient ``dL/dW_q ⊙ mask``.

A compressed layer's weight passes a 4:2 mask and an ARQ weight quantizer before the layer uses
it. As autograd nodes those are a multiplication, whose backward multiplies the gradient by the
mask again, and ARQ's straight-through node. The nodes that run a layer with its input quantizer
(:mod:`~lightning_amct.quant.functional.ulq_layer`,
:mod:`~lightning_amct.quant.functional.clip_adjoint`) apply both inside their own forward with
:func:`node_weight` and mask the weight gradient in their backward with :func:`masked_gradient`:
the same values and gradients bit for bit, without a node of their own (about 20 µs a layer and
a training step on the CPU).

Example:
    >>> import torch
    >>> w, mask = torch.tensor([[0.5, -1.0, 0.25, 0.1]]), torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    >>> node_weight(w, mask, (4, 0))
    tensor([[ 0.5000, -1.0000,  0.0000,  0.0000]])
    >>> masked_gradient(torch.ones(1, 4), mask)
    tensor([[1., 1., 0., 0.]])
"""

from __future__ import annotations

from torch import Tensor

from lightning_amct.quant.functional import cpu_kernels
from lightning_amct.quant.functional.arq import ArqSettings, arq_quantized


def node_weight(weight: Tensor, mask: Tensor | None, arq: ArqSettings | None) -> Tensor:
    """``weight ⊙ mask`` (``weight`` without a mask), quantized by ARQ with ``arq``'s
    ``(num_bits, channel_axis)`` (as it is without), as a new tensor without autograd."""
    if arq is not None:
        return arq_quantized(weight, *arq, mask=mask)  # the mask applied in ARQ's pass where it can
    return weight if mask is None else weight * mask


def masked_gradient(grad_weight: Tensor | None, mask: Tensor | None) -> Tensor | None:
    """The gradient of the weight before :func:`node_weight` from that of its result, a tensor
    that the caller owns (it is multiplied in place): ARQ's gradient is straight through, the
    mask's multiplies by the mask."""
    if grad_weight is None or mask is None:
        return grad_weight
    if cpu_kernels.applies(grad_weight, mask) and grad_weight.shape == mask.shape:
        cpu_kernels.multiply_in_place_at(grad_weight.data_ptr(), mask.data_ptr(), mask.numel())
        return grad_weight
    return grad_weight.mul_(mask)
