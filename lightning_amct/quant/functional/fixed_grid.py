"""Fake quantization on a fixed per-tensor grid, computed as ONNX's QuantizeLinear/DequantizeLinear.

``y = (clamp(round(x / s) + o, q_lo, q_hi) - o) * s`` in float32, ``round`` half to even. This is
the ULQ forward of a grid whose clips are constants (``o`` an integer, so ``round(x/s + o)`` is
``round(x/s) + o``), in the order of operations ONNX Runtime uses: the integer offset is added
after rounding. Computed as ``round(x/s + o)`` in float32 instead, a value within a float32
rounding of a half step can round the other way, and one such step, carried through a deep
network, is enough to make a model and its deploy ONNX model disagree.

Backward: straight through inside the grid, ``dL/dx = g * [lo <= x <= hi]`` with
``lo = (q_lo - o) * s`` and ``hi = (q_hi - o) * s`` (ULQ's ``dL/dx``); a fixed grid has nothing
to learn. Under an ONNX export it is ``torch.fake_quantize_per_tensor_affine``, which both
exporters write as the QuantizeLinear/DequantizeLinear pair.

Example:
    >>> import torch
    >>> x = torch.tensor([-0.5, 0.3, 2.0], requires_grad=True)
    >>> y = fixed_grid_fake_quant(x, torch.tensor(0.1), torch.tensor(-128, dtype=torch.int32), -128, 127)
    >>> y.detach()
    tensor([0.0000, 0.3000, 2.0000])
    >>> y.sum().backward()
    >>> x.grad
    tensor([0., 1., 1.])
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from lightning_amct.quant.functional.library import FakeQuantOperator


def fixed_grid_fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, q_lo: int, q_hi: int) -> Tensor:
    """``x`` fake-quantized on the grid of ``scale`` and ``zero_point`` (integers ``q_lo..q_hi``).

    Args:
        x: input, float32.
        scale: ``s``, a float32 scalar tensor.
        zero_point: ``o``, an int32 scalar tensor.
        q_lo: smallest integer of the grid.
        q_hi: largest integer of the grid.
    """
    if torch.onnx.is_in_onnx_export():
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, q_lo, q_hi)
    return _OPERATOR(x, scale, zero_point, q_lo, q_hi)


def _operator_forward(x: Tensor, scale: Tensor, zero_point: Tensor, q_lo: int, q_hi: int) -> Tensor:
    """The values: the ``lightning_amct::fixed_grid_fake_quant`` operator
    (:mod:`~lightning_amct.quant.functional.library`)."""
    integers = torch.clamp(torch.round(x / scale) + zero_point, q_lo, q_hi)
    return (integers - zero_point) * scale


def _operator_setup(ctx: FunctionCtx, inputs: tuple, output: Tensor) -> None:
    """Keeps ``x`` and the grid's bounds ``lo`` and ``hi``."""
    x, scale, zero_point, q_lo, q_hi = inputs
    ctx.save_for_backward(x, (q_lo - zero_point) * scale, (q_hi - zero_point) * scale)


def _operator_backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
    """Straight through inside the grid: ``g * [lo <= x <= hi]``."""
    x, lo, hi = ctx.saved_tensors
    return grad * ((x >= lo) & (x <= hi)), None, None, None, None


_OPERATOR = FakeQuantOperator("fixed_grid_fake_quant", _operator_forward, _operator_backward, _operator_setup)
