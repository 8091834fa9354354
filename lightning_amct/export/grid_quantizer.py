"""A frozen activation quantizer: a fixed ULQ grid, in the form the ONNX exporter understands.

:class:`GridQuantizer` is what an :class:`~lightning_amct.quant.ActivationQuantizer` becomes when a
model is frozen for export: the input of a :class:`~lightning_amct.export.fake_quant_layer.FakeQuantLayer`
and each output quantizer. It computes what ONNX's QuantizeLinear/DequantizeLinear pair computes,
``(clamp(round(x / s) + o, -128, 127) - o) * s`` in float32, and under an ONNX export it is
``fake_quantize_per_tensor_affine(x, s, o, -128, 127)``, which both exporters write as that pair.
A grid narrower than 8 bits (INT4) is then clamped to its own bounds, which gives the same values
(ONNX's QuantizeLinear has no 4-bit activation range in the exporter).

Not torch's operator in eager mode: it rounds ``x * (1/s)``, and ONNX Runtime ``x / s``; a value
within a float32 rounding of a half step rounds one way in one and the other way in the other. One
such value in a million is enough: the step it moves goes through every layer after it, and in a
network 50 layers deep the logits of PyTorch and ONNX Runtime then differ by more than a step.
ULQ rounds ``x/s + o``, the same as ``round(x / s) + o`` with an integer offset.

Example:
    >>> import torch
    >>> from lightning_amct.export.integer import ActivationGrid
    >>> quantizer = GridQuantizer(ActivationGrid(8, 0.1, -128, 25.5, 0.0))
    >>> quantizer(torch.tensor([-1.0, 0.26, 30.0]))
    tensor([ 0.0000,  0.3000, 25.5000])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_amct.export.integer import ActivationGrid
from lightning_amct.quant.functional.fixed_grid import fixed_grid_fake_quant

#: The 8-bit range every grid of 8 bits or fewer is carried in.
CONTAINER_RANGE = (-128, 127)


class GridQuantizer(nn.Module):
    """Fake quantization on a fixed per-tensor grid (no state in the ``state_dict``).

    Args:
        grid: the grid (bits, scale, offset).

    Attributes:
        grid: the grid, kept so the model can be saved again.
    """

    def __init__(self, grid: ActivationGrid) -> None:
        super().__init__()
        self.grid = grid
        self.bounds = grid.bounds
        self.register_buffer("scale", torch.tensor(grid.scale, dtype=torch.float32), persistent=False)
        self.register_buffer("zero_point", torch.tensor(grid.offset, dtype=torch.int32), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = fixed_grid_fake_quant(x, self.scale, self.zero_point, *CONTAINER_RANGE)
        if self.grid.bits < 8:
            x = torch.clamp(x, *self.bounds)
        return x

    def extra_repr(self) -> str:
        return f"INT{self.grid.bits}, scale={self.grid.scale:.6g}, offset={self.grid.offset}"
