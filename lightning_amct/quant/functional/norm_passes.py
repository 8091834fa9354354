"""A training-mode BatchNorm fused with the ReLU and ULQ quantizer after it: CPU passes plane by plane.

A Conv-BN-ReLU block before a quantized layer runs, as torch runs it, BatchNorm's statistics
pass and its output pass, and the quantizer's pass over that output; the backward the same in
reverse. A layer that quantizes its input in its own node
(:mod:`~lightning_amct.quant.functional.ulq_layer`) can take the BatchNorm's input instead and do
it all in fewer passes over the activation ``z`` (``N x C x S`` float32, channel-major):

* :func:`statistics`: the batch mean and biased variance of each channel, from one pass of
  float64 sums (of ``z - shift``, ``shift`` the channel's first value, so that a large mean costs
  no precision), the running statistics updated as ``nn.BatchNorm`` updates them;
* :func:`forward`: ``y = ulq(relu(z * a + b))`` with ``a = gamma / sqrt(var + eps)``,
  ``b = beta - mean * a``: the BatchNorm output is never stored;
* :func:`backward`: one pass writes ``g = dL/du`` of ``u = z * a + b`` (ReLU's and the
  quantizer's gradient) over ``dL/dy``, ``y`` again (for the layer's weight gradient) and the
  sums (the clips' and BatchNorm's ``sum g``, ``sum g (z - mean)``); a second pass writes
  BatchNorm's input gradient over ``g``, as ``native_batch_norm_backward`` computes it.

The quantizer's arithmetic is :mod:`~lightning_amct.quant.functional.cpu_kernels`'; BatchNorm's
is torch's formula in float32 (``a``, ``b`` and the normalised value as its CPU kernel forms
them), its statistics in float64: the values equal torch's ``batch_norm`` within float32
rounding, not bit for bit (torch sums in another order). The ReLU is the grid's: the lower bound
must be 0 (``fixed_min``).

Each pass runs over the planes ``(n, c)`` of ``S`` values in memory order, on torch's team where
the tensor is large (:mod:`~lightning_amct.quant.functional.omp_team`: each thread a run of
planes); sums are kept per plane and added in plane order, so results do not depend on the
number of threads.

Example:
    >>> import torch
    >>> z = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]])  # N=2, C=1, S=2: mean 4, variance 5
    >>> channel = statistics(z, torch.ones(1), torch.zeros(1), None, None, 0.1, 0.0)
    >>> round(float(channel[MEAN, 0]), 4), round(float(channel[SCALE, 0]) ** -2, 4)
    (4.0, 5.0)
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from torch import Tensor

from lightning_amct.quant.functional import omp_team
from lightning_amct.quant.functional.cpu_kernels import backward_terms, compiled, grid_code, pointer
from lightning_amct.quant.functional.omp_team import member_block_run

#: Rows of the per-channel float32 table that the passes read (:func:`statistics` fills the first four).
MEAN, INVSTD, SCALE, BIAS, GRAD_MEAN, GRAD_SLOPE = range(6)
_ROWS = 6
#: Columns of the float64 sums per plane and per channel: the statistics pass's two, the backward's five.
_SUM_D, _SUM_D2 = 0, 1
_ABOVE, _BELOW, _INSIDE, _SUM_G, _SUM_GX = range(5)
_SUM_COLUMNS = 5

# Block layout (int64 words): addresses, sizes and the pass, then the grid's six float64 scalars.
_Z, _DATA, _OUT, _CHANNEL, _SUMS, _PLANES, _CHANNELS, _PLANE_SIZE, _PASS, _FLOATS = range(10)
_MOMENTS, _FORWARD, _BACKWARD_SUMS, _BACKWARD_INPUT = range(4)


def statistics(
    z: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    factor: float,
    eps: float,
) -> Tensor:
    """The per-channel table of the batch ``z`` (``(N, C, ...)`` contiguous float32): rows
    :data:`MEAN`, :data:`INVSTD`, and the affine map ``u = z * SCALE + BIAS`` that BatchNorm
    applies; updates ``running_mean`` and ``running_var`` (unbiased) with ``factor`` as
    ``nn.BatchNorm`` does, where given."""
    channels = z.shape[1]
    table = torch.empty(_ROWS, channels)
    sums = _run(_MOMENTS, z, 0, 0, table, 2, ())
    addresses = (_address(weight), _address(bias), _address(running_mean), _address(running_var))
    size = z.numel()
    plane_size = size // z.shape[0] // channels
    _fill_statistics(
        sums, z.data_ptr(), table.data_ptr(), *addresses, channels, plane_size, size // channels, factor, eps
    )
    return table


def forward(z: Tensor, table: Tensor, grid: tuple[float, ...], code_range: tuple[int, int]) -> Tensor:
    """``y = ulq(relu(z * SCALE + BIAS))`` on the host ``grid`` (lower bound 0), in ``z``'s layout."""
    y = torch.empty_like(z)
    _run(_FORWARD, z, 0, y.data_ptr(), table, 0, _grid_scalars(grid, code_range))
    return y


