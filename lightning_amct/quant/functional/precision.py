"""Numeric ground rules shared by the quantizers: integer grids, the smallest scale, float16 scales.

* An n-bit signed grid is ``[q_lo, q_hi] = [-2^(n-1), 2^(n-1) - 1]`` with ``Q = 2^n - 1`` steps.
* A scale below ``SCALE_EPS`` (float32 machine epsilon, 1.1920929e-7) is degenerate and replaced
  by 1.
* Scales are computed in float32; element-wise math runs in float32, or float64 for float64 input.
* ``fakequant_precision_mode: FORCE_FP16_QUANT``: the deploy target computes activation scales in
  float16, so training rounds them the same way while still storing float32. Float16 represents
  normal numbers in ``[2^-14, 65504]``; outside that range the scale is rounded through its square
  root, ``s' = fp16(sqrt(s))^2``, which keeps the relative precision instead of flushing to zero or
  overflowing.
* The quantizers' scalar arithmetic (scales, offsets, grid bounds) takes its constants from
  :func:`grid_tensors`, float32 tensors on the device of the data, rather than Python numbers.

Example:
    >>> import torch
    >>> int_range(4)
    (-8, 7)
    >>> round_scale_fp16(torch.tensor([0.1, 1e-6, 1e6]))
    tensor([9.9976e-02, 1.0008e-06, 1.0000e+06])
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

SCALE_EPS = 1.1920929e-7
FP16_MIN_NORMAL = 2.0**-14
FP16_MAX = 65504.0


def validate_num_bits(num_bits: int) -> None:
    """Reject bit widths the grids do not support (anything but an int in 2..16).

    Raises:
        ValueError: with the value received.
    """
    if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 2 <= num_bits <= 16:
        raise ValueError(f"num_bits must be an int between 2 and 16 (4 or 8 in the config), got {num_bits!r}")


def int_range(num_bits: int) -> tuple[int, int]:
    """The signed n-bit grid ``(q_lo, q_hi) = (-2^(n-1), 2^(n-1) - 1)``."""
    half = 2 ** (num_bits - 1)
    return -half, half - 1


class GridTensors(NamedTuple):
    """The constants of an n-bit grid as float32 tensors on one device: see :func:`grid_tensors`."""

    q_lo: Tensor  #: ``-2^(n-1)``, shape ``()``
    q_hi: Tensor  #: ``2^(n-1) - 1``, shape ``()``
    half: Tensor  #: ``2^(n-1)``, shape ``()``
    levels: Tensor  #: ``Q = 2^n - 1``, shape ``()``
    ends: Tensor  #: ``[q_lo, q_hi]``, shape ``(2,)``
    eps: Tensor  #: ``SCALE_EPS``, shape ``()``
    one: Tensor  #: ``1.0``, shape ``()``


_GRID_TENSORS: dict[tuple[int, torch.device], GridTensors] = {}


def grid_tensors(num_bits: int, like: Tensor) -> GridTensors:
    """The n-bit grid's constants as float32 tensors on ``like``'s device, created once and cached.

    The quantizers run a dozen scalar operations per call on one-element tensors. A Python-number
    operand is first wrapped in a new tensor, which costs more than such an operation itself;
    and on CUDA, dividing by a CPU scalar multiplies by its reciprocal instead, which can differ
    in the last bit. Constant tensors on the data's device avoid both. They are shared: never
    modify them in place. (A dictionary caches them rather than ``functools.lru_cache``, which
    ``torch.compile`` warns about when it traces a quantizer.)

    While ``torch.compile`` traces, and for the tensors of a tracing mode (the fake and functional
    tensors that the compiler and ``torch.library.opcheck`` run the operators on), the constants
    are new tensors of that kind at each call, which the traced graph keeps as its own.

    Example:
        >>> grid_tensors(8, torch.zeros(())).ends
        tensor([-128.,  127.])
    """
    if torch.compiler.is_compiling() or type(like) not in _PLAIN_TENSORS:
        return _grid_tensors(num_bits, like.device)
    key = (num_bits, like.device)
    cached = _GRID_TENSORS.get(key)
    if cached is None:
        cached = _GRID_TENSORS[key] = _grid_tensors(num_bits, like.device)
    return cached


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _grid_tensors(num_bits: int, device: torch.device) -> GridTensors:
    q_lo, q_hi = int_range(num_bits)
    values = torch.tensor([q_lo, q_hi, -q_lo, 2**num_bits - 1, SCALE_EPS, 1.0], device=device)
    q_lo_t, q_hi_t, half, levels, eps, one = values.unbind()
    return GridTensors(q_lo_t, q_hi_t, half, levels, values[:2], eps, one)


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without the call when the dtype already matches: the call costs about a
    microsecond, and a custom operator's kernel must not return its input (``torch.library.opcheck``)."""
    return t if t.dtype == dtype else t.to(dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for element-wise quantization math: float32, or float64 for float64 input."""
    return torch.promote_types(dtype, torch.float32)


def round_scale_fp16(scale: Tensor) -> Tensor:
    """Round non-negative scales to float16 precision, returned as float32.

    ``s' = float32(float16(s))`` for ``s`` in ``[2^-14, 65504]``, else
    ``s' = float32(float16(sqrt(s)))^2`` (squared in float32).

    Args:
        scale: non-negative scales, any float dtype and shape.

    Returns:
        float32 tensor of the same shape.

    Example:
        >>> round_scale_fp16(torch.tensor(1 / 3)).item()
        0.333251953125
    """
    s = as_dtype(scale, torch.float32)
    direct = s.half().float()
    root = s.sqrt().half().float()
    in_range = (s >= FP16_MIN_NORMAL) & (s <= FP16_MAX)
    return torch.where(in_range, direct, root * root)
