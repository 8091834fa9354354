"""The quantizer of a gate value: a sigmoid or hard sigmoid, on the fixed INT8 grid of ``[0, 1]``.

A gate value lies in ``[0, 1]`` whatever the data, so it needs no learned range: it is the ULQ
grid of ``clip_min = 0``, ``clip_max = 1`` (``s = 1/255``, ``o = -128``; in the deploy model
UINT8 with zero point 0), applied in training as in deployment, so that PyTorch and ONNX Runtime
compute the same values. This is what ``torch.ao`` does for a sigmoid with its fixed-qparams fake
quantize. ONNX Runtime then runs the sigmoid as a table lookup (QLinearSigmoid) and the multiply
that applies the gate in integers (QLinearMul). Which modules are gates:
:mod:`~lightning_amct.plan.gates`.

Example:
    >>> import torch
    >>> gate = GateQuantizer()
    >>> gate(torch.tensor([0.0, 0.5, 1.0]))
    tensor([0.0000, 0.4980, 1.0000])
    >>> round(1 / float(gate.scale)), int(gate.zero_point)
    (255, -128)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_amct.quant.functional.fixed_grid import fixed_grid_fake_quant
from lightning_amct.quant.functional.precision import int_range
from lightning_amct.quant.functional.ulq import ulq_scale_offset

#: The gate grid: bits and the clips ``(clip_max, clip_min)``.
GATE_BITS = 8
GATE_CLIPS = (1.0, 0.0)


class GateQuantizer(nn.Module):
    """Fake quantization on the fixed gate grid (no state: nothing in the ``state_dict``).

    Gradients pass straight through inside ``[0, 1]``
    (:func:`~lightning_amct.quant.functional.fixed_grid.fixed_grid_fake_quant`).
    """

    def __init__(self) -> None:
        super().__init__()
        clip_max, clip_min = (torch.tensor(clip) for clip in GATE_CLIPS)
        scale, offset = ulq_scale_offset(clip_max, clip_min, GATE_BITS)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("zero_point", offset.to(torch.int32), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return fixed_grid_fake_quant(x, self.scale, self.zero_point, *int_range(GATE_BITS))

    def extra_repr(self) -> str:
        return f"INT{GATE_BITS}, [{GATE_CLIPS[1]:g}, {GATE_CLIPS[0]:g}]"
