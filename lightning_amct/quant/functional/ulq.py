"""ULQ activation fake quantization: asymmetric, per tensor, with learnable clips.

With n bits, ``Q = 2^n - 1``, ``[q_lo, q_hi] = [-2^(n-1), 2^(n-1) - 1]``:

* scale and offset: ``M = max(clip_max, 0)``, ``m = min(clip_min, 0)``, ``s = (M - m)/Q``,
  ``o = round(-2^(n-1) - m/s)``; when ``s < 1.1920929e-7``: ``s = 1``, ``o = -2^(n-1)``.
* forward: ``y = (clamp(round(x/s + o), q_lo, q_hi) - o) * s``.
* backward, with ``g = dL/dy``, ``lo = s*(q_lo - o)``, ``hi = s*(q_hi - o)``, ``U = [x > hi]``,
  ``L = [x < lo]``, ``x^ = clip_max`` on U, ``clip_min`` on L, else ``x``, and
  ``e = (round(x^/s) - x^/s)/Q``::

      dL/dclip_max = sum(g * (e + U))
      dL/dclip_min = sum(g * (L - e))
      dL/dx        = g * [not U and not L]

``round`` is round-half-to-even. The validity restore of the clips and ``fixed_min`` are state of
:class:`~lightning_amct.quant.ActivationQuantizer`, not of these functions.

Example:
    >>> import torch
    >>> x = torch.tensor([-1.0, 0.3, 2.0], requires_grad=True)
    >>> clip_max = torch.tensor([1.0], requires_grad=True)
    >>> clip_min = torch.tensor([-1.0], requires_grad=True)
    >>> y = ulq_fake_quant(x, clip_max, clip_min, num_bits=4)
    >>> y
    tensor([-0.9333,  0.2667,  1.0667], grad_fn=<_UlqFakeQuantBackward>)
    >>> y.sum().backward()
    >>> x.grad
    tensor([0., 1., 0.])
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from lightning_amct.quant.functional.precision import SCALE_EPS, compute_dtype, int_range, round_scale_fp16


def ulq_scale_offset(
    clip_max: Tensor, clip_min: Tensor, num_bits: int, force_fp16: bool = False
) -> tuple[Tensor, Tensor]:
    """Scale and offset of the ULQ grid for the clip range ``[clip_min, clip_max]``.

    ``s = (max(clip_max, 0) - min(clip_min, 0)) / (2^n - 1)``, rounded to float16 precision when
    ``force_fp16``; ``s < 1.1920929e-7`` gives ``s = 1, o = -2^(n-1)``; otherwise
    ``o = round(-2^(n-1) - min(clip_min, 0)/s)``. No host synchronisation.

    Args:
        clip_max: upper clip, any float dtype (computed in float32).
        clip_min: lower clip, same shape.
        num_bits: bits of the grid.
        force_fp16: round the scale to float16 precision
            (``fakequant_precision_mode: FORCE_FP16_QUANT``); the offset is computed from the
            rounded scale.

    Returns:
        ``(scale, offset)``: float32 tensors with the clips' shape; the offset holds integers.

    Example:
        >>> ulq_scale_offset(torch.tensor(6.0), torch.tensor(-2.0), num_bits=8)
        (tensor(0.0314), tensor(-64.))
    """
    q_lo, _ = int_range(num_bits)
    levels = 2**num_bits - 1
    lower = clip_min.float().clamp(max=0.0)
    scale = (clip_max.float().clamp(min=0.0) - lower) / levels
    if force_fp16:
        scale = round_scale_fp16(scale)
    degenerate = scale < SCALE_EPS
    scale = torch.where(degenerate, 1.0, scale)
    offset = torch.where(degenerate, float(q_lo), torch.round(q_lo - lower / scale))
    return scale, offset


def ulq_fake_quant(x: Tensor, clip_max: Tensor, clip_min: Tensor, num_bits: int, force_fp16: bool = False) -> Tensor:
    """ULQ fake quantization of ``x`` with gradients for ``x``, ``clip_max`` and ``clip_min``.

    ``y = (clamp(round(x/s + o), q_lo, q_hi) - o) * s`` with ``(s, o)`` from
    :func:`ulq_scale_offset`; the backward pass follows the module docstring's formulas exactly.

    Args:
        x: input, any float dtype and shape; ``y`` has the same dtype.
        clip_max: upper clip, one element (shape ``()`` or ``(1,)``).
        clip_min: lower clip, one element.
        num_bits: bits of the grid.
        force_fp16: round the scale to float16 precision.

    Returns:
        The fake-quantized tensor.

    Raises:
        ValueError: a clip has more than one element.
    """
    if clip_max.numel() != 1 or clip_min.numel() != 1:
        raise ValueError(
            f"ULQ clips are per tensor: clip_max and clip_min must have one element each, "
            f"got shapes {tuple(clip_max.shape)} and {tuple(clip_min.shape)}"
        )
    return _UlqFakeQuant.apply(x, clip_max, clip_min, num_bits, force_fp16)


class _UlqFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, clip_max: Tensor, clip_min: Tensor, num_bits: int, force_fp16: bool
    ) -> Tensor:
        scale, offset = ulq_scale_offset(clip_max.detach(), clip_min.detach(), num_bits, force_fp16)
        s, o = scale.reshape(()), offset.reshape(())
        q_lo, q_hi = int_range(num_bits)
        levels = 2**num_bits - 1
        # The clip residuals are computed now, so that backward does not keep the clip Parameters
        # (the module rewrites them in place at its next call).
        clip_ratios = torch.stack([clip_max.detach().reshape(()), clip_min.detach().reshape(())]).float() / s
        e_max, e_min = ((torch.round(clip_ratios) - clip_ratios) / levels).unbind()
        ctx.save_for_backward(x, s, o, e_max, e_min)
        ctx.num_bits = num_bits
        ctx.clip_meta = ((clip_max.shape, clip_max.dtype), (clip_min.shape, clip_min.dtype))
        y = x.to(compute_dtype(x.dtype)) / s
        return y.add_(o).round_().clamp_(q_lo, q_hi).sub_(o).mul_(s).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, s, o, e_max, e_min = ctx.saved_tensors
        q_lo, q_hi = int_range(ctx.num_bits)
        work = x.to(compute_dtype(x.dtype))
        g = grad.to(work.dtype)
        # U, L and [not U and not L] as 0/1 in the math dtype: float masks take the vectorised
        # kernels (boolean masks with where/masked_fill cost several times more), and the
        # in-place updates keep the number of full-size temporaries at five.
        above = torch.gt(work, s * (q_hi - o), out=torch.empty_like(work))
        below = torch.lt(work, s * (q_lo - o), out=torch.empty_like(work))
        g_inside = torch.sub(1, above).sub_(below).mul_(g)
        grad_x = g_inside.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_max = grad_min = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            ratio = work / s
            # nan_to_num_: an infinite x lies outside, where its residual (nan) does not count
            residual = torch.round(ratio).sub_(ratio).nan_to_num_(0.0).mul_(g_inside)
            inner = residual.sum() / (2**ctx.num_bits - 1)
            g_above = above.mul_(g).sum()
            g_below = below.mul_(g).sum()
            (max_shape, max_dtype), (min_shape, min_dtype) = ctx.clip_meta
            grad_max = (inner + g_above * (e_max + 1) + g_below * e_min).to(max_dtype).reshape(max_shape)
            grad_min = (g_below * (1 - e_min) - g_above * e_max - inner).to(min_dtype).reshape(min_shape)
        return grad_x, grad_max, grad_min, None, None