def backward(
    z: Tensor, grad: Tensor, table: Tensor, grid: tuple[float, ...], code_range: tuple[int, int], need_input: bool
) -> tuple[Tensor, Tensor, tuple[float, float, float], Tensor]:
    """The backward of :func:`forward` and BatchNorm's, ``grad`` (``dL/dy``, owned, ``z``'s layout) overwritten.

    Returns ``(dL/dz, y, clip sums, parameter gradients)``: ``dL/dz`` in ``grad``'s memory (only
    where ``need_input``; else ``grad`` holds ``g``), ``y`` of the forward again, the clip sums as
    :func:`~lightning_amct.quant.functional.ulq.ulq_backward` returns them, and BatchNorm's
    ``(dL/dgamma, dL/dbeta)`` as a ``(2, C)`` float32 tensor.
    """
    y = torch.empty_like(z)
    scalars = _grid_scalars(grid, code_range)
    sums = _run(_BACKWARD_SUMS, z, grad.data_ptr(), y.data_ptr(), table, _SUM_COLUMNS, scalars)
    parameter_gradients = torch.empty(2, table.shape[1])
    clip_sums = _fill_gradients(sums, table.data_ptr(), parameter_gradients.data_ptr(), table.shape[1], z.numel())
    if need_input:
        _run(_BACKWARD_INPUT, z, grad.data_ptr(), 0, table, 0, ())
    return grad, y, clip_sums, parameter_gradients


