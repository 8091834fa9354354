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

from typing import Union

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from lightning_amct.quant.functional import cpu_kernels, ulq_passes
from lightning_amct.quant.functional.library import FakeQuantOperator
from lightning_amct.quant.functional.precision import as_dtype, compute_dtype, grid_tensors, int_range, round_scale_fp16
from lightning_amct.quant.functional.saved_codes import CodeStorage, attach_codes

#: ``(s, o, lo, hi, r_max, r_min)``: Python floats on the fused CPU path, else a ``(6,)`` float32 tensor.
Grid = Union[tuple[float, ...], Tensor]


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
    k = grid_tensors(num_bits, clip_max)
    lower = as_dtype(clip_min, torch.float32).clamp_max(0.0)
    scale = (as_dtype(clip_max, torch.float32).clamp_min(0.0) - lower).div_(k.levels)
    if force_fp16:
        scale = round_scale_fp16(scale)
    scale = torch.where(scale < k.eps, k.one, scale)
    # A degenerate range needs no second where: its width, below (2^n - 1) * 1.2e-7 (< 0.008 up
    # to 16 bits, also after float16 rounding), bounds |lower|, so with s = 1 the rounding below
    # gives exactly o = q_lo. addcdiv computes q_lo + (-lower)/s, which is q_lo - lower/s exactly.
    return scale, torch.addcdiv(k.q_lo, lower, scale, value=-1).round_()


