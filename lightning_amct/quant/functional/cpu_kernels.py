"""Fused CPU kernels for the fake-quant ops: one pass over the data where tensor ops take a dozen.

A fake-quant op written with tensor operations reads and writes its activation about sixteen
times (forward and backward) and pays a few microseconds of dispatch for each of some forty
operations; on the CPU that made INT8 training of a small network 1.4x slower than float. These
kernels, compiled by numba when first called (and cached on disk), do the same work in one pass
each:

* :func:`ulq_grid`: the grid's six scalars from the two clips (a dozen tensor operations);
* :func:`ulq_forward`: ``y = (clamp(round(x/s + o), q_lo, q_hi) - o) * s``;
* :func:`ulq_backward`: ``dL/dx`` and the three sums the clip gradients need;
* :func:`arq_quantize`: the ARQ scale of every channel and the quantized weights.

They follow ``docs/algorithms.md`` operation by operation in float32 (no fast-math in anything
that produces a value: ``x/s`` is a division, ``round`` is round-half-to-even), so their outputs
are bit-identical to the tensor-op path, which stays in use for CUDA, other dtypes and strided
layouts. Only the order of the backward's sums differs (float32 accumulators, reassociated).

The kernels are single-threaded: the one pass costs less than the dispatch of the two-thread
tensor ops it replaces, and numba's own thread pool is neither fork- nor thread-safe.

:func:`applies` says whether a tensor takes this path; :func:`fused_cpu_kernels` turns the path
off (for comparisons and tests).

Example:
    >>> import numpy as np
    >>> x = np.array([0.3, -2.0, 5.0], dtype=np.float32)
    >>> y = np.empty_like(x)
    >>> ulq_forward(x, y, 0.25, 0.0, -8.0, 7.0)
    >>> y
    array([ 0.25, -2.  ,  1.75], dtype=float32)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numba
import numpy as np
import torch
from torch import Tensor

from lightning_amct.quant.functional.precision import SCALE_EPS

_enabled = True


def compiled(**options: object) -> Callable[[Callable], Callable]:
    """``numba.njit(cache=True, nogil=True, **options)``: compiled on first call, cached on disk.

    Numba refuses ``cache=True`` where it can write no cache directory (neither beside the
    package nor in the user's cache): the kernel is then compiled without a disk cache, once per
    process, instead of failing the import.
    """

    def decorate(function: Callable) -> Callable:
        try:
            return numba.njit(cache=True, nogil=True, **options)(function)
        except RuntimeError:
            return numba.njit(nogil=True, **options)(function)

    return decorate


def applies(*tensors: Tensor) -> bool:
    """Whether the fused kernels serve these tensors: all contiguous float32 on the CPU, not empty."""
    return _enabled and all(
        t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and t.numel() > 0 for t in tensors
    )


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


def flat(t: Tensor) -> np.ndarray:
    """A contiguous float32 tensor's data as a 1-D numpy array (shared memory, no copy).

    Not ``t.numpy()``: that marks the tensor's storage as never resizable again, and FSDP2 frees
    the storage of the whole parameters it gathers for a forward (``resize_(0)``) once the
    forward is over; a weight quantized here would make that fail. The array holds a reference
    to the tensor, so the memory stays alive as long as the array.
    """
    return np.asarray(_ArrayView(t))


class _ArrayView:
    """A contiguous float32 CPU tensor seen through numpy's array interface (read and write)."""

    __slots__ = ("__array_interface__", "tensor")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self.__array_interface__ = {
            "shape": (tensor.numel(),),
            "typestr": "<f4",
            "data": (tensor.data_ptr(), False),
            "version": 3,
        }


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
def ulq_forward(x: np.ndarray, y: np.ndarray, scale: float, offset: float, q_lo: float, q_hi: float) -> None:
    """``y = (clamp(round(x/s + o), q_lo, q_hi) - o) * s`` element by element, in float32.

    NaN stays NaN. ``x`` and ``y`` are 1-D float32 arrays of one size; the scalars are float32
    values (passed as Python floats).
    """
    s, o = np.float32(scale), np.float32(offset)
    lo, hi = np.float32(q_lo), np.float32(q_hi)
    for i in range(x.size):
        q = np.rint(x[i] / s + o)
        if q < lo:
            q = lo
        elif q > hi:
            q = hi
        y[i] = (q - o) * s


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
    zero = np.float32(0.0)
    above = below = inside_residual = zero
    for i in range(x.size):
        xi, gi = x[i], grad[i]
        is_above, is_below = xi > hi, xi < lo
        passed = zero if (is_above or is_below) else gi
        grad_x[i] = passed
        ratio = xi / s
        residual = np.rint(ratio) - ratio
        above += gi if is_above else zero
        below += gi if is_below else zero
        inside_residual += passed * residual if residual == residual else zero
    return above, below, inside_residual


@compiled()
def arq_quantize(w: np.ndarray, out: np.ndarray, num_bits: int) -> None:
    """ARQ per channel on the middle axis of 3-D float32 arrays ``(outer, channels, inner)``.

    For each channel: ``s = |max| / q_hi`` if ``|max| >= |min|`` else ``|min| / 2^(n-1)``;
    ``s < SCALE_EPS`` gives 1; a NaN in the channel makes ``s`` NaN, as ``amax`` would. Then
    ``out = clamp(round(w/s), q_lo, q_hi) * s``.
    """
    half = np.float32(2 ** (num_bits - 1))
    q_lo, q_hi = -half, half - np.float32(1.0)
    outer, channels, inner = w.shape
    for c in range(channels):
        w_max, w_min = np.float32(-np.inf), np.float32(np.inf)
        has_nan = False
        for a in range(outer):
            for b in range(inner):
                v = w[a, c, b]
                has_nan |= v != v
                w_max = v if v > w_max else w_max
                w_min = v if v < w_min else w_min
        w_max, w_min = abs(w_max), abs(w_min)
        s = w_max / q_hi if w_max >= w_min else w_min / half
        if has_nan:
            s = np.float32(np.nan)
        elif s < np.float32(SCALE_EPS):
            s = np.float32(1.0)
        for a in range(outer):
            for b in range(inner):
                q = np.rint(w[a, c, b] / s)
                if q < q_lo:
                    q = q_lo
                elif q > q_hi:
                    q = q_hi
                out[a, c, b] = q * s
