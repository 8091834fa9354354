"""4:2 compressed storage: the 2 kept values of every run of 4 input channels, and where they sit.

A 4:2-pruned weight has at most 2 non-zeros in every run of 4 consecutive input channels (along
``in_axis``, at fixed other indices; the last run of a channel count that is not a multiple of 4
is padded with zeros). Storing half the values plus a 2-bit position for each is exact, and with
INT8 values costs 10 bits per pair of weights instead of 16 (INT4: 6 instead of 8).

The layout: move ``in_axis`` last, pad it to a multiple of 4, view it as runs ``(..., R, 4)``;
``positions`` holds the two kept indices of each run in ascending order, ``values`` the entries
there, both flat in row-major order of ``(..., R, 2)``. The kept indices are the mask's ones; a run
with fewer than two (a padded run) takes its lowest masked indices, whose values are 0.

Example:
    >>> import torch
    >>> w = torch.tensor([[5, 0, 0, -3, 0, 2]], dtype=torch.int8)
    >>> mask = w != 0
    >>> values, positions = compress_4_2(w, mask, in_axis=1)
    >>> values.tolist(), positions.tolist()
    ([5, -3, 0, 2], [0, 3, 0, 1])
    >>> torch.equal(decompress_4_2(values, positions, w.shape, in_axis=1), w)
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

RUN, KEPT = 4, 2


def is_4_2(mask: Tensor, in_axis: int) -> bool:
    """Whether ``mask`` keeps at most 2 of every run of 4 along ``in_axis`` (it can be stored 4:2)."""
    runs = _runs(mask.detach().ne(0).to(torch.int8), in_axis)
    return bool((runs.sum(dim=-1) <= KEPT).all())


def compress_4_2(weight: Tensor, mask: Tensor, in_axis: int) -> tuple[Tensor, Tensor]:
    """Kept values and their positions (0..3 within each run) of a 4:2-masked weight.

    Args:
        weight: the weight with the mask already applied (zeros where ``mask`` is 0).
        mask: 0/1 (or bool) of ``weight``'s shape, at most 2 ones per run (:func:`is_4_2`).
        in_axis: the input-channel axis.

    Returns:
        ``(values, positions)``: flat, ``values`` in ``weight``'s dtype, ``positions`` uint8.

    Raises:
        ValueError: a run keeps more than 2 entries, or ``weight`` is non-zero where ``mask`` is 0.
    """
    if not is_4_2(mask, in_axis):
        raise ValueError("compress_4_2 needs a mask that keeps at most 2 of every 4 input channels")
    kept = mask.detach().ne(0)
    if bool((weight.detach().ne(0) & ~kept).any()):
        raise ValueError("compress_4_2 needs a weight that is zero where the mask is 0 (apply the mask first)")
    mask_runs = _runs(kept.to(torch.int8), in_axis)
    order = torch.sort(mask_runs, dim=-1, descending=True, stable=True).indices[..., :KEPT]
    positions = order.sort(dim=-1).values
    values = torch.gather(_runs(weight.detach(), in_axis), -1, positions)
    return values.reshape(-1).contiguous(), positions.reshape(-1).to(torch.uint8)


def decompress_4_2(values: Tensor, positions: Tensor, shape: torch.Size | tuple[int, ...], in_axis: int) -> Tensor:
    """Inverse of :func:`compress_4_2`: the dense weight of ``shape``, in ``values``' dtype."""
    moved = list(shape)
    channels = moved.pop(in_axis)
    runs = -(-channels // RUN)
    run_shape = (*moved, runs, KEPT)
    dense = torch.zeros((*moved, runs, RUN), dtype=values.dtype)
    dense.scatter_(-1, positions.reshape(run_shape).long(), values.reshape(run_shape))
    return dense.flatten(-2)[..., :channels].movedim(-1, in_axis).contiguous()


def _runs(tensor: Tensor, in_axis: int) -> Tensor:
    """``tensor`` with ``in_axis`` moved last, zero-padded to a multiple of 4, as ``(..., R, 4)``."""
    moved = tensor.movedim(in_axis, -1)
    padded = torch.nn.functional.pad(moved, (0, -moved.shape[-1] % RUN))
    return padded.reshape(*padded.shape[:-1], -1, RUN)