def ulq_fake_quant(
    x: Tensor, clip_max: Tensor, clip_min: Tensor, num_bits: int, force_fp16: bool = False, *, keep_codes: bool = False
) -> Tensor:
    """ULQ fake quantization of ``x`` with gradients for ``x``, ``clip_max`` and ``clip_min``.

    ``y = (clamp(round(x/s + o), q_lo, q_hi) - o) * s`` with ``(s, o)`` from
    :func:`ulq_scale_offset`; the backward pass follows the module docstring's formulas exactly,
    except for the order of the floating-point sums in the clip gradients.

    Eager calls take fused CPU kernels or few-pass tensor operations (:class:`_UlqFakeQuant`);
    under ``torch.compile`` it is the custom operator ``torch.ops.lightning_amct.ulq_fake_quant``,
    whose plain tensor operations the compiler traces into the model's graph and fuses with the
    operations around them.

    Args:
        x: input, any float dtype and shape; ``y`` has the same dtype.
        clip_max: upper clip, one element (shape ``()`` or ``(1,)``).
        clip_min: lower clip, one element.
        num_bits: bits of the grid.
        force_fp16: round the scale to float16 precision.
        keep_codes: also keep the integer codes of ``y`` beside it (one or two bytes an element),
            so that a layer that saves ``y`` for its backward saves them instead
            (:func:`~lightning_amct.quant.functional.saved_codes.saving_codes`). For training.

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
    if torch.compiler.is_compiling():
        return _OPERATOR.operator(x, clip_max, clip_min, num_bits, force_fp16)
    return _UlqFakeQuant.apply(x, clip_max, clip_min, num_bits, force_fp16, keep_codes)


def ulq_grid(clip_max: Tensor, clip_min: Tensor, num_bits: int, force_fp16: bool, on_host: bool) -> Grid:
    """The grid ``(s, o, lo, hi, r_max, r_min)`` of :func:`ulq_fake_quant`'s forward and backward.

    ``on_host``: the clips are CPU tensors and the data takes the fused kernels, which want
    Python floats: the clips are read as floats (no synchronisation on the CPU) and the grid comes
    from :func:`~lightning_amct.quant.functional.cpu_kernels.ulq_grid`, in float32 like the tensor
    grid (:func:`_grid`) except with ``force_fp16``, which numba cannot round: that grid is
    computed with tensors and read back.
    """
    if not on_host:
        return _grid(clip_max, clip_min, num_bits, force_fp16)
    if force_fp16:
        return tuple(_grid(clip_max, clip_min, num_bits, force_fp16).tolist())
    return cpu_kernels.ulq_grid(clip_max.item(), clip_min.item(), num_bits)


def ulq_forward(x: Tensor, grid: Grid, num_bits: int, keep_codes: bool) -> tuple[Tensor, Tensor | None]:
    """``y`` of :func:`ulq_fake_quant` on ``grid``, and its codes when ``keep_codes`` (None if none fit).

    A host grid takes the fused kernel (one pass, the codes written in the same pass); a tensor
    grid takes tensor operations, which keep the codes as float16 (exact up to 11 bits, NaN
    included) where that is smaller than ``y``.
    """
    q_lo, q_hi = int_range(num_bits)
    if isinstance(grid, tuple):
        y = torch.empty_like(x)
        codes = torch.empty_like(x, dtype=cpu_kernels.code_dtype(num_bits)) if keep_codes else None
        complete = ulq_passes.forward(
            x.data_ptr(),
            y.data_ptr(),
            0 if codes is None else codes.data_ptr(),
            num_bits > 8,
            x.numel(),
            grid[0],
            grid[1],
            q_lo,
            q_hi,
        )
        return y, codes if complete else None
    scale, offset = grid[:2].unbind()
    # addcdiv: o + x/s in one pass, the same two roundings as x/s then + o
    q = torch.addcdiv(offset, as_dtype(x, compute_dtype(x.dtype)), scale).round_().clamp_(q_lo, q_hi)
    codes = q.to(torch.float16) if keep_codes and num_bits <= 11 and x.element_size() > 2 else None
    return as_dtype(q.sub_(offset).mul_(scale), x.dtype), codes


def ulq_dequantize(codes: Tensor, grid: Grid, dtype: torch.dtype) -> Tensor:
    """The ``y`` whose codes :func:`ulq_forward` kept: ``(codes - o) * s``, bit for bit."""
    if isinstance(grid, tuple):
        y = torch.empty_like(codes, dtype=torch.float32)
        ulq_passes.dequantize(
            codes.data_ptr(), codes.dtype == torch.int16, y.data_ptr(), codes.numel(), grid[0], grid[1]
        )
        return y
    scale, offset = grid[:2].unbind()
    return as_dtype(codes.to(compute_dtype(dtype)).sub_(offset).mul_(scale), dtype)


def ulq_backward(x: Tensor, grad: Tensor, grid: Grid, need_sums: bool) -> tuple[Tensor, tuple | None]:
    """``dL/dx`` and (when ``need_sums``) ``(sum_U g, sum_L g, sum_inside g*r)``.

    A host grid takes the fused kernel (the sums come as Python floats, always computed);
    a tensor grid takes tensor operations (0-d tensors).
    """
    if isinstance(grid, tuple):
        grad = cpu_kernels.in_layout_of(as_dtype(grad, x.dtype), x)
        grad_x = torch.empty_like(x)
        sums = ulq_passes.backward(
            x.data_ptr(), grad.data_ptr(), grad_x.data_ptr(), x.numel(), grid[0], grid[2], grid[3]
        )
        return grad_x, sums
    return _tensor_backward(x, grad, grid, need_sums)


def ulq_backward_rebuilding(
    x: Tensor, grad: Tensor, grid: tuple, num_bits: int, relu: bool = False
) -> tuple[Tensor, Tensor, tuple]:
    """:func:`ulq_backward` on a host grid, ``dL/dx`` written over ``grad``, that also gives ``y``
    of :func:`ulq_forward` again, bit for bit: ``(dL/dx, y, sums)``, from one pass.

    For a layer that owns ``grad`` (in ``x``'s memory layout and dtype), needs ``y`` in its
    backward and did not keep it (:mod:`~lightning_amct.quant.functional.ulq_layer`). ``relu``:
    the quantizer read ``relu(x)``; the backward is that of ``ulq(relu(x))``, ReLU's gradient
    included.
    """
    y = torch.empty_like(x)
    q_lo, q_hi = int_range(num_bits)
    sums = ulq_passes.backward_rebuilding(x.data_ptr(), grad.data_ptr(), y.data_ptr(), x.numel(), grid, q_lo, q_hi, relu)
    return grad, y, sums


def ulq_clip_gradients(sums: tuple, grid: Grid, num_bits: int) -> tuple[Tensor | float, Tensor | float]:
    """``(dL/dclip_max, dL/dclip_min)`` from :func:`ulq_backward`'s sums (floats or 0-d tensors)."""
    above, below, inside_residual = sums
    # sum g*e + sum_U g*e_max + sum_L g*e_min, with e = residual / Q
    shared = (inside_residual + above * grid[4] + below * grid[5]) / (2**num_bits - 1)
    return above + shared, below - shared


def clip_meta(clip_max: Tensor, clip_min: Tensor) -> tuple:
    """``((shape, dtype), (shape, dtype))`` of the clips: what a backward needs to shape their
    gradients (:func:`as_clip_gradients`) without keeping the clip Parameters."""
    return (clip_max.shape, clip_max.dtype), (clip_min.shape, clip_min.dtype)


def as_clip_gradients(
    totals: tuple, meta: tuple, needed: tuple[bool, bool] = (True, True)
) -> list[Tensor | None]:
    """``(dL/dclip_max, dL/dclip_min)`` (0-d tensors or Python floats) as the clips' gradients.

    ``meta``: the clips' :func:`clip_meta`; each gradient takes its clip's shape and dtype, or is
    None where not ``needed``.
    """
    return [
        _as_gradient(total, shape, dtype) if need else None
        for total, (shape, dtype), need in zip(totals, meta, needed)
    ]


def ulq_clip_directions(x: Tensor, grid: Grid, num_bits: int, values: Tensor | None = None) -> Tensor:
    """``dy/dclip_max`` and ``dy/dclip_min`` element by element, stacked on a new second axis.

    ``dy/dclip_max = U + e`` and ``dy/dclip_min = L - e`` (the module docstring's terms), so that
    ``sum(g * d)`` is a clip's gradient for any upstream gradient ``g``. The result has shape
    ``(x.shape[0], 2, *x.shape[1:])``, float32 (the math dtype for float64); with ``values`` (a
    tensor of ``x``'s shape and the result's dtype) ``(x.shape[0], 3, *x.shape[1:])``, ``values``
    first: the three input channels of one weight-gradient pass over a one-channel input
    (:mod:`~lightning_amct.quant.functional.clip_adjoint`). A host grid takes the fused kernel,
    which writes all of it in one pass; a tensor grid takes tensor operations.
    """
    levels = 2**num_bits - 1
    if isinstance(grid, tuple):
        batch = x.shape[0]
        out = torch.empty((batch, 2 if values is None else 3, *x.shape[1:]), dtype=torch.float32)
        address = 0 if values is None else values.data_ptr()
        cpu_kernels.ulq_clip_directions_at(x.data_ptr(), address, out.data_ptr(), batch, x.numel() // batch, grid, levels)
        return out
    s, _, lo, hi, residual_max, residual_min = grid.unbind()
    work = as_dtype(x, compute_dtype(x.dtype))
    above, below = (work > hi).to(work.dtype), (work < lo).to(work.dtype)
    inside = 1 - above - below
    residual = _nan_as_zero(torch.div(work, s).round_().addcdiv_(work, s, value=-1))
    e = (residual * inside + above * residual_max + below * residual_min) / levels
    slots = (above + e, below - e) if values is None else (values, above + e, below - e)
    return torch.stack(slots, dim=1)


class _UlqFakeQuant(torch.autograd.Function):
    """The forward and backward of :func:`ulq_fake_quant`: fused CPU kernels, or tensor operations.

    Float32 CPU input, contiguous or channels-last, takes
    :mod:`~lightning_amct.quant.functional.cpu_kernels`: the grid's six scalars from the clips read
    as Python floats (CPU tensors: no synchronisation), then one pass each way, the kernels called
    with the tensors' addresses. Everything else (CUDA, other dtypes, strided layouts) takes
    tensor operations written for few passes and no host synchronisation: the grid is one small
    tensor (:func:`_grid`), the backward's three sums are ``torch.dot`` calls on flat views, two
    full-size buffers in all, and the constants are cached tensors
    (:func:`~lightning_amct.quant.functional.precision.grid_tensors`). Both paths give
    bit-identical outputs, and ``dL/dx`` for a finite ``dL/dy``; the clip gradients differ by
    summation order. An infinite ``dL/dy`` (a step that mixed precision's gradient scaler skips)
    comes out as NaN on the tensor path, which multiplies by masks, where the fused kernel selects
    (``dL/dy`` inside the grid, 0 outside).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        clip_max: Tensor,
        clip_min: Tensor,
        num_bits: int,
        force_fp16: bool,
        keep_codes: bool,
    ) -> Tensor:
        # The clip residuals are part of the grid, so backward does not keep the clip Parameters
        # (the module rewrites them in place at its next call).
        ctx.clip_meta = clip_meta(clip_max, clip_min)
        ctx.num_bits = num_bits
        on_host = cpu_kernels.applies_elementwise(x, clip_max, clip_min)
        grid = ulq_grid(clip_max, clip_min, num_bits, force_fp16, on_host)
        y, codes = ulq_forward(x, grid, num_bits, keep_codes)
        if codes is not None:
            attach_codes(y, CodeStorage(codes, grid, ulq_dequantize))
        if isinstance(grid, tuple):
            ctx.host_grid = grid
            ctx.save_for_backward(x)
        else:
            ctx.host_grid = None
            ctx.save_for_backward(x, grid)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        need_x, need_max, need_min = ctx.needs_input_grad[:3]
        x, *saved_grid = ctx.saved_tensors
        grid = ctx.host_grid if ctx.host_grid is not None else saved_grid[0]
        grad_x, sums = ulq_backward(x, grad, grid, need_max or need_min)
        grad_max = grad_min = None
        if need_max or need_min:
            totals = ulq_clip_gradients(sums, grid, ctx.num_bits)
            grad_max, grad_min = as_clip_gradients(totals, ctx.clip_meta, (need_max, need_min))
        return as_dtype(grad_x, grad.dtype) if need_x else None, grad_max, grad_min, None, None, None


def _operator_forward(x: Tensor, clip_max: Tensor, clip_min: Tensor, num_bits: int, force_fp16: bool) -> Tensor:
    """:func:`ulq_fake_quant`'s values, each formula once in plain tensor operations: the
    ``lightning_amct::ulq_fake_quant`` operator, which the compiler traces into the model's graph
    (:mod:`~lightning_amct.quant.functional.library`) and fuses with the BatchNorm and ReLU
    before it. (The fused CPU kernels are opaque to it, and the eager tensor path writes into
    buffers, which the compiler cannot fuse.) Values are those of the eager paths."""
    grid = _grid(clip_max, clip_min, num_bits, force_fp16)
    scale, offset = grid[0], grid[1]
    q_lo, q_hi = int_range(num_bits)
    work = as_dtype(x, compute_dtype(x.dtype))
    return as_dtype(((work / scale + offset).round().clamp(q_lo, q_hi) - offset) * scale, x.dtype)


def _operator_setup(ctx: FunctionCtx, inputs: tuple, output: Tensor) -> None:
    """Keeps ``x`` and the grid (not the clips, which the quantizer may rewrite before the backward)."""
    x, clip_max, clip_min, num_bits, force_fp16 = inputs
    ctx.clip_meta = clip_meta(clip_max, clip_min)
    ctx.num_bits = num_bits
    ctx.save_for_backward(as_dtype(x, compute_dtype(x.dtype)), _grid(clip_max, clip_min, num_bits, force_fp16))


def _operator_backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
    """The operator's backward: the mask, the residual and the three sums, which the compiler
    fuses into one pass. ``dL/dx`` is the eager paths'; the clip gradients differ by summation order."""
    work, grid = ctx.saved_tensors
    scale, _, lo, hi, _, _ = grid.unbind()
    g = as_dtype(grad, work.dtype)
    above, below = work > hi, work < lo
    grad_x = torch.where(above | below, 0.0, g)
    ratio = work / scale
    # an infinite x lies outside, where its residual (nan) does not count; a NaN x inside, as 0
    residual = _nan_as_zero(ratio.round() - ratio)
    sums = ((g * above).sum(), (g * below).sum(), (residual * grad_x).sum())
    grad_max, grad_min = as_clip_gradients(ulq_clip_gradients(sums, grid, ctx.num_bits), ctx.clip_meta)
    return as_dtype(grad_x, grad.dtype), grad_max, grad_min, None, None


_OPERATOR = FakeQuantOperator("ulq_fake_quant", _operator_forward, _operator_backward, _operator_setup)


def _grid(clip_max: Tensor, clip_min: Tensor, num_bits: int, force_fp16: bool) -> Tensor:
    """``[s, o, lo, hi, r_max, r_min]`` as one float32 tensor of shape ``(6,)``.

    ``(s, o)`` from :func:`ulq_scale_offset`, the grid bounds ``lo = s*(q_lo - o)``,
    ``hi = s*(q_hi - o)``, and the clips' residuals ``round(c/s) - c/s``.
    """
    k = grid_tensors(num_bits, clip_max)
    scale, offset = (_reshaped(t, _ONE) for t in ulq_scale_offset(clip_max, clip_min, num_bits, force_fp16))
    bounds = torch.sub(k.ends, offset).mul_(scale)
    ratios = as_dtype(torch.cat((_reshaped(clip_max, _ONE), _reshaped(clip_min, _ONE))), torch.float32).div_(scale)
    residuals = torch.round(ratios).sub_(ratios)
    return torch.cat((scale, offset, bounds, residuals))


def _tensor_backward(x: Tensor, grad: Tensor, grid: Tensor, need_sums: bool) -> tuple[Tensor, tuple | None]:
    """``dL/dx`` and (when ``need_sums``) the clip-gradient sums with tensor operations, as 0-d tensors."""
    s, _, lo, hi, _, _ = grid.unbind()
    work = as_dtype(x, compute_dtype(x.dtype)).reshape(-1)
    g = as_dtype(grad, work.dtype).reshape(-1)
    # U and L as 0/1 in the math dtype: float masks take the vectorised kernels (boolean
    # masks with where/masked_fill cost several times more). Two full-size buffers in all:
    # U's becomes U + L, then g - (U + L) * g = g * [not U and not L] (the same values, but
    # a zero may come out as +0 where the product gave -0); L's then holds the residual.
    g_inside = torch.gt(work, hi, out=torch.empty_like(work))
    below = torch.lt(work, lo, out=torch.empty_like(work))
    if need_sums:
        g_above = torch.dot(g_inside, g)
        g_below = torch.dot(below, g)
    torch.addcmul(g, g_inside.add_(below), g, value=-1, out=g_inside)
    grad_x = g_inside.view(x.shape)
    if not need_sums:
        return grad_x, None
    # round(x/s) - x/s in place: addcdiv_ subtracts x/s, divided again, exactly as sub_ of the
    # stored ratio would. nan_to_num_: an infinite x lies outside, where its residual (nan)
    # does not count; a NaN x lies inside, where its residual counts as 0.
    residual = torch.div(work, s, out=below).round_().addcdiv_(work, s, value=-1).nan_to_num_(0.0)
    return grad_x, (g_above, g_below, torch.dot(residual, g_inside))


def _nan_as_zero(residual: Tensor) -> Tensor:
    """``residual`` with NaN as 0: ``round(r) - r`` is finite or NaN (an infinite or NaN ``r``).

    A comparison and a select: under ``torch.compile`` they vectorise, where ``nan_to_num``
    becomes an element-by-element loop in the generated CPU code.
    """
    return torch.where(residual == residual, residual, 0.0)


def _as_gradient(value: Tensor | float, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """A clip's gradient in the clip's shape and dtype, from a 0-d tensor or a Python float."""
    if isinstance(value, Tensor):
        return as_dtype(_reshaped(value, shape), dtype)
    return torch.full(shape, value, dtype=dtype)


_ONE = torch.Size((1,))


def _reshaped(t: Tensor, shape: torch.Size) -> Tensor:
    """``t.reshape(shape)``, without the call when the shape already matches."""
    return t if t.shape == shape else t.reshape(shape)
