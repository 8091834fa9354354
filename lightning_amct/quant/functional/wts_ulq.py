"""WtsULQ weight fake quantization: ARQ's symmetric grid with a learned scale.

With n bits, ``[q_lo, q_hi] = [-2^(n-1), 2^(n-1) - 1]`` and a learned scale ``s`` per output
channel (or one per tensor):

* forward: ``w_q = clamp(round(w / s), q_lo, q_hi) * s``, as ARQ;
* backward, with ``g = dL/dw_q``::

      dL/dw   = g                                         (straight-through)
      dL/ds_c = kappa * sum_{i in c} g_i * r_i,   kappa = 1 / sqrt(K * q_hi)
      r_i     = round(w_i/s) - w_i/s   if q_lo*s <= w_i <= q_hi*s
                q_lo                   if w_i < q_lo*s
                q_hi                   if w_i > q_hi*s

  ``K`` is the number of elements that share the scale: elements per output channel, or all the
  elements for a per-tensor scale.

A scale below 1.1920929e-7 (only reachable by training it there) is used as 1, like ARQ's
degenerate scale, and receives no gradient.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.5, -1.0], [0.25, 0.1]], requires_grad=True)
    >>> s = torch.tensor([0.1, 0.03], requires_grad=True)
    >>> w_q = wts_ulq_fake_quant(w, s, num_bits=4, channel_axis=0)
    >>> w_q.detach()
    tensor([[ 0.5000, -0.8000],
            [ 0.2100,  0.0900]])
    >>> w_q.sum().backward()
    >>> s.grad
    tensor([-2.1381,  1.7817])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from lightning_amct.quant.functional.arq import quantize_symmetric, reduce_dims, scale_view_shape
from lightning_amct.quant.functional.library import FakeQuantOperator
from lightning_amct.quant.functional.precision import SCALE_EPS, as_dtype, compute_dtype, int_range


def wts_ulq_effective_scale(scale: Tensor) -> Tensor:
    """The scale the forward uses: ``scale`` as float32, with values below ``1.1920929e-7`` as 1."""
    return _settled(scale)[0]


def _settled(scale: Tensor) -> tuple[Tensor, Tensor]:
    """``(effective scale, where the scale was degenerate)``, in ``scale``'s shape."""
    s = as_dtype(scale.detach(), torch.float32)
    degenerate = s < SCALE_EPS
    return torch.where(degenerate, 1.0, s), degenerate


def wts_ulq_fake_quant(w: Tensor, scale: Tensor, num_bits: int, channel_axis: int | None) -> Tensor:
    """WtsULQ fake quantization of ``w`` with the learned ``scale``; gradients for both.

    Args:
        w: weights, any float dtype; the result has the same dtype.
        scale: one scale per channel on ``channel_axis`` (any shape with that many elements, e.g.
            ``(C,)`` or the shape of :func:`~lightning_amct.quant.functional.arq.arq_scale`), or
            one element when ``channel_axis`` is None. Its gradient has its shape.
        num_bits: bits of the grid.
        channel_axis: output-channel axis (0 for Linear/Conv, 1 for ConvTranspose), or None.

    Raises:
        ValueError: ``scale`` does not have one element per channel.
    """
    view = scale_view_shape(w, channel_axis)
    if scale.numel() != math.prod(view):
        raise ValueError(
            f"WtsULQ scale has {scale.numel()} elements, expected {math.prod(view)} "
            f"(weight shape {tuple(w.shape)}, channel_axis={channel_axis})"
        )
    return _OPERATOR(w, scale, num_bits, channel_axis)


def _effective_scale(w: Tensor, scale: Tensor, channel_axis: int | None) -> tuple[Tensor, Tensor]:
    """``(s, degenerate)``: :func:`wts_ulq_effective_scale` shaped to broadcast over ``w``, and
    where the scale was degenerate."""
    view = scale_view_shape(w, channel_axis)
    return tuple(t.reshape(view) for t in _settled(scale))


def _operator_forward(w: Tensor, scale: Tensor, num_bits: int, channel_axis: int | None) -> Tensor:
    """:func:`wts_ulq_fake_quant`'s values: the ``lightning_amct::wts_ulq_fake_quant`` operator
    (:mod:`~lightning_amct.quant.functional.library`)."""
    return quantize_symmetric(w, _effective_scale(w, scale, channel_axis)[0], num_bits)


def _operator_setup(ctx: FunctionCtx, inputs: tuple, output: Tensor) -> None:
    """Keeps ``w``, the effective scale and where it was degenerate (that channel's scale gets no gradient)."""
    w, scale, num_bits, channel_axis = inputs
    ctx.save_for_backward(w, *_effective_scale(w, scale, channel_axis))
    ctx.num_bits = num_bits
    ctx.channel_axis = channel_axis
    ctx.scale_meta = (scale.shape, scale.dtype)


def _operator_backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
    """The module docstring's gradients: straight through for ``w``, ``kappa * sum(g * r)`` per
    channel for the scale."""
    grad_scale = None
    if ctx.needs_input_grad[1]:
        w, s, degenerate = ctx.saved_tensors
        q_lo, q_hi = int_range(ctx.num_bits)
        work = w.detach().to(compute_dtype(w.dtype))
        # [w < q_lo*s] and [w > q_hi*s] as 0/1 floats (faster than boolean masks with where);
        # r_i = residual*inside + q_lo*below + q_hi*above, with in-place updates
        below = torch.lt(work, q_lo * s, out=torch.empty_like(work))
        above = torch.gt(work, q_hi * s, out=torch.empty_like(work))
        ratio = work / s
        residual = torch.round(ratio).sub_(ratio)
        inside = torch.sub(1, below, out=ratio).sub_(above)
        residual.mul_(inside).add_(below, alpha=q_lo).add_(above, alpha=q_hi)
        kappa = 1.0 / math.sqrt(w.numel() // s.numel() * q_hi)
        dims = reduce_dims(w.dim(), ctx.channel_axis)
        weighted = residual.mul_(grad)
        summed = weighted.sum(dim=dims, keepdim=True) if dims else weighted
        shape, dtype = ctx.scale_meta
        grad_scale = (summed * kappa).masked_fill_(degenerate, 0).to(dtype).reshape(shape)
    grad_w = grad if ctx.needs_input_grad[0] else None
    return grad_w, grad_scale, None, None


_OPERATOR = FakeQuantOperator("wts_ulq_fake_quant", _operator_forward, _operator_backward, _operator_setup)
