"""A 2-D max-pool before a layer that quantizes its output: CPU passes plane by plane.

A layer that reads a max-pool's output quantizes that output. On the CPU, torch's ``max_pool2d``
over channel-major images of small planes is slow (0.5 ms for a batch of 64 x 64 channels of
8x8 values on two cores: forty times a pass over the same memory), and it keeps int64 indices
for its backward. A layer that quantizes its input in its own node
(:mod:`~lightning_amct.quant.functional.ulq_layer`) takes the pool's input ``x`` instead and
pools it with these passes:

* :func:`maxima`: each window's maximum and where it lies in its plane, as torch's kernel picks
  it (the first largest value in scan order; a NaN wins, the last one). The node quantizes the
  maxima and keeps them and their places (int32) for its backward, not ``x``: half of ``x`` for a
  2x2 pool;
* :func:`scatter`: ``dL/dx`` from the maxima's gradient, added at each window's place over zeros,
  window by window in output order, as torch's backward adds it.

The maxima are ``max_pool2d(x)`` bit for bit, and so everything the node computes from them, the
quantizer's clip sums included. A ReLU before the pool, which the layer applies too
(:mod:`~lightning_amct.modules.input_relu`), commutes with it: the node applies it to the maxima.
Where a window's maximum is not above 0, its place in ``x`` may differ from its place in
``relu(x)``, but the ReLU passes no gradient there, so ``dL/dx`` is torch's all the same. Each
pass runs over the planes ``(n, c)`` in memory order, on torch's team where the input is large
(:mod:`~lightning_amct.quant.functional.omp_team`).

Example:
    >>> import torch
    >>> x = torch.arange(16.0).view(1, 1, 4, 4)
    >>> pool = MaxPoolInput.of(torch.nn.MaxPool2d(2), x)
    >>> values, places = maxima(x, pool)
    >>> values.view(-1).tolist(), places.view(-1).tolist()
    ([5.0, 7.0, 13.0, 15.0], [5, 7, 13, 15])
    >>> scatter(torch.ones(1, 1, 2, 2), places, pool, x.shape)[0, 0, :2]
    tensor([[0., 0., 0., 0.],
            [0., 1., 0., 1.]])
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_amct.quant.functional import cpu_kernels, omp_team
from lightning_amct.quant.functional.cpu_kernels import compiled, pointer
from lightning_amct.quant.functional.omp_team import member_block_run

# Block layout (int64 words): the addresses of the planes' side (x, or dL/dx), the pooled side
# (the maxima, or their gradient) and the places, the plane count and the pass, then the geometry
# (H, W, OH, OW, kernel, stride, padding and dilation, each as (h, w)).
_PLANES_SIDE, _POOLED_SIDE, _PLACES, _PLANE_COUNT, _PASS, _GEOMETRY = range(6)
_WORDS = _GEOMETRY + 12
_MAXIMA, _SCATTER = range(2)
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
        pool it (no batch axis, not contiguous float32 on the CPU, indices returned, a plane of 2**31
        values or more, whose places int32 cannot hold) or where torch would refuse it (a padding
        over half the window, an empty output): torch's pool then runs and says so."""
        if x.dim() != 4 or pool.return_indices or not cpu_kernels.applies(x) or x.shape[2] * x.shape[3] >= 2**31:
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


def maxima(x: Tensor, pool: MaxPoolInput) -> tuple[Tensor, Tensor]:
    """``max_pool2d(x)`` and each window's place in its plane (``h * W + w``, int32), both of the pooled shape."""
    shape = pool.output_shape(x)
    values, places = x.new_empty(shape), torch.empty(shape, dtype=torch.int32)
    _run(_MAXIMA, (x.data_ptr(), values.data_ptr(), places.data_ptr()), x.shape, pool)
    return values, places


def scatter(grad: Tensor, places: Tensor, pool: MaxPoolInput, shape: torch.Size) -> Tensor:
    """``dL/dx`` of ``x`` of ``shape`` from ``grad = dL/dmaxima`` (contiguous) and the :func:`maxima`' places."""
    grad_x = grad.new_empty(shape)
    _run(_SCATTER, (grad_x.data_ptr(), grad.data_ptr(), places.data_ptr()), shape, pool)
    return grad_x


def _run(kind: int, addresses: tuple[int, int, int], shape: torch.Size, pool: MaxPoolInput) -> None:
    """Pass ``kind`` over the planes of an input of ``shape``."""
    planes = shape[0] * shape[1]
    block = np.empty(_WORDS, dtype=np.int64)
    block[:] = (
        *addresses, planes, kind, *shape[2:], *pool.output_size,
        *pool.kernel_size, *pool.stride, *pool.padding, *pool.dilation,
    )  # fmt: skip
    threads = omp_team.team_threads(planes * shape[2] * shape[3])
    if threads == 1:
        _planes(block.ctypes.data, 0, planes)
    else:
        _TEAM_PASS.run(block, min(threads, planes))


def _team_body(block: int) -> None:
    """This thread's run of planes (compiled as the team's C callback)."""
    _planes(block, *member_block_run(block, _PLANE_COUNT))


@compiled()
def _planes(block: int, first: int, last: int) -> None:
    """Planes ``[first, last)`` (``n * C + c``, in memory order) of the pass the block names."""
    ints = numba.carray(pointer(block, np.int64), _WORDS)
    geometry = ints[_GEOMETRY:_WORDS]
    size, pooled = geometry[0] * geometry[1], geometry[2] * geometry[3]
    for plane in range(first, last):
        planes_side, pooled_side = _plane(ints[_PLANES_SIDE], plane, size), _plane(ints[_POOLED_SIDE], plane, pooled)
        places = numba.carray(pointer(ints[_PLACES] + 4 * plane * pooled, np.uint32), pooled)
        if ints[_PASS] == _MAXIMA:
            _maxima(planes_side, geometry, pooled_side, places)
        else:
            _scatter(pooled_side, places, planes_side)


@compiled(inline="always")
def _plane(address: int, plane: int, size: int) -> np.ndarray:
    return numba.carray(pointer(address + 4 * plane * size, np.float32), size)


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
                places[out] = np.uint32((j + _UINT(lower_right)) if second else (i + _UINT(right)))
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
            maxima[oh * columns + ow], places[oh * columns + ow] = value, np.uint32(place)


@compiled(inline="always")
def _scatter(grad: np.ndarray, places: np.ndarray, grad_x: np.ndarray) -> None:
    """The plane's ``dL/dx``: zeros, each window's gradient added at its place, in output order."""
    for i in range(_UINT(grad_x.size)):
        grad_x[i] = np.float32(0.0)
    for out in range(_UINT(grad.size)):
        grad_x[places[out]] += grad[out]


@compiled(inline="always")
def _halving(geometry: np.ndarray) -> bool:
    """Whether the windows are 2x2 at stride 2 without padding or dilation (``nn.MaxPool2d(2)``),
    all inside the plane (no last window of ``ceil_mode`` over its edge)."""
    windows = geometry[4] == geometry[5] == geometry[6] == geometry[7] == 2
    plain = geometry[8] == geometry[9] == 0 and geometry[10] == geometry[11] == 1
    return windows and plain and 2 * geometry[2] <= geometry[0] and 2 * geometry[3] <= geometry[1]


_TEAM_PASS = omp_team.TeamPass(_team_body)
