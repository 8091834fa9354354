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

import torch
from torch import Tensor

from lightning_amct.quant.functional import arq_passes, cpu_kernels
from lightning_amct.quant.functional.library import FakeQuantOperator
from lightning_amct.quant.functional.precision import compute_dtype, grid_tensors, int_range


#: ``(num_bits, channel_axis)`` of an ARQ weight quantizer, for a node that applies it itself
#: (:func:`arq_quantized`, with a straight-through gradient).
ArqSettings = tuple[int, int | None]


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
    k = grid_tensors(num_bits, w)
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

    The straight-through gradient comes from an autograd-recorded clone of ``w`` whose values
    are then quantized in place, outside autograd: a clone's backward is the identity and runs in
    the C++ engine, which costs less than a custom :class:`torch.autograd.Function` (measured
    15-30 microseconds a layer inside a training step). Contiguous float32 CPU weights are
    quantized by one fused kernel (:func:`~lightning_amct.quant.functional.cpu_kernels.arq_quantize`),
    bit-identical to the tensor operations that quantize the others. Under ``torch.compile`` it
    is the custom operator ``torch.ops.lightning_amct.arq_fake_quant``, whose plain tensor
    operations the compiler traces into the model's graph and fuses.

    Args:
        w: weights, any float dtype; the result has the same dtype.
        num_bits: bits of the grid.
        channel_axis: output-channel axis, or None for per tensor.
    """
    if torch.compiler.is_compiling():
        return _OPERATOR.operator(w, num_bits, channel_axis)
    if not (w.requires_grad and torch.is_grad_enabled()):
        return arq_quantized(w, num_bits, channel_axis)
    out = w.clone()
    values = out.detach()
    if _fused_applies(w, channel_axis):
        _quantize_fused(w, values, num_bits, channel_axis)
        return out
    scale = arq_scale(w, num_bits, channel_axis)
    if values.dtype == compute_dtype(values.dtype):
        q_lo, q_hi = int_range(num_bits)
        values.div_(scale).round_().clamp_(q_lo, q_hi).mul_(scale)
    else:  # the math runs in float32: quantize a float32 copy
        values.copy_(quantize_symmetric(w, scale, num_bits))
    return out


def arq_quantized(w: Tensor, num_bits: int, channel_axis: int | None, mask: Tensor | None = None) -> Tensor:
    """The values of :func:`arq_fake_quant` as a new tensor, without autograd; of ``w * mask`` with
    a ``mask`` of ``w``'s shape.

    The fused kernel where it applies (its data addresses passed directly; the mask applied in
    the same pass), else, and under ``torch.compile``, :func:`quantize_symmetric` with :func:`arq_scale`.
    """
    fused = not torch.compiler.is_compiling() and _fused_applies(w, channel_axis)
    if mask is not None and not (fused and mask.dtype == w.dtype and mask.stride() == w.stride() and mask.is_cpu):
        w, mask = w * mask, None
    if not fused:
        return quantize_symmetric(w, arq_scale(w, num_bits, channel_axis), num_bits)
    out = torch.empty_like(w)
    _quantize_fused(w, out, num_bits, channel_axis, mask)
    return out


def _fused_applies(w: Tensor, channel_axis: int | None) -> bool:
    """Whether the fused kernel serves ``w``: contiguous float32 on the CPU, or channels-last where
    the channels are those of axis 0 (or there are none), which that order keeps in runs too."""
    if cpu_kernels.applies(w):
        return True
    return channel_axis in (None, 0) and cpu_kernels.applies_elementwise(w)


def _quantize_fused(
    w: Tensor, out: Tensor, num_bits: int, channel_axis: int | None, mask: Tensor | None = None
) -> None:
    """ARQ of float32 CPU ``w`` (times ``mask``, of its layout) into ``out`` (same shape and layout)
    by the fused kernel: a contiguous ``w``, or one whose channel runs lie in order (:func:`_fused_applies`)."""
    outer, channels, inner = _channel_layout(w.shape, channel_axis)
    masked = 0 if mask is None else mask.data_ptr()
    arq_passes.quantize(w.data_ptr(), out.data_ptr(), outer, channels, inner, num_bits, masked)


def _operator_forward(w: Tensor, num_bits: int, channel_axis: int | None) -> Tensor:
    """:func:`arq_fake_quant`'s values in plain tensor operations: the ``lightning_amct::arq_fake_quant``
    operator, which the compiler traces into the model's graph (:mod:`~lightning_amct.quant.functional.library`)."""
    return quantize_symmetric(w, arq_scale(w, num_bits, channel_axis), num_bits)


_OPERATOR = FakeQuantOperator(
    "arq_fake_quant",
    _operator_forward,
    backward=lambda ctx, grad: (grad, None, None),  # straight through
    setup_context=lambda ctx, inputs, output: None,
)


def _channel_layout(shape: torch.Size, channel_axis: int | None) -> tuple[int, int, int]:
    """``(outer, channels, inner)``: a contiguous tensor of ``shape`` as 3-D around ``channel_axis``."""
    if channel_axis is None:
        return 1, 1, math.prod(shape)
    axis = channel_axis % len(shape)
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])
