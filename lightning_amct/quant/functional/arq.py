"""ARQ weight fake quantization: symmetric, offset 0, scale recomputed from the weights.

With n bits, ``[q_lo, q_hi] = [-2^(n-1), 2^(n-1) - 1]``, and ``max``/``min`` of the weights over
one output channel (or the whole tensor)::

    s = |max| / q_hi        if |max| >= |min|
    s = |min| / 2^(n-1)     otherwise;      s < 1.1920929e-7  ->  s = 1
    w_q = clamp(round(w / s), q_lo, q_hi) * s

The gradient is straight-through: ``dL/dw = dL/dw_q``. The output channel is axis 0 for Linear and
Conv weights and axis 1 for ConvTranspose weights ``(C_in, C_out/groups, ...)``: the caller says
which with ``channel_axis``.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.5, -1.0], [0.25, 0.1]])
    >>> arq_scale(w, num_bits=4, channel_axis=0)
    tensor([[0.1250],
            [0.0357]])
    >>> arq_fake_quant(w, num_bits=4, channel_axis=0)
    tensor([[ 0.5000, -1.0000],
            [ 0.2500,  0.1071]])
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from lightning_amct.quant.functional import cpu_kernels
from lightning_amct.quant.functional.precision import compute_dtype, grid_tensors, int_range


def reduce_dims(ndim: int, channel_axis: int | None) -> tuple[int, ...]:
    """The dims to reduce for one scale per channel on ``channel_axis`` (all dims when None).

    Empty for a 1-D tensor with a channel axis; note that torch reduces *all* dims for ``dim=()``,
    so callers skip the reduction then.

    Example:
        >>> reduce_dims(4, 1)
        (0, 2, 3)
    """
    if channel_axis is None:
        return tuple(range(ndim))
    axis = channel_axis % ndim
    return tuple(d for d in range(ndim) if d != axis)


def scale_view_shape(w: Tensor, channel_axis: int | None) -> tuple[int, ...]:
    """Shape that broadcasts one scale per channel (or one in all) against ``w``.

    Example:
        >>> scale_view_shape(torch.zeros(8, 3, 5, 5), 0)
        (8, 1, 1, 1)
    """
    shape = [1] * w.dim()
    if channel_axis is not None:
        axis = channel_axis % w.dim()
        shape[axis] = w.shape[axis]
    return tuple(shape)


def arq_scale(w: Tensor, num_bits: int, channel_axis: int | None) -> Tensor:
    """ARQ scale of ``w``: one per channel on ``channel_axis``, or one for the tensor when None.

    Args:
        w: weights, any float dtype.
        num_bits: bits of the grid.
        channel_axis: output-channel axis (0 for Linear/Conv, 1 for ConvTranspose), or None for a
            per-tensor scale.

    Returns:
        float32 scales of shape :func:`scale_view_shape` (broadcastable to ``w``).
    """
    k = grid_tensors(num_bits, w.device)
    w = w.detach()
    dims = reduce_dims(w.dim(), channel_axis)
    w_max = (w.amax(dim=dims, keepdim=True) if dims else w).float().abs()
    w_min = (w.amin(dim=dims, keepdim=True) if dims else w).float().abs()
    scale = torch.where(w_max >= w_min, w_max / k.q_hi, w_min / k.half)
    return torch.where(scale < k.eps, k.one, scale)


def quantize_symmetric(w: Tensor, scale: Tensor, num_bits: int) -> Tensor:
    """``clamp(round(w / s), q_lo, q_hi) * s`` in ``w``'s dtype (no autograd semantics of its own).

    Args:
        w: values to quantize.
        scale: positive float32 scales broadcastable to ``w``.
        num_bits: bits of the grid.
    """
    q_lo, q_hi = int_range(num_bits)
    out = w.detach().to(compute_dtype(w.dtype)) / scale
    return out.round_().clamp_(q_lo, q_hi).mul_(scale).to(w.dtype)


def arq_fake_quant(w: Tensor, num_bits: int, channel_axis: int | None) -> Tensor:
    """ARQ fake quantization of ``w`` with a straight-through gradient.

    The straight-through gradient comes from an autograd-recorded clone of ``w`` whose values are
    then quantized in place, outside autograd: a clone's backward is the identity and runs in
    the C++ engine, which costs far less than a custom :class:`torch.autograd.Function` (a Python
    call in forward and in backward), the dominant cost of quantizing small weights. Contiguous
    float32 CPU weights are quantized by one fused kernel
    (:func:`~lightning_amct.quant.functional.cpu_kernels.arq_quantize`), bit-identical to the
    tensor operations, into a fresh tensor; there a Function passes the gradient straight
    through, since the kernel replaces a dozen operations and the clone's copy would cost more
    than the Function's Python calls.

    Args:
        w: weights, any float dtype; the result has the same dtype.
        num_bits: bits of the grid.
        channel_axis: output-channel axis, or None for per tensor.
    """
    if cpu_kernels.applies(w):
        return _FusedArq.apply(w, num_bits, channel_axis)
    scale = arq_scale(w, num_bits, channel_axis)
    if not (w.requires_grad and torch.is_grad_enabled()):
        return quantize_symmetric(w, scale, num_bits)
    out = w.clone()
    values = out.detach()
    if values.dtype == compute_dtype(values.dtype):
        q_lo, q_hi = int_range(num_bits)
        values.div_(scale).round_().clamp_(q_lo, q_hi).mul_(scale)
    else:  # the math runs in float32: quantize a float32 copy
        values.copy_(quantize_symmetric(w, scale, num_bits))
    return out


class _FusedArq(torch.autograd.Function):
    """:func:`~lightning_amct.quant.functional.cpu_kernels.arq_quantize` with a straight-through gradient."""

    @staticmethod
    def forward(ctx: FunctionCtx, w: Tensor, num_bits: int, channel_axis: int | None) -> Tensor:
        out = torch.empty_like(w)
        cpu_kernels.arq_quantize(_channel_view(w, channel_axis), _channel_view(out, channel_axis), num_bits)
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad, None, None


def _channel_view(w: Tensor, channel_axis: int | None) -> np.ndarray:
    """A contiguous tensor as a 3-D numpy view ``(outer, channels, inner)`` around ``channel_axis``."""
    if channel_axis is None:
        return cpu_kernels.flat(w).reshape(1, 1, -1)
    axis = channel_axis % w.dim()
    return cpu_kernels.flat(w).reshape(math.prod(w.shape[:axis]), w.shape[axis], -1)
