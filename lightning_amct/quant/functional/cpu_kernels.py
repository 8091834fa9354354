"""Fused CPU kernels for the fake-quant ops: one pass over the data where tensor ops take a dozen.

A fake-quant op written with tensor operations reads and writes its activation about sixteen
times (forward and backward) and pays a few microseconds of dispatch for each of some forty
operations; on the CPU that made INT8 training of a small network 1.4x slower than float. These
kernels, compiled by numba when first called (and cached on disk), do the same work in one pass
each:

* :func:`ulq_grid`: the grid's six scalars from the two clips (a dozen tensor operations), and
  :func:`ulq_settled_grid_at` the clips' validity check and record before it;
* :func:`ulq_forward`: ``y = (clamp(round(x/s + o), q_lo, q_hi) - o) * s``, and optionally the
  integer codes ``clamp(round(x/s + o), q_lo, q_hi)`` in one byte (two above 8 bits), which is
  all a layer needs to keep of ``y`` for its backward (:func:`ulq_dequantize` gives ``y`` back);
* :func:`ulq_backward`: ``dL/dx`` and the three sums the clip gradients need;
  :func:`ulq_backward_rebuilding` also ``y`` again, for a layer that did not keep it;
* :func:`ulq_clip_directions`: ``dy/dclip_max`` and ``dy/dclip_min`` element by element, for a
  layer that computes its clip gradients without ``dL/dy`` (see
  :mod:`~lightning_amct.quant.functional.clip_adjoint`), and :func:`split_weight_gradient`, which
  turns that layer's weight gradient along them into the two clip gradients;
* :func:`arq_quantize`: the ARQ scale of every channel and the quantized weights.

They follow ``docs/algorithms.md`` operation by operation in float32 (no fast-math in anything
that produces a value: ``x/s`` is a division, ``round`` is round-half-to-even), so their outputs
are bit-identical to the tensor-op path, which stays in use for CUDA, other dtypes and strided
layouts. Only the order of the backward's sums differs (float32 accumulators, reassociated).

The kernels are single-threaded; :mod:`~lightning_amct.quant.functional.ulq_passes` runs ULQ's
passes over large tensors chunk by chunk on torch's own threads, and
:mod:`~lightning_amct.quant.functional.arq_passes` ARQ over large weights channel run by channel run
(:mod:`~lightning_amct.quant.functional.omp_team`; numba's thread pools would compete with them).

Each kernel takes numpy arrays; the ``*_at`` entry points take the tensors' data addresses
(``Tensor.data_ptr()``), element counts and plain scalars instead, since turning a tensor into a
numpy array (or passing numba any other Python object) costs more than a whole kernel call on a
small activation. Addresses also leave the storage as it is: ``Tensor.numpy()`` would mark it as
never resizable again, and FSDP2 frees the storage of the whole parameters it gathers for a
forward (``resize_(0)``) once the forward is over, which a weight quantized here must allow. :func:`applies` says whether tensors
take this path, :func:`applies_elementwise` whether an activation in channels-last order does
(the elementwise passes serve any dense order); :func:`fused_cpu_kernels` turns the path off (for
comparisons and tests).

Example:
    >>> import numpy as np
    >>> x = np.array([0.3, -2.0, 5.0], dtype=np.float32)
    >>> y, codes = np.empty_like(x), np.empty(3, dtype=np.int8)
    >>> ulq_forward(x, y, codes, 0.25, 0.0, -8.0, 7.0)
    True
    >>> y, codes
    (array([ 0.25, -2.  ,  1.75], dtype=float32), array([ 1, -8,  7], dtype=int8))
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import numba
import numpy as np
import torch
from numba import types
from numba.extending import intrinsic
from torch import Tensor

from lightning_amct.quant.functional.precision import SCALE_EPS

_enabled = True


def compiled(**options: object) -> Callable[[Callable], Callable]:
    """``numba.njit(cache=True, nogil=True, **options)``: compiled on first call, cached on disk."""
    return lambda function: disk_cached(numba.njit, function, **options)


def disk_cached(compiler: Callable[..., Callable], function: Callable, **options: object) -> Callable:
    """``compiler(cache=True, nogil=True, **options)(function)`` (``numba.njit``, ``numba.cfunc(signature)``).

    Numba refuses ``cache=True`` where it can write no cache directory (neither beside the
    package nor in the user's cache): the function is then compiled without a disk cache, once per
    process, instead of failing.
    """
    try:
        return compiler(cache=True, nogil=True, **options)(function)
    except RuntimeError:
        return compiler(nogil=True, **options)(function)


def applies(*tensors: Tensor) -> bool:
    """Whether the fused kernels serve these tensors: all contiguous float32 on the CPU, not empty."""
    if not _enabled:
        return False
    for t in tensors:  # a plain loop: this runs on every fake-quant call
        if not (t.is_cpu and t.dtype is torch.float32 and t.is_contiguous() and t.numel() > 0):
            return False
    return True


def applies_elementwise(x: Tensor, *scalars: Tensor) -> bool:
    """Whether the elementwise kernels (ULQ's forward and backward passes) serve ``x`` and the
    one-element tensors ``scalars``: as :func:`applies`, except that ``x`` may also be dense in
    channels-last order (a model trained with ``memory_format=torch.channels_last``).

    Those kernels read and write memory in order, element by element, so any dense layout
    serves, provided every tensor of one pass has it: their outputs take ``x``'s
    (``torch.empty_like``), and a gradient that comes in another is copied into it first
    (:func:`in_layout_of`).

    Example:
        >>> image = torch.zeros(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
        >>> applies(image), applies_elementwise(image), applies_elementwise(image.transpose(2, 3))
        (False, True, False)
    """
    if not (_enabled and x.is_cpu and x.dtype is torch.float32 and x.numel() > 0):
        return False
    return (x.is_contiguous() or x.is_contiguous(memory_format=_channels_last(x))) and applies(*scalars)


def in_layout_of(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (of ``x``'s shape) with ``x``'s memory layout, copied only where it has another."""
    if t.stride() == x.stride():
        return t
    return t.contiguous(memory_format=torch.contiguous_format if x.is_contiguous() else _channels_last(x))


def _channels_last(x: Tensor) -> torch.memory_format:
    """The channels-last memory format for ``x``'s number of dimensions (4: images, 5: volumes)."""
    return torch.channels_last_3d if x.dim() == 5 else torch.channels_last


@contextlib.contextmanager
def fused_cpu_kernels(enabled: bool) -> Iterator[None]:
    """Turn the fused CPU kernels on or off inside the block (the tensor-op path runs instead).

    Example:
        >>> with fused_cpu_kernels(False):
        ...     applies(torch.zeros(3))
        False
    """
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def code_dtype(num_bits: int) -> torch.dtype:
    """The integer dtype that holds the codes of an n-bit grid: int8 up to 8 bits, else int16."""
    return torch.int8 if num_bits <= 8 else torch.int16


@compiled()
def ulq_grid(clip_max: float, clip_min: float, num_bits: int) -> tuple[float, float, float, float, float, float]:
    """ULQ's grid ``(s, o, lo, hi, r_max, r_min)`` from the clips, in float32 scalar arithmetic.

    The same operations as the tensor path (:func:`~lightning_amct.quant.functional.ulq._grid`)
    without ``force_fp16``: ``M = max(clip_max, 0)``, ``m = min(clip_min, 0)``,
    ``s = (M - m)/(2^n - 1)`` (1 when below ``SCALE_EPS``), ``o = round(q_lo - m/s)``, the bounds
    ``lo = s*(q_lo - o)``, ``hi = s*(q_hi - o)`` and the clips' residuals ``round(c/s) - c/s``.
    A NaN clip gives NaN, as there.
    """
    upper, lower = np.float32(clip_max), np.float32(clip_min)
    half = np.float32(2 ** (num_bits - 1))
    q_lo, q_hi = -half, half - np.float32(1.0)
    top = np.float32(0.0) if upper < 0 else upper
    bottom = np.float32(0.0) if lower > 0 else lower
    s = (top - bottom) / np.float32(2**num_bits - 1)
    if s < np.float32(SCALE_EPS):
        s = np.float32(1.0)
    o = np.rint(q_lo - bottom / s)
    ratio_max, ratio_min = upper / s, lower / s
    return s, o, s * (q_lo - o), s * (q_hi - o), np.rint(ratio_max) - ratio_max, np.rint(ratio_min) - ratio_min


@compiled()
def grid_code(xi: float, s: float, o: float, lo: float, hi: float) -> float:
    """``clamp(round(x/s + o), q_lo, q_hi)`` in float32 (NaN stays NaN)."""
    q = np.rint(xi / s + o)
    q = lo if q < lo else q
    return hi if q > hi else q


@compiled(fastmath={"reassoc"})
def _accumulate(total: float, value: float) -> float:
    """``total + value`` that the compiler may reorder, so that a loop summing with it vectorises."""
    return total + value


@compiled()
def ulq_forward(
    x: np.ndarray, y: np.ndarray, codes: np.ndarray, scale: float, offset: float, q_lo: float, q_hi: float
) -> bool:
    """``y = (clamp(round(x/s + o), q_lo, q_hi) - o) * s`` element by element, in float32.

    NaN stays NaN. ``x`` and ``y`` are 1-D float32 arrays of one size; the scalars are float32
    values (passed as Python floats). When ``codes`` (an integer array) has the size of ``x``, it
    receives the clamped integers too; returns whether they describe ``y`` completely (False:
    a NaN, which no integer holds; always True without codes).
    """
    s, o = np.float32(scale), np.float32(offset)
    lo, hi = np.float32(q_lo), np.float32(q_hi)
    if codes.size != x.size:
        for i in range(x.size):
            y[i] = (grid_code(x[i], s, o, lo, hi) - o) * s
        return True
    nan_probe = np.float32(0.0)
    for i in range(x.size):
        q = grid_code(x[i], s, o, lo, hi)
        y[i] = (q - o) * s
        nan_probe = _accumulate(nan_probe, q - q)  # 0, or NaN once a q is NaN
        codes[i] = np.int32(q if q >= lo else np.float32(0.0))  # converting NaN is undefined: 0
    return nan_probe == nan_probe


@compiled()
def ulq_dequantize(codes: np.ndarray, y: np.ndarray, scale: float, offset: float) -> None:
    """``y = (codes - o) * s`` in float32: the values :func:`ulq_forward` wrote beside the codes."""
    s, o = np.float32(scale), np.float32(offset)
    for i in range(codes.size):
        y[i] = (np.float32(codes[i]) - o) * s


@compiled(fastmath={"reassoc"})
def ulq_backward(
    x: np.ndarray, grad: np.ndarray, grad_x: np.ndarray, scale: float, lower: float, upper: float
) -> tuple[float, float, float]:
    """ULQ's backward in one pass: writes ``grad_x``, returns ``(sum_U g, sum_L g, sum_inside g*r)``.

    With ``U = [x > upper]``, ``L = [x < lower]`` (``lower = s*(q_lo - o)``, ``upper = s*(q_hi - o)``):
    ``grad_x = g`` where neither, else 0; ``r = round(x/s) - x/s``, counted as 0 where it is NaN
    (a NaN input, which lies inside). ``reassoc`` lets the three float32 sums vectorise; it
    changes only their order.
    """
    s, lo, hi = np.float32(scale), np.float32(lower), np.float32(upper)
    above = below = inside_residual = np.float32(0.0)
    for i in range(x.size):
        _, passed, terms = backward_terms(x[i], grad[i], s, lo, hi, False)
        grad_x[i] = passed
        above += terms[0]
        below += terms[1]
        inside_residual += terms[2]
    return above, below, inside_residual


@compiled(fastmath={"reassoc"})
def ulq_backward_rebuilding(
    x: np.ndarray,
    grad: np.ndarray,
    y: np.ndarray,
    scale: float,
    lower: float,
    upper: float,
    offset: float,
    q_lo: float,
    q_hi: float,
    relu: bool,
) -> tuple[float, float, float]:
    """:func:`ulq_backward` writing ``dL/dx`` over ``grad``, and the forward's output ``y`` again.

    For a layer that needs ``y`` in its backward and did not keep it, and owns ``grad``
    (:mod:`~lightning_amct.quant.functional.ulq_layer`): ``y`` is :func:`ulq_forward`'s output
    with ``offset``, ``q_lo`` and ``q_hi``. Writing over ``grad`` reads and writes one buffer where
    a separate ``grad_x`` would be one more (and, passed as an array that might alias ``grad``,
    would make the compiled loop check at run time, find the overlap and fall back to scalar code).

    ``relu``: ``x`` is the input of a ReLU whose output the quantizer read: everything is computed
    on ``relu(x)`` (0 for ``x <= 0``, NaN kept), and ``dL/dx`` takes ReLU's gradient too, as
    torch's ``threshold_backward`` does: 0 where ``relu(x) <= 0`` (not at NaN).
    """
    s, lo, hi = np.float32(scale), np.float32(lower), np.float32(upper)
    o, code_lo, code_hi = np.float32(offset), np.float32(q_lo), np.float32(q_hi)
    above = below = inside_residual = np.float32(0.0)
    for i in range(x.size):
        xi, passed, terms = backward_terms(x[i], grad[i], s, lo, hi, relu)
        grad[i] = passed
        y[i] = (grid_code(xi, s, o, code_lo, code_hi) - o) * s
        above += terms[0]
        below += terms[1]
        inside_residual += terms[2]
    return above, below, inside_residual


@compiled(inline="always")
def backward_terms(xi: float, gi: float, s: float, lo: float, hi: float, relu: bool) -> tuple:
    """One element of ULQ's backward: ``(x, dL/dx, (g on U, g on L, g*r inside))``, ``x`` as ReLU leaves it with ``relu``."""
    zero = np.float32(0.0)
    if relu:
        xi = zero if xi <= zero else xi
    is_above, is_below = xi > hi, xi < lo
    passed = zero if (is_above or is_below) else gi
    ratio = xi / s
    residual = np.rint(ratio) - ratio
    terms = (
        gi if is_above else zero,
        gi if is_below else zero,
        passed * residual if residual == residual else zero,
    )
    return xi, zero if (relu and xi <= zero) else passed, terms


@compiled()
def ulq_clip_directions(
    x: np.ndarray,
    values: np.ndarray,
    out: np.ndarray,
    scale: float,
    lower: float,
    upper: float,
    residual_max: float,
    residual_min: float,
    levels: float,
) -> None:
    """``dy/dclip_max = U + e`` and ``dy/dclip_min = L - e`` for ``x`` of shape ``(batch, n)``.

    ``out`` has shape ``(batch, 2, n)``: ``[:, 0]`` receives ``dy/dclip_max``, ``[:, 1]``
    ``dy/dclip_min``; or ``(batch, 3, n)``, ``[:, 0]`` then receiving ``values`` (``(batch, n)``,
    unused otherwise) and the directions following. ``e = r/Q`` with ``r`` the residual of
    :func:`ulq_backward` inside the grid (0 for NaN), the clip's residual ``r_max`` on ``U`` and
    ``r_min`` on ``L``: so that ``sum(g * dy/dclip)`` is a clip's gradient for an upstream gradient ``g``.
    """
    s, lo, hi, q = np.float32(scale), np.float32(lower), np.float32(upper), np.float32(levels)
    e_max, e_min = np.float32(residual_max) / q, np.float32(residual_min) / q
    first = out.shape[1] - 2
    for b in range(x.shape[0]):  # row by row, each in a function of its own: its loop vectorises
        if first:
            _copy(values[b], out[b, 0])
        _direction_row(x[b], out[b, first], out[b, first + 1], s, lo, hi, q, e_max, e_min)


@compiled()
def _direction_row(
    x: np.ndarray, d_max: np.ndarray, d_min: np.ndarray, s: float, lo: float, hi: float, q: float, e_max: float, e_min: float
) -> None:
    """:func:`ulq_clip_directions` of one row (float32 scalars): selects, no branches."""
    one, zero = np.float32(1.0), np.float32(0.0)
    for i in range(x.size):
        xi = x[i]
        above, below = xi > hi, xi < lo
        ratio = xi / s
        residual = np.rint(ratio) - ratio
        e = residual / q if residual == residual else zero
        e = e_max if above else (e_min if below else e)
        d_max[i] = one + e if above else e
        d_min[i] = one - e if below else -e


@compiled()
def _copy(source: np.ndarray, target: np.ndarray) -> None:
    for i in range(source.size):
        target[i] = source[i]


@compiled()
def split_weight_gradient(gradients: np.ndarray, weight: np.ndarray, grad_weight: np.ndarray) -> tuple[float, float]:
    """A weight gradient over ``[y, d_max, d_min]`` input channels, split (see ``clip_adjoint``).

    ``gradients`` has shape ``(out, slots, n)``: with 3 slots ``[:, 0]`` is the layer's own weight
    gradient, copied into ``grad_weight`` (``(out, n)``); the last two slots are the weight
    gradients along ``d_max`` and ``d_min``. Returns their dot products with ``weight``
    (``(out, n)``), the clips' gradients, summed in float64.
    """
    out, slots, size = gradients.shape
    along_max = along_min = 0.0
    for o in range(out):
        if slots == 3:
            grad_weight[o] = gradients[o, 0]
        for i in range(size):
            w = np.float64(weight[o, i])
            along_max += gradients[o, slots - 2, i] * w
            along_min += gradients[o, slots - 1, i] * w
    return along_max, along_min


@compiled()
def arq_quantize(w: np.ndarray, out: np.ndarray, num_bits: int, first: int, last: int, mask: np.ndarray) -> None:
    """ARQ per channel on the middle axis of 3-D float32 arrays ``(outer, channels, inner)``,
    channels ``first`` to ``last - 1``.

    For each channel: ``s = |max| / q_hi`` if ``|max| >= |min|`` else ``|min| / 2^(n-1)``;
    ``s < SCALE_EPS`` gives 1; a NaN in the channel makes ``s`` NaN, as ``amax`` would. Then
    ``out = clamp(round(w/s), q_lo, q_hi) * s``. With a ``mask`` of ``w``'s shape (not empty), of
    ``w * mask`` (a 4:2 mask), the product written into ``out`` first.
    """
    half = np.float32(2 ** (num_bits - 1))
    q_lo, q_hi = -half, half - np.float32(1.0)
    outer = w.shape[0]
    masked = mask.size != 0
    source = out if masked else w
    bits = source.view(np.int32)
    for c in range(first, last):
        if masked:
            for a in range(outer):
                _multiply_row(w[a, c], mask[a, c], out[a, c])
        key_max, key_min = _KEY_NEG_INF, _KEY_POS_INF
        for a in range(outer):
            key_max, key_min = _key_range(bits[a, c], key_max, key_min)
        if key_max > _KEY_POS_INF or key_min < _KEY_NEG_INF:  # NaN keys lie beyond the infinities'
            s = np.float32(np.nan)
        else:
            w_max, w_min = abs(_key_value(key_max)), abs(_key_value(key_min))
            s = w_max / q_hi if w_max >= w_min else w_min / half
            if s < np.float32(SCALE_EPS):
                s = np.float32(1.0)
        for a in range(outer):
            if masked:
                _quantize_row_in_place(out[a, c], s, q_lo, q_hi)
            else:
                _quantize_row(w[a, c], out[a, c], s, q_lo, q_hi)


@compiled()
def _quantize_row_in_place(values: np.ndarray, s: float, q_lo: float, q_hi: float) -> None:
    """:func:`_quantize_row` over one array: as two arguments that may alias, its loop would not vectorise."""
    for i in range(values.size):
        values[i] = _arq_value(values[i], s, q_lo, q_hi)


@compiled()
def _multiply_row(w: np.ndarray, mask: np.ndarray, out: np.ndarray) -> None:
    """``out = w * mask`` over 1-D float32 arrays."""
    for i in range(w.size):
        out[i] = w[i] * mask[i]


# Float32 values ordered as integers: the bits, with the magnitude bits flipped where the sign is set
# (then -0.0 < +0.0 and every NaN lies beyond the infinity of its sign). Integer maxima vectorise,
# where a floating-point maximum, which must respect NaN, is a chain of scalar comparisons.
_KEY_POS_INF, _KEY_NEG_INF = 0x7F800000, -0x7F800001


@compiled()
def _key_range(bits: np.ndarray, key_max: int, key_min: int) -> tuple[int, int]:
    """The largest and smallest order keys of the float32 values whose bits (int32) are ``bits``,
    and ``key_max``/``key_min``."""
    for i in range(bits.size):
        b = bits[i]
        key = b ^ ((b >> 31) & 0x7FFFFFFF)
        key_max = key if key > key_max else key_max
        key_min = key if key < key_min else key_min
    return key_max, key_min


@compiled()
def _key_value(key: int) -> float:
    """The float32 value of an order key of :func:`_key_range`."""
    bits = np.empty(1, np.int32)
    bits[0] = key if key >= 0 else key ^ 0x7FFFFFFF
    return bits.view(np.float32)[0]


@compiled()
def _quantize_row(w: np.ndarray, out: np.ndarray, s: float, q_lo: float, q_hi: float) -> None:
    """``out = clamp(round(w/s), q_lo, q_hi) * s`` over 1-D float32 arrays."""
    for i in range(w.size):
        out[i] = _arq_value(w[i], s, q_lo, q_hi)


@compiled(inline="always")
def _arq_value(w: float, s: float, q_lo: float, q_hi: float) -> float:
    q = np.rint(w / s)
    q = q_lo if q < q_lo else q
    return (q_hi if q > q_hi else q) * s


# Entry points by address: the same kernels over arrays that numba builds from the tensors' data
# pointers (numba.carray), so a call costs a dispatch of plain integers and floats.


@intrinsic
def pointer(typingctx: object, address: types.Type, element: types.Type) -> tuple:
    """``address`` (an integer) as a pointer to ``element`` values (a numba number class)."""
    pointer_type = types.CPointer(element.instance_type)

    def codegen(context: object, builder: object, signature: object, args: tuple) -> object:
        return builder.inttoptr(args[0], context.get_value_type(pointer_type))

    return pointer_type(address, element), codegen


@compiled()
def ulq_forward_at(
    x: int, y: int, codes: int, wide_codes: bool, size: int, scale: float, offset: float, q_lo: float, q_hi: float
) -> bool:
    """:func:`ulq_forward` on ``size`` float32 values at ``x`` and ``y``; int8 codes at ``codes``
    (int16 when ``wide_codes``), 0 for none."""
    x_array = numba.carray(pointer(x, np.float32), size)
    y_array = numba.carray(pointer(y, np.float32), size)
    code_count = size if codes else 0
    if wide_codes:
        code_array16 = numba.carray(pointer(codes, np.int16), code_count)
        return ulq_forward(x_array, y_array, code_array16, scale, offset, q_lo, q_hi)
    code_array8 = numba.carray(pointer(codes, np.int8), code_count)
    return ulq_forward(x_array, y_array, code_array8, scale, offset, q_lo, q_hi)


@compiled()
def ulq_settled_grid_at(
    clip_max: int, clip_min: int, valid_max: int, valid_min: int, fixed_min: bool, num_bits: int
) -> tuple[bool, float, float, float, float, float, float]:
    """The float32 clips at ``clip_max`` and ``clip_min`` settled on the host: ``(True, *grid)``
    where they need no change, :func:`ulq_grid` of them, and the clips written at ``valid_max``
    and ``valid_min`` (the last valid clips); else ``(False, ...)`` and nothing written.

    They need a change where ``fixed_min`` finds a lower clip that is not +0.0, or where the
    validity restore applies (``clip_max <= clip_min``, ``clip_max < 0`` or ``clip_min > 0``; NaN
    clips count as valid, as in the tensor path).
    """
    upper = numba.carray(pointer(clip_max, np.float32), 1)[0]
    lower = numba.carray(pointer(clip_min, np.float32), 1)[0]
    pinned = not fixed_min or (lower == 0 and math.copysign(1.0, lower) > 0)
    if not pinned or upper <= lower or upper < 0 or lower > 0:
        return False, *ulq_grid(np.nan, np.nan, num_bits)
    numba.carray(pointer(valid_max, np.float32), 1)[0] = upper
    numba.carray(pointer(valid_min, np.float32), 1)[0] = lower
    return True, *ulq_grid(upper, lower, num_bits)


@compiled()
def ulq_dequantize_at(codes: int, wide_codes: bool, y: int, size: int, scale: float, offset: float) -> None:
    """:func:`ulq_dequantize` on ``size`` int8 codes (int16 when ``wide_codes``) into float32 at ``y``."""
    y_array = numba.carray(pointer(y, np.float32), size)
    if wide_codes:
        ulq_dequantize(numba.carray(pointer(codes, np.int16), size), y_array, scale, offset)
    else:
        ulq_dequantize(numba.carray(pointer(codes, np.int8), size), y_array, scale, offset)


@compiled()
def ulq_clip_directions_at(x: int, values: int, out: int, batch: int, size: int, grid: tuple, levels: float) -> None:
    """:func:`ulq_clip_directions` of ``(batch, size)`` float32 values at ``x`` into ``(batch, 2, size)``
    at ``out``; with ``values`` (not 0), ``(batch, size)`` float32 values there, into ``(batch, 3, size)``.

    ``grid``: ``(s, o, lo, hi, r_max, r_min)`` as :func:`ulq_grid` returns it.
    """
    scale, _, lower, upper, residual_max, residual_min = grid
    ulq_clip_directions(
        numba.carray(pointer(x, np.float32), (batch, size)),
        numba.carray(pointer(values, np.float32), (batch if values else 0, size)),
        numba.carray(pointer(out, np.float32), (batch, 3 if values else 2, size)),
        scale,
        lower,
        upper,
        residual_max,
        residual_min,
        levels,
    )


@compiled()
def multiply_in_place_at(values: int, factors: int, size: int) -> None:
    """``values *= factors`` over ``size`` float32 values at each address, on the calling thread
    (a 4:2 mask on a weight gradient: torch's ``mul_`` wakes its threads for a few microseconds' work)."""
    products = numba.carray(pointer(values, np.float32), size)
    multipliers = numba.carray(pointer(factors, np.float32), size)
    for i in range(size):  # one array written in place: as two that may alias, the loop would not vectorise
        products[i] *= multipliers[i]


@compiled()
def split_weight_gradient_at(gradients: int, weight: int, grad_weight: int, out: int, slots: int, size: int) -> tuple:
    """:func:`split_weight_gradient` of float32 ``(out, slots, size)`` gradients at ``gradients``."""
    return split_weight_gradient(
        numba.carray(pointer(gradients, np.float32), (out, slots, size)),
        numba.carray(pointer(weight, np.float32), (out, size)),
        numba.carray(pointer(grad_weight, np.float32), (out if slots == 3 else 0, size)),
    )


@compiled()
def arq_quantize_at(
    w: int, out: int, outer: int, channels: int, inner: int, num_bits: int, first: int, last: int, mask: int
) -> None:
    """:func:`arq_quantize` of channels ``[first, last)`` of float32 ``(outer, channels, inner)``
    arrays at ``w`` and ``out``, with the mask of that shape at ``mask`` (0: none)."""
    shape = (outer, channels, inner)
    arq_quantize(
        numba.carray(pointer(w, np.float32), shape),
        numba.carray(pointer(out, np.float32), shape),
        num_bits,
        first,
        last,
        numba.carray(pointer(mask, np.float32), shape if mask else (0, 0, 0)),
    )
