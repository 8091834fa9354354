"""Quantization-aware training: the math (:mod:`.functional`) and the stateful quantizers.

* :class:`ActivationQuantizer`: ULQ on a layer's input, learnable clips initialised by IFMR.
* :class:`ArqWeightQuantizer`: ARQ on the weights, scale recomputed every forward.
* :class:`UlqWeightQuantizer`: WtsULQ on the weights, learned scale initialised by ARQ.
* :class:`GateQuantizer`: a gate value (sigmoid, hard sigmoid) on the fixed grid of ``[0, 1]``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(4, 2)
    >>> act, wts = ActivationQuantizer(8, fixed_min=False, init_clip=(1.0, -1.0)), ArqWeightQuantizer(8, 0)
    >>> nn.functional.linear(act(torch.ones(3, 4)), wts(layer.weight), layer.bias).shape
    torch.Size([3, 2])
"""

from lightning_amct.quant.activation import ActivationQuantizer
from lightning_amct.quant.functional import (
    IfmrObserver,
    arq_fake_quant,
    arq_scale,
    ifmr_clip,
    round_scale_fp16,
    ulq_fake_quant,
    ulq_scale_offset,
    wts_ulq_effective_scale,
    wts_ulq_fake_quant,
)
from lightning_amct.quant.gate import GateQuantizer
from lightning_amct.quant.weight import ArqWeightQuantizer, UlqWeightQuantizer

__all__ = [
    "ActivationQuantizer",
    "ArqWeightQuantizer",
    "GateQuantizer",
    "IfmrObserver",
    "UlqWeightQuantizer",
    "arq_fake_quant",
    "arq_scale",
    "ifmr_clip",
    "round_scale_fp16",
    "ulq_fake_quant",
    "ulq_scale_offset",
    "wts_ulq_effective_scale",
    "wts_ulq_fake_quant",
]
