"""A 2-D max-pool fused with the ULQ quantizer after it: CPU passes plane by plane.

A layer that reads a max-pool's output quantizes that output. On the CPU, torch's ``max_pool2d``
over channel-major images of small planes is slow (0.5 ms for a batch of 64 x 64 channels of
8x8 values on two cores: forty times a pass over the same memory), and it keeps int64 indices
for its backward. A layer that quantizes its input in its own node
(:mod:`~lightning_amct.quant.functional.ulq_layer`) can take the pool's input ``x`` instead:

* :func:`forward`: ``y = ulq(max over each window of x)``, each window's maximum written
  into ``y`` and quantized there;
* :func:`backward`: one pass finds each window's maximum again and where it lies, as torch's
  kernel picks it (the first largest value in scan order; a NaN wins, the last one), writes
  ``dL/dx`` (the gradient the quantizer lets through, added at that place over zeros, window by
  window in output order, as torch's backward adds it), ``y`` again (for the layer's weight
  gradient) and the quantizer's three clip sums.

A ReLU before the pool, which the layer applies too (:mod:`~lightning_amct.modules.input_relu`),
costs nothing more: the quantizer's grid then starts at 0, and the backward takes ReLU's gradient.

Values and ``dL/dx`` are those of ``max_pool2d`` followed by the quantizer, bit for bit; the clip
sums are added in another order (float32 within a plane, float64 over the planes in order), so
they do not depend on the number of threads. Each pass runs over the planes ``(n, c)`` in memory
order, on torch's team where the input is large (:mod:`~lightning_amct.quant.functional.omp_team`).

Example:
    >>> import torch
    >>> x = torch.arange(16.0).view(1, 1, 4, 4)
    >>> pool = MaxPoolInput.of(torch.nn.MaxPool2d(2), x)
    >>> forward(x, pool, (1.0, -128.0, 0.0, 255.0), (-128, 127))  # on the grid of step 1 from 0
    tensor([[[[ 5.,  7.],
              [13., 15.]]]])
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_amct.quant.functional import cpu_kernels, omp_team
from lightning_amct.quant.functional.cpu_kernels import backward_terms, compiled, grid_code, pointer
from lightning_amct.quant.functional.omp_team import member_block_run
from lightning_amct.quant.functional.ulq_passes import ordered_total

# Block layout (int64 words): addresses, the plane count and the pass, the geometry
# (H, W, OH, OW, kernel, stride, padding and dilation, each as (h, w)), then the grid's six
# float64 scalars (s, o, lo, hi, q_lo, q_hi).
_X, _GRAD, _Y, _GRAD_X, _SUMS, _PLANES, _PASS, _GEOMETRY = range(8)
_GEOMETRY_WORDS = 12
_FLOATS = _GEOMETRY + _GEOMETRY_WORDS
_FORWARD, _BACKWARD, _BACKWARD_RELU = range(3)
# Indices computed in the loops are unsigned: numba checks a signed index for a negative value,
# which keeps the loops over a plane's few values from vectorising (measured 4x slower signed).
_UINT = np.uint64
_ONE, _TWO = _UINT(1), _UINT(2)


@dataclass(frozen=True)
class MaxPoolInput:
    """A 2-D max-pool before the layer, applied in the layer's node (the node's ``x`` is the pool's input).

    Attributes:
        kernel_size, stride, padding, dilation: ``(height, width)`` each, as ``nn.MaxPool2d`` holds them.
        ceil_mode: the last window of an axis may hang over its edge (``nn.MaxPool2d``'s).
        output_size: the pooled ``(height, width)`` of the input it was made for.
    """

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool
    output_size: tuple[int, int]

    @classmethod
    def of(cls, pool: nn.MaxPool2d, x: Tensor) -> MaxPoolInput | None:
        """The pool's geometry for the input ``x`` (``N x C x H x W``); None where the passes cannot
        pool it (no batch axis, not contiguous float32 on the CPU, indices returned) or where torch
        would refuse it (a padding over half the window, an empty output): torch's pool then runs
        and says so."""
        if x.dim() != 4 or pool.return_indices or not cpu_kernels.applies(x):
            return None
        kernel, stride, padding, dilation = (
            _pair(value) for value in (pool.kernel_size, pool.stride, pool.padding, pool.dilation)
        )
        sizes = []
        for axis in range(2):
            k, s, p, d = kernel[axis], stride[axis], padding[axis], dilation[axis]
            extent = d * (k - 1) + 1
            if min(k, s, d) < 1 or p < 0 or 2 * p > extent:
                return None
            size = _pooled_size(x.shape[2 + axis], extent, s, p, pool.ceil_mode)
            if size < 1:
                return None
            sizes.append(size)
        return cls(kernel, stride, padding, dilation, bool(pool.ceil_mode), (sizes[0], sizes[1]))

    def apply(self, x: Tensor) -> Tensor:
        """The pool as torch computes it, for a layer that does not quantize in its node after all."""
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)

    def replayed(self) -> MaxPoolInput:
        """The same pool for a second run of its batch (it keeps no state)."""
        return self

    def output_shape(self, x: Tensor) -> torch.Size:
        """The pooled shape of ``x``."""
        return torch.Size((*x.shape[:2], *self.output_size))


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


def _pooled_size(size: int, extent: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Windows along one axis, as torch counts them (a last window of ``ceil_mode`` starts inside)."""
    span = size + 2 * padding - extent + (stride - 1 if ceil_mode else 0)
    if span < 0:
        return 0
    count = span // stride + 1
    if ceil_mode and (count - 1) * stride >= size + padding:
        count -= 1
    return count


def forward(x: Tensor, pool: MaxPoolInput, grid: tuple[float, ...], code_range: tuple[int, int]) -> Tensor:
    """``ulq(max_pool2d(x))`` on the host ``grid`` ``(s, o, lo, hi, ...)``; ``code_range``: ``(q_lo, q_hi)``."""
    y = x.new_empty(pool.output_shape(x))
    _run(_FORWARD, x, pool, (0, y.data_ptr(), 0, 0), grid, code_range)
    return y


def backward(
    x: Tensor,
    grad: Tensor,
    y: Tensor,
    pool: MaxPoolInput,
    grid: tuple[float, ...],
    code_range: tuple[int, int],
    relu: bool = False,
) -> tuple[Tensor, tuple[float, float, float]]:
    """The backward of :func:`forward` for ``grad = dL/dy`` (contiguous): returns ``dL/dx`` and the
    clip sums as :func:`~lightning_amct.quant.functional.ulq.ulq_backward` returns them, and writes
    the forward's output into ``y`` (of the pooled shape, contiguous) again.

    ``relu``: ``x`` is the input of a ReLU before the pool (``y = ulq(max_pool2d(relu(x)))``, the
    forward's values where the grid starts at 0). Pooling commutes with the ReLU, and a window
    whose maximum is not above 0 passes no gradient, so the maximum's place in ``x`` serves as the
    place in ``relu(x)``: ``dL/dx`` is torch's (its ReLU's gradient 0 at 0 and below, not at NaN).
    """
    grad_x = torch.empty_like(x)
    sums = np.empty((x.shape[0] * x.shape[1], 3))
    addresses = (grad.data_ptr(), y.data_ptr(), grad_x.data_ptr(), sums.ctypes.data)
    _run(_BACKWARD + int(relu), x, pool, addresses, grid, code_range)
    return grad_x, ordered_total(sums)


def _run(kind: int, x: Tensor, pool: MaxPoolInput, addresses: tuple, grid: tuple, code_range: tuple) -> None:
    """Pass ``kind`` over the planes of ``x``; ``addresses``: ``(grad, y, grad_x, sums)`` (0: unused)."""
    planes = x.shape[0] * x.shape[1]
    block = np.zeros(_FLOATS + 6, dtype=np.int64)
    block[:_GEOMETRY] = (x.data_ptr(), *addresses, planes, kind)
    block[_GEOMETRY:_FLOATS] = (
        *x.shape[2:], *pool.output_size, *pool.kernel_size, *pool.stride, *pool.padding, *pool.dilation
    )
    block[_FLOATS:].view(np.float64)[:] = (*grid[:4], *code_range)
    threads = omp_team.team_threads(x.numel())
    if threads == 1:
        _planes(block.ctypes.data, 0, planes)
    else:
        _TEAM_PASS.run(block, min(threads, planes))


def _team_body(block: int) -> None:
    """This thread's run of planes (compiled as the team's C callback)."""
    _planes(block, *member_block_run(block, _PLANES))


@compiled()
def _planes(block: int, first: int, last: int) -> None:
    """Planes ``[first, last)`` (``n * C + c``, in memory order) of the pass the block names."""
    ints = numba.carray(pointer(block, np.int64), _FLOATS)
    floats = numba.carray(pointer(block + 8 * _FLOATS, np.float64), 6)
    geometry = ints[_GEOMETRY:_FLOATS]
    grid = (
        np.float32(floats[0]), np.float32(floats[1]), np.float32(floats[2]), np.float32(floats[3]),
        np.float32(floats[4]), np.float32(floats[5]),
    )  # fmt: skip
    if ints[_PASS] == _FORWARD:
        _forward(ints[_X], ints[_Y], first, last, geometry, grid)
    else:
        sums = numba.carray(pointer(ints[_SUMS], np.float64), (ints[_PLANES], 3))
        relu = ints[_PASS] == _BACKWARD_RELU
        _backward(ints[_X], ints[_GRAD], ints[_Y], ints[_GRAD_X], first, last, geometry, grid, sums, relu)


# One function a pass, each with its loop over planes, the helpers inlined: a call per plane
# would cost as much as a plane of a few dozen values.


@compiled()
def _forward(x_address: int, y_address: int, first: int, last: int, geometry: np.ndarray, grid: tuple) -> None:
    """The maxima of the planes into ``y`` first, then ``y`` quantized in one loop over all of them
    (a loop over one plane's few outputs would not vectorise)."""
    s, o, _, _, code_lo, code_hi = grid
    size, pooled = geometry[0] * geometry[1], geometry[2] * geometry[3]
    places = np.empty(pooled, dtype=np.uint64)
    column_maxima = np.empty(geometry[1], dtype=np.float32)
    halving = _halving(geometry)
    for plane in range(first, last):
        x, maxima = _plane(x_address, plane, size), _plane(y_address, plane, pooled)
        if halving:
            _halved_maxima(x, geometry, maxima, column_maxima)
        else:
            _maxima(x, geometry, maxima, places)
    y = numba.carray(pointer(y_address + 4 * first * pooled, np.float32), (last - first) * pooled)
    for i in range(_UINT(y.size)):
        y[i] = (grid_code(y[i], s, o, code_lo, code_hi) - o) * s


@compiled()
def _backward(
    x_address: int, grad_address: int, y_address: int, grad_x_address: int, first: int, last: int,
    geometry: np.ndarray, grid: tuple, sums: np.ndarray, relu: bool,
) -> None:  # fmt: skip
    """Each plane's ``dL/dx`` (the quantizer's gradient of each window added at its maximum, over
    zeros, in output order), ``y`` again and the three clip sums (float32 within the plane); with
    ``relu``, of the maxima as the ReLU leaves them."""
    s, o, lower, upper, code_lo, code_hi = grid
    size, pooled = geometry[0] * geometry[1], geometry[2] * geometry[3]
    maxima, places = np.empty(pooled, dtype=np.float32), np.empty(pooled, dtype=np.uint64)
    zero = np.float32(0.0)
    for plane in range(first, last):
        x, grad_x = _plane(x_address, plane, size), _plane(grad_x_address, plane, size)
        grad, y = _plane(grad_address, plane, pooled), _plane(y_address, plane, pooled)
        _maxima(x, geometry, maxima, places)
        for i in range(size):
            grad_x[i] = zero
        above = below = inside = zero
        for out in range(pooled):
            value = maxima[out]
            value, passed, terms = backward_terms(value, grad[out], s, lower, upper, relu)
            grad_x[places[out]] += passed
            y[out] = (grid_code(value, s, o, code_lo, code_hi) - o) * s
            above += terms[0]
            below += terms[1]
            inside += terms[2]
        sums[plane, 0], sums[plane, 1], sums[plane, 2] = above, below, inside


@compiled(inline="always")
def _plane(address: int, plane: int, size: int) -> np.ndarray:
    return numba.carray(pointer(address + 4 * plane * size, np.float32), size)


@compiled(inline="always")
def _halving(geometry: np.ndarray) -> bool:
    """Whether the windows are 2x2 at stride 2 without padding or dilation (``nn.MaxPool2d(2)``),
    all inside the plane (no last window of ``ceil_mode`` over its edge)."""
    windows = geometry[4] == geometry[5] == geometry[6] == geometry[7] == 2
    plain = geometry[8] == geometry[9] == 0 and geometry[10] == geometry[11] == 1
    return windows and plain and 2 * geometry[2] <= geometry[0] and 2 * geometry[3] <= geometry[1]


@compiled(inline="always")
def _maxima(x: np.ndarray, geometry: np.ndarray, maxima: np.ndarray, places: np.ndarray) -> None:
    """Each window's maximum over the plane ``x`` and its index, as torch's CPU kernel finds them:
    the window clipped to the plane, the first largest value in scan order, a NaN over anything
    (the last NaN). 2x2 windows at stride 2 take a loop without branches."""
    height, width, rows, columns = geometry[0], geometry[1], geometry[2], geometry[3]
    if _halving(geometry):
        for oh in range(_UINT(rows)):
            top = _TWO * oh * _UINT(width)
            for ow in range(_UINT(columns)):
                i = top + _TWO * ow
                j = i + _UINT(width)
                a, b, c, d = x[i], x[i + _ONE], x[j], x[j + _ONE]
                right, lower_right = (b > a) | (b != b), (d > c) | (d != d)  # each row's pick, then the rows'
                first_row, second_row = b if right else a, d if lower_right else c
                second = (second_row > first_row) | (second_row != second_row)
                out = oh * _UINT(columns) + ow
                maxima[out] = second_row if second else first_row
                places[out] = (j + _UINT(lower_right)) if second else (i + _UINT(right))
        return
    kh, kw, sh, sw = geometry[4], geometry[5], geometry[6], geometry[7]
    ph, pw, dh, dw = geometry[8], geometry[9], geometry[10], geometry[11]
    for oh in range(rows):
        h0 = oh * sh - ph
        h1 = min(h0 + (kh - 1) * dh + 1, height)
        while h0 < 0:
            h0 += dh
        for ow in range(columns):
            w0 = ow * sw - pw
            w1 = min(w0 + (kw - 1) * dw + 1, width)
            while w0 < 0:
                w0 += dw
            place = h0 * width + w0
            value = np.float32(-np.inf)
            for h in range(h0, h1, dh):
                for w in range(w0, w1, dw):
                    v = x[h * width + w]
                    if v > value or v != v:
                        value, place = v, h * width + w
            maxima[oh * columns + ow], places[oh * columns + ow] = value, place


@compiled(inline="always")
def _halved_maxima(x: np.ndarray, geometry: np.ndarray, maxima: np.ndarray, column_maxima: np.ndarray) -> None:
    """The maxima of :func:`_maxima` for 2x2 windows at stride 2, without their places: each pair of
    rows' larger values first (a loop over a whole row, which vectorises), then each pair of those.
    The maxima are the same values (a NaN among them: a NaN), whichever equal value is taken."""
    width, rows, columns = _UINT(geometry[1]), _UINT(geometry[2]), _UINT(geometry[3])
    for oh in range(rows):
        top = _TWO * oh * width
        for w in range(_TWO * columns):
            a, c = x[top + w], x[top + width + w]
            column_maxima[w] = c if (c > a) | (c != c) else a
        for ow in range(columns):
            left, right = column_maxima[_TWO * ow], column_maxima[_TWO * ow + _ONE]
            maxima[oh * columns + ow] = right if (right > left) | (right != right) else left


_TEAM_PASS = omp_team.TeamPass(_team_body)
