"""ULQ's fused CPU passes by tensor address: on the calling thread, or on torch's threads (:mod:`.omp_team`).

:func:`forward` (``y`` and the codes), :func:`dequantize` (``y`` from the codes),
:func:`backward` (``dL/dx`` and the clip-gradient sums) and :func:`backward_rebuilding` (the
same, ``dL/dx`` over the gradient, and ``y`` again) call the kernels of
:mod:`~lightning_amct.quant.functional.cpu_kernels` on the calling thread where the tensor is
small or torch has one thread, and otherwise run them chunk by chunk on torch's team. The
backwards go chunk by chunk on the calling thread too, so that their sums, kept per chunk, are
added in chunk order on any number of threads. The team's chunk drivers read their arguments
from an int64 block (addresses and counts, float scalars stored as float64 bit patterns). The
outputs are the same bit for bit either way, sums included.

Example:
    >>> import torch
    >>> x = torch.tensor([0.3, -2.0, 5.0])
    >>> y, codes = torch.empty_like(x), torch.empty(3, dtype=torch.int8)
    >>> forward(x.data_ptr(), y.data_ptr(), codes.data_ptr(), False, 3, 0.25, 0.0, -8.0, 7.0)
    True
    >>> y, codes
    (tensor([ 0.2500, -2.0000,  1.7500]), tensor([ 1, -8,  7], dtype=torch.int8))
"""

from __future__ import annotations

import numba
import numpy as np

from lightning_amct.quant.functional import cpu_kernels, omp_team
from lightning_amct.quant.functional.cpu_kernels import compiled, pointer
from lightning_amct.quant.functional.omp_team import CHUNK, count_up, member_chunks

# Block layout (int64 words): five integer arguments, the element count, a result word (a count
# that threads raise with ``count_up``), the pass, then six float64 scalars.
_COUNT, _RESULT, _PASS, _FLOATS = 5, 6, 7, 8
_FLOAT_WORDS = 6
_FORWARD, _DEQUANTIZE, _BACKWARD, _BACKWARD_REBUILDING = 0, 1, 2, 3


def forward(
    x: int, y: int, codes: int, wide_codes: bool, size: int, scale: float, offset: float, q_lo: float, q_hi: float
) -> bool:
    """:func:`~lightning_amct.quant.functional.cpu_kernels.ulq_forward` on ``size`` float32 values
    at ``x`` and ``y``, int8 codes at ``codes`` (int16 when ``wide_codes``; 0 for none).

    Returns whether the codes describe ``y`` completely (False: a NaN).
    """
    threads = omp_team.team_threads(size)
    if threads == 1:
        return cpu_kernels.ulq_forward_at(x, y, codes, wide_codes, size, scale, offset, q_lo, q_hi)
    block = _block(_FORWARD, (x, y, codes, int(wide_codes), 0), size, (scale, offset, q_lo, q_hi))
    _TEAM_PASS.run(block, threads)
    return int(block[_RESULT]) == 0


def dequantize(codes: int, wide_codes: bool, y: int, size: int, scale: float, offset: float) -> None:
    """:func:`~lightning_amct.quant.functional.cpu_kernels.ulq_dequantize` of ``size`` int8 codes
    (int16 when ``wide_codes``) at ``codes`` into float32 at ``y``."""
    threads = omp_team.team_threads(size)
    if threads == 1:
        cpu_kernels.ulq_dequantize_at(codes, wide_codes, y, size, scale, offset)
    else:
        _TEAM_PASS.run(_block(_DEQUANTIZE, (codes, int(wide_codes), y, 0, 0), size, (scale, offset)), threads)


def backward(x: int, grad: int, grad_x: int, size: int, scale: float, lower: float, upper: float) -> tuple:
    """:func:`~lightning_amct.quant.functional.cpu_kernels.ulq_backward` on ``size`` float32 values
    at each address: writes ``grad_x``, returns ``(sum_U g, sum_L g, sum_inside g*r)`` as floats.

    Chunk by chunk on either path, each chunk's sums added in chunk order: the same result on
    any number of threads.
    """
    return _backward(_BACKWARD, x, grad, grad_x, size, (scale, lower, upper, 0.0, 0.0, 0.0), False)


