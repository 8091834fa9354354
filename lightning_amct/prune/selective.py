"""4:2 structured sparsity (L1SelectivePruner): masks and their bit-packed form.

Along a weight's input-channel axis, at fixed other indices, every run of 4 consecutive weights
keeps its 2 largest magnitudes and the other 2 are masked. The axis is 1 for Conv and Linear
weights ``(C_out, C_in, ...)`` and 0 for ConvTranspose weights ``(C_in, C_out/groups, ...)``
(:func:`input_channel_axis`). When C_in is not a multiple of 4, the last run is padded with zeros
that are never kept over a real weight.

Ties are broken by position: among equal magnitudes, the lower input-channel index is kept (a
stable descending sort over each run; ``torch.topk`` leaves the order of equal values unspecified,
so masks could differ between devices and ranks).

Masks go into checkpoints bit-packed, 8 entries per byte, least significant bit first, in the
weight's row-major order.

Example:
    >>> w = torch.tensor([[0.1, -0.9, 0.5, 0.2, 3.0]])
    >>> n_out_of_m_mask(w, in_axis=1)
    tensor([[0., 1., 1., 0., 1.]])
    >>> mask = n_out_of_m_mask(torch.randn(8, 6, 3, 3), in_axis=1)
    >>> torch.equal(unpack_mask_bits(pack_mask_bits(mask), mask.shape), mask.bool())
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def input_channel_axis(module: nn.Module) -> int:
    """The axis of ``module.weight`` that indexes input channels: 0 for ConvTranspose, else 1."""
    return 0 if getattr(module, "transposed", False) else 1


@torch.no_grad()
def n_out_of_m_mask(weight: torch.Tensor, in_axis: int, n: int = 2, m: int = 4) -> torch.Tensor:
    """0/1 mask keeping the ``n`` largest ``|w|`` of every ``m`` consecutive input channels.

    Computed from the current dense weights; call it again at each refresh of the schedule.

    Args:
        weight: a conv, Linear or ConvTranspose weight.
        in_axis: the input-channel axis (see :func:`input_channel_axis`).
        n: weights kept per run.
        m: run length.

    Returns:
        A tensor of ``weight``'s shape, dtype and device, with exactly ``n`` ones per run of ``m``
        (all ones in a short last run of at most ``n`` real channels).

    Raises:
        ValueError: ``0 < n <= m`` does not hold.
    """
    if not 0 < n <= m:
        raise ValueError(f"n_out_of_m_mask needs 0 < n <= m, got n={n}, m={m}")
    moved = weight.detach().abs().movedim(in_axis, -1)
    channels = moved.shape[-1]
    padded = torch.nn.functional.pad(moved, (0, -channels % m))
    runs = padded.reshape(*padded.shape[:-1], -1, m)
    order = torch.sort(runs, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(runs, dtype=weight.dtype).scatter_(-1, order[..., :n], 1)
    return mask.flatten(-2)[..., :channels].movedim(-1, in_axis).contiguous()


def pack_mask_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a 0/1 mask into a flat uint8 tensor, 8 entries per byte, LSB first.

    Raises:
        ValueError: the mask holds a value other than 0 and 1.
    """
    if not torch.all((mask == 0) | (mask == 1)):
        raise ValueError("pack_mask_bits expects a mask of zeros and ones")
    bits = mask.detach().flatten().to(torch.uint8).cpu()
    bits = torch.nn.functional.pad(bits, (0, -bits.numel() % 8)).reshape(-1, 8)
    return (bits * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_mask_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask_bits`: a bool mask of ``shape`` (convert with ``.to(dtype)``)."""
    count = math.prod(shape)
    bits = (packed.to(torch.uint8)[:, None] & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.flatten()[:count].reshape(shape)
