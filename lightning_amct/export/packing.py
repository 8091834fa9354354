"""Sub-byte packing: INT4 values two to a byte, 2-bit positions four to a byte.

Both pack a flat sequence least significant field first, the layout ONNX uses for its INT4
tensors (element ``2i`` in the low nibble of byte ``i``), so the packed INT4 bytes of a
checkpoint can go into an ONNX initializer unchanged. A sequence whose length is not a multiple
of the fields per byte is padded with zeros; the unpackers take the true length.

Why pack at all: a checkpoint's INT4 weights are only half the size of INT8 ones if two values
share a byte, and the positions of a 4:2 sparse weight cost 2 bits each instead of 8.

Example:
    >>> import torch
    >>> packed = pack_int4(torch.tensor([-8, 7, -1], dtype=torch.int8))
    >>> packed
    tensor([120,  15], dtype=torch.uint8)
    >>> unpack_int4(packed, 3)
    tensor([-8,  7, -1], dtype=torch.int8)
    >>> unpack_2bit(pack_2bit(torch.tensor([3, 0, 2, 1, 1])), 5)
    tensor([3, 0, 2, 1, 1], dtype=torch.uint8)
"""

from __future__ import annotations

import torch
from torch import Tensor

INT4_MIN, INT4_MAX = -8, 7


def pack_int4(values: Tensor) -> Tensor:
    """Pack integers in ``[-8, 7]`` two to a byte (two's complement nibbles, low nibble first).

    Args:
        values: any integer tensor; it is read flat, in row-major order.

    Returns:
        A flat uint8 tensor of ``ceil(numel / 2)`` bytes.

    Raises:
        ValueError: a value is outside ``[-8, 7]``.
    """
    flat = values.detach().reshape(-1).to(torch.int16).cpu()
    if flat.numel() and (int(flat.min()) < INT4_MIN or int(flat.max()) > INT4_MAX):
        found = f"[{int(flat.min())}, {int(flat.max())}]"
        raise ValueError(f"pack_int4 takes values in [{INT4_MIN}, {INT4_MAX}], got {found}")
    nibbles = torch.nn.functional.pad(flat & 0xF, (0, flat.numel() % 2)).reshape(-1, 2)
    return (nibbles[:, 0] | (nibbles[:, 1] << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor, count: int) -> Tensor:
    """Inverse of :func:`pack_int4`: the first ``count`` values as a flat int8 tensor."""
    as_int = packed.reshape(-1).to(torch.int16)
    nibbles = torch.stack([as_int & 0xF, as_int >> 4], dim=1).reshape(-1)[:count]
    return ((nibbles ^ 8) - 8).to(torch.int8)


def pack_2bit(values: Tensor) -> Tensor:
    """Pack integers in ``[0, 3]`` four to a byte, lowest bits first.

    Raises:
        ValueError: a value is outside ``[0, 3]``.
    """
    flat = values.detach().reshape(-1).to(torch.int16).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > 3):
        raise ValueError(f"pack_2bit takes values in [0, 3], got [{int(flat.min())}, {int(flat.max())}]")
    fields = torch.nn.functional.pad(flat, (0, -flat.numel() % 4)).reshape(-1, 4)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int16)
    return (fields << shifts).sum(dim=1).to(torch.uint8)


def unpack_2bit(packed: Tensor, count: int) -> Tensor:
    """Inverse of :func:`pack_2bit`: the first ``count`` values as a flat uint8 tensor."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int16)
    fields = (packed.reshape(-1).to(torch.int16)[:, None] >> shifts) & 3
    return fields.reshape(-1)[:count].to(torch.uint8)