def backward_rebuilding(x: int, grad: int, y: int, size: int, grid: tuple, q_lo: float, q_hi: float, relu: bool) -> tuple:
    """:func:`~lightning_amct.quant.functional.cpu_kernels.ulq_backward_rebuilding` on ``size``
    float32 values at each address: ``dL/dx`` over ``grad``, the forward's output at ``y``; the
    sums as :func:`backward` returns them.

    ``grid``: ``(s, o, lo, hi, ...)`` as :func:`~lightning_amct.quant.functional.cpu_kernels.ulq_grid`
    returns it; ``q_lo``, ``q_hi``: the integer range.
    """
    scale, offset, lower, upper = grid[:4]
    return _backward(_BACKWARD_REBUILDING, x, grad, y, size, (scale, lower, upper, offset, q_lo, q_hi), relu)


def _backward(kind: int, x: int, grad: int, out: int, size: int, scalars: tuple, relu: bool) -> tuple:
    threads = omp_team.team_threads(size)
    if threads == 1:
        return _backward_here(kind, x, grad, out, size, scalars, relu)
    chunk_sums = np.empty((-(-size // CHUNK), 3))
    block = _block(kind, (x, grad, out, chunk_sums.ctypes.data, int(relu)), size, scalars)
    _TEAM_PASS.run(block, threads)
    return _ordered_total(chunk_sums)


def _block(kind: int, ints: tuple, size: int, floats: tuple) -> np.ndarray:
    block = np.zeros(_FLOATS + _FLOAT_WORDS, dtype=np.int64)
    block[:_COUNT] = ints
    block[_COUNT] = size
    block[_PASS] = kind
    block[_FLOATS : _FLOATS + len(floats)].view(np.float64)[:] = floats
    return block


@compiled()
def _ordered_total(chunk_sums: np.ndarray) -> tuple[float, float, float]:
    """The three columns of ``(chunks, 3)`` float64 partial sums, each added in row order."""
    totals = np.zeros(3)
    for chunk in range(chunk_sums.shape[0]):
        for i in range(3):
            totals[i] += chunk_sums[chunk, i]
    return totals[0], totals[1], totals[2]


@compiled(inline="always")
def _words(block: int) -> tuple:
    """The block's integer words and its float64 scalars, as arrays."""
    return (
        numba.carray(pointer(block, np.int64), _FLOATS),
        numba.carray(pointer(block + 8 * _FLOATS, np.float64), _FLOAT_WORDS),
    )


@compiled()
def _chunks(block: int) -> None:
    """The pass the block names, over this thread's chunks."""
    kind = _words(block)[0][_PASS]
    if kind == _FORWARD:
        _forward_chunks(block)
    elif kind == _DEQUANTIZE:
        _dequantize_chunks(block)
    else:  # either backward
        _backward_chunks(block)


def _team_body(block: int) -> None:
    """:func:`_chunks` as the body of the team's parallel region (compiled as a C callback)."""
    _chunks(block)


@compiled(inline="always")
def _bounds(chunk: int, size: int) -> tuple[int, int]:
    """The elements ``[start, stop)`` of chunk ``chunk`` of a pass over ``size`` elements."""
    start = chunk * CHUNK
    return start, min(size, start + CHUNK)


@compiled(inline="always")
def _float32s(address: int, size: int) -> np.ndarray:
    return numba.carray(pointer(address, np.float32), size)


@compiled()
def _forward_chunks(block: int) -> None:
    ints, floats = _words(block)
    size = ints[_COUNT]
    x, y = _float32s(ints[0], size), _float32s(ints[1], size)
    wide = ints[3] != 0
    code_count = size if ints[2] else 0
    codes8 = numba.carray(pointer(ints[2], np.int8), 0 if wide else code_count)
    codes16 = numba.carray(pointer(ints[2], np.int16), code_count if wide else 0)
    scale, offset, q_lo, q_hi = floats[0], floats[1], floats[2], floats[3]
    first, last = member_chunks(size)
    for chunk in range(first, last):
        start, stop = _bounds(chunk, size)
        code_start, code_stop = (start, stop) if code_count else (0, 0)
        if wide:
            codes = codes16[code_start:code_stop]
            complete = cpu_kernels.ulq_forward(x[start:stop], y[start:stop], codes, scale, offset, q_lo, q_hi)
        else:
            codes = codes8[code_start:code_stop]
            complete = cpu_kernels.ulq_forward(x[start:stop], y[start:stop], codes, scale, offset, q_lo, q_hi)
        if not complete:
            count_up(block + 8 * _RESULT)


@compiled()
def _dequantize_chunks(block: int) -> None:
    ints, floats = _words(block)
    size = ints[_COUNT]
    y = _float32s(ints[2], size)
    wide = ints[1] != 0
    codes8 = numba.carray(pointer(ints[0], np.int8), 0 if wide else size)
    codes16 = numba.carray(pointer(ints[0], np.int16), size if wide else 0)
    first, last = member_chunks(size)
    for chunk in range(first, last):
        start, stop = _bounds(chunk, size)
        if wide:
            cpu_kernels.ulq_dequantize(codes16[start:stop], y[start:stop], floats[0], floats[1])
        else:
            cpu_kernels.ulq_dequantize(codes8[start:stop], y[start:stop], floats[0], floats[1])


@compiled()
def _backward_chunks(block: int) -> None:
    ints, floats = _words(block)
    size = ints[_COUNT]
    arrays = _float32s(ints[0], size), _float32s(ints[1], size), _float32s(ints[2], size)
    chunk_sums = numba.carray(pointer(ints[3], np.float64), (-(-size // CHUNK), 3))
    first, last = member_chunks(size)
    for chunk in range(first, last):
        _backward_chunk(ints[_PASS], arrays, chunk, chunk_sums, floats, ints[4] != 0)


@compiled()
def _backward_here(
    kind: int, x: int, grad: int, out: int, size: int, scalars: tuple, relu: bool
) -> tuple[float, float, float]:
    """:func:`backward` or :func:`backward_rebuilding` on the calling thread: every chunk in turn,
    the sums as the team adds them."""
    arrays = _float32s(x, size), _float32s(grad, size), _float32s(out, size)
    chunk_sums = np.empty((-(-size // CHUNK), 3))
    for chunk in range(chunk_sums.shape[0]):
        _backward_chunk(kind, arrays, chunk, chunk_sums, scalars, relu)
    return _ordered_total(chunk_sums)


@compiled(inline="always")
def _backward_chunk(
    kind: int, arrays: tuple, chunk: int, chunk_sums: np.ndarray, scalars: np.ndarray, relu: bool
) -> None:
    """The backward ``kind`` over chunk ``chunk``, its three sums into row ``chunk`` of ``chunk_sums``.

    ``arrays``: ``(x, grad, grad_x)``, or ``(x, grad, y)`` when rebuilding; ``scalars``:
    ``(scale, lower, upper, offset, q_lo, q_hi)``, the last three for rebuilding only.
    """
    x, grad, out = arrays
    start, stop = _bounds(chunk, x.size)
    scale, lower, upper = scalars[0], scalars[1], scalars[2]
    if kind == _BACKWARD:
        sums = cpu_kernels.ulq_backward(x[start:stop], grad[start:stop], out[start:stop], scale, lower, upper)
    else:
        sums = cpu_kernels.ulq_backward_rebuilding(
            x[start:stop], grad[start:stop], out[start:stop], scale, lower, upper, scalars[3], scalars[4], scalars[5], relu
        )
    for i in range(3):
        chunk_sums[chunk, i] = sums[i]


_TEAM_PASS = omp_team.TeamPass(_team_body)