def _address(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _grid_scalars(grid: tuple[float, ...], code_range: tuple[int, int]) -> tuple[float, ...]:
    """``(s, o, lo, hi, q_lo, q_hi)``; a ReLU in the grid needs its lower bound at 0."""
    if grid[2] != 0.0 and grid[2] == grid[2]:
        raise ValueError(f"a BatchNorm and ReLU fused into the quantizer need a grid from 0, got {grid[2]}")
    return (*grid[:4], *code_range)


def _run(kind: int, z: Tensor, data: int, out: int, table: Tensor, sum_columns: int, scalars: tuple) -> np.ndarray:
    """Pass ``kind`` over the planes of ``z``; returns its per-channel sums ``(channels, sum_columns)``
    (an empty array for a pass without sums)."""
    channels = table.shape[1]
    planes = z.shape[0] * channels
    plane_sums = np.empty((planes, sum_columns))
    block = np.zeros(_FLOATS + 6, dtype=np.int64)
    block[:_FLOATS] = (
        z.data_ptr(), data, out, table.data_ptr(), plane_sums.ctypes.data, planes, channels, z.numel() // planes, kind
    )
    block[_FLOATS : _FLOATS + len(scalars)].view(np.float64)[:] = scalars
    threads = omp_team.team_threads(z.numel())
    if threads == 1:
        _planes(block.ctypes.data, 0, planes)
    else:
        _TEAM_PASS.run(block, min(threads, planes))
    return _channel_totals(plane_sums.reshape(z.shape[0], channels, sum_columns)) if sum_columns else plane_sums


@compiled()
def _channel_totals(plane_sums: np.ndarray) -> np.ndarray:
    """Per-plane sums ``(N, C, k)`` added over ``n`` in order: ``(C, k)``."""
    totals = np.zeros(plane_sums.shape[1:])
    for n in range(plane_sums.shape[0]):
        for c in range(plane_sums.shape[1]):
            for k in range(plane_sums.shape[2]):
                totals[c, k] += plane_sums[n, c, k]
    return totals


@compiled()
def _fill_statistics(
    sums: np.ndarray, z: int, table: int, weight: int, bias: int, running_mean: int, running_var: int,
    channels: int, plane_size: int, count: int, factor: float, eps: float,
) -> None:  # fmt: skip
    """The table's statistics rows from the moments pass's sums (shifted by each channel's first
    value in ``z``) over ``count`` values a channel; the running statistics updated."""
    rows = numba.carray(pointer(table, np.float32), (_ROWS, channels))
    values = numba.carray(pointer(z, np.float32), channels * plane_size)
    f = np.float32(factor)
    for c in range(channels):
        shift_mean = sums[c, _SUM_D] / count
        variance = max(sums[c, _SUM_D2] / count - shift_mean * shift_mean, 0.0)
        mean = np.float32(shift_mean + np.float64(values[c * plane_size]))
        invstd = np.float32(1.0 / math.sqrt(variance + eps))
        scale = invstd * numba.carray(pointer(weight, np.float32), channels)[c] if weight else invstd
        shift = numba.carray(pointer(bias, np.float32), channels)[c] if bias else np.float32(0.0)
        rows[MEAN, c], rows[INVSTD, c], rows[SCALE, c], rows[BIAS, c] = mean, invstd, scale, shift - mean * scale
        if running_mean:
            unbiased = np.float32(variance * count / max(count - 1, 1))
            stored_mean = numba.carray(pointer(running_mean, np.float32), channels)
            stored_var = numba.carray(pointer(running_var, np.float32), channels)
            stored_mean[c] = f * mean + (np.float32(1.0) - f) * stored_mean[c]
            stored_var[c] = f * unbiased + (np.float32(1.0) - f) * stored_var[c]


@compiled()
def _fill_gradients(sums: np.ndarray, table: int, parameter_gradients: int, channels: int, size: int) -> tuple:
    """From the backward's per-channel sums: the table's gradient rows, BatchNorm's parameter
    gradients ``(2, C)``, and the clips' three sums (returned)."""
    rows = numba.carray(pointer(table, np.float32), (_ROWS, channels))
    gradients = numba.carray(pointer(parameter_gradients, np.float32), (2, channels))
    count = size // channels
    clip_sums = np.zeros(3)
    for c in range(channels):
        invstd = np.float64(rows[INVSTD, c])
        sum_g, sum_gx = sums[c, _SUM_G], sums[c, _SUM_GX]
        gradients[0, c], gradients[1, c] = sum_gx * invstd, sum_g
        rows[GRAD_MEAN, c] = sum_g / count
        rows[GRAD_SLOPE, c] = sum_gx * invstd * invstd / count
        for i in range(3):
            clip_sums[i] += sums[c, i]
    return clip_sums[0], clip_sums[1], clip_sums[2]


def _team_body(block: int) -> None:
    """This thread's run of planes (compiled as the team's C callback)."""
    _planes(block, *member_block_run(block, _PLANES))


@compiled()
def _planes(block: int, first: int, last: int) -> None:
    """Planes ``[first, last)`` (``n * C + c``, in memory order) of the pass the block names, each
    plane's sums into its row of the block's per-plane sums."""
    ints = numba.carray(pointer(block, np.int64), _FLOATS)
    floats = numba.carray(pointer(block + 8 * _FLOATS, np.float64), 6)
    planes, channels, kind = ints[_PLANES], ints[_CHANNELS], ints[_PASS]
    table = numba.carray(pointer(ints[_CHANNEL], np.float32), (_ROWS, channels))
    sums = numba.carray(pointer(ints[_SUMS], np.float64), (planes, 2 if kind == _MOMENTS else _SUM_COLUMNS))
    run = (first, last, channels, ints[_PLANE_SIZE])
    if kind == _MOMENTS:
        _moments(ints[_Z], run, sums)
    elif kind == _FORWARD:
        _forward(ints[_Z], ints[_OUT], run, table, floats)
    elif kind == _BACKWARD_SUMS:
        _backward_sums(ints[_Z], ints[_DATA], ints[_OUT], run, table, floats, sums)
    else:
        _backward_input(ints[_Z], ints[_DATA], run, table)


# One function a pass, each with its loop over planes: the float flags are a function's (inlined
# code takes its caller's), and a call per plane would cost as much as a plane of a few dozen values.


@compiled(inline="always")
def _plane(address: int, plane: int, size: int) -> np.ndarray:
    """Plane ``plane`` of the float32 values at ``address``: its ``size`` values, as an array made
    from its address (a slice of an array costs several times more on planes of a few dozen values)."""
    return numba.carray(pointer(address + 4 * plane * size, np.float32), size)


@compiled(fastmath={"reassoc"})
def _moments(z_address: int, run: tuple, sums: np.ndarray) -> None:
    """Each plane's ``(sum d, sum d^2)`` of ``d = z - shift``, ``shift`` its channel's first value,
    in float64 (``reassoc``: the sums vectorise)."""
    first, last, channels, size = run
    for plane in range(first, last):
        z = _plane(z_address, plane, size)
        shift = np.float64(_plane(z_address, plane % channels, size)[0])
        total = total_squares = 0.0
        for i in range(size):
            d = np.float64(z[i]) - shift
            total += d
            total_squares += d * d
        sums[plane, _SUM_D], sums[plane, _SUM_D2] = total, total_squares


@compiled()
def _forward(z_address: int, y_address: int, run: tuple, table: np.ndarray, floats: np.ndarray) -> None:
    first, last, channels, size = run
    s, o, lo, hi = np.float32(floats[0]), np.float32(floats[1]), np.float32(floats[4]), np.float32(floats[5])
    for plane in range(first, last):
        z, y = _plane(z_address, plane, size), _plane(y_address, plane, size)
        scale, bias = table[SCALE, plane % channels], table[BIAS, plane % channels]
        for i in range(size):
            y[i] = (grid_code(z[i] * scale + bias, s, o, lo, hi) - o) * s


@compiled(fastmath={"reassoc"})
def _backward_sums(
    z_address: int, grad_address: int, y_address: int, run: tuple, table: np.ndarray, floats: np.ndarray,
    sums: np.ndarray,
) -> None:  # fmt: skip
    """``g`` over the gradient, ``y`` again, and each plane's five sums (float32 within the plane,
    as :func:`~lightning_amct.quant.functional.cpu_kernels.ulq_backward` sums a chunk)."""
    first, last, channels, size = run
    s, o, lower, upper = np.float32(floats[0]), np.float32(floats[1]), np.float32(floats[2]), np.float32(floats[3])
    code_lo, code_hi = np.float32(floats[4]), np.float32(floats[5])
    for plane in range(first, last):
        z, grad, y = _plane(z_address, plane, size), _plane(grad_address, plane, size), _plane(y_address, plane, size)
        c = plane % channels
        scale, bias, mean = table[SCALE, c], table[BIAS, c], table[MEAN, c]
        above = below = inside = sum_g = sum_gx = np.float32(0.0)
        for i in range(size):
            u, passed, terms = backward_terms(z[i] * scale + bias, grad[i], s, lower, upper, True)
            grad[i] = passed
            y[i] = (grid_code(u, s, o, code_lo, code_hi) - o) * s
            above += terms[0]
            below += terms[1]
            inside += terms[2]
            sum_g += passed
            sum_gx += passed * (z[i] - mean)
        sums[plane, _ABOVE], sums[plane, _BELOW], sums[plane, _INSIDE] = above, below, inside
        sums[plane, _SUM_G], sums[plane, _SUM_GX] = sum_g, sum_gx


@compiled()
def _backward_input(z_address: int, grad_address: int, run: tuple, table: np.ndarray) -> None:
    """``dL/dz = (g - mean(g) - (z - mean) * k) * invstd * gamma`` over the gradient, as torch's CPU kernel."""
    first, last, channels, size = run
    for plane in range(first, last):
        z, grad = _plane(z_address, plane, size), _plane(grad_address, plane, size)
        c = plane % channels
        mean, grad_mean, slope, scale = table[MEAN, c], table[GRAD_MEAN, c], table[GRAD_SLOPE, c], table[SCALE, c]
        for i in range(size):
            grad[i] = (grad[i] - grad_mean - (z[i] - mean) * slope) * scale


_TEAM_PASS = omp_team.TeamPass(_team_body)
