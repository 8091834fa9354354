"""The integer form of one compressed layer: what every artifact is written from.

:func:`integer_layer` reads a :class:`~lightning_amct.modules.compressed_layers.CompressedLayer`
as its forward computes it in eval mode and returns an :class:`IntegerLayer`: the 4:2 mask baked
in, the weight as integers with one scale per output channel (or one per tensor), the activation
grid (scale and offset) of its input, and the float bias. Dequantizing gives back exactly the
weight the fake-quant forward uses: ``weight_int * weight_scale`` is the same float32 product that
``clamp(round(w / s), q_lo, q_hi) * s`` computes.

Nothing here changes the model: a learned (WtsULQ) scale that no forward has initialised yet is
taken as the ARQ rule would set it at that first forward, and an activation quantizer that never
calibrated passes its input through, so the layer's activation stays float (with a note).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_amct.modules.compressed_layers import CompressedLinear
    >>> from lightning_amct.quant import ArqWeightQuantizer
    >>> layer = CompressedLinear.from_float(nn.Linear(4, 2), weight_quant=ArqWeightQuantizer(8, 0))
    >>> data = integer_layer("fc", layer)
    >>> data.weight_int.dtype, tuple(data.weight_scale.shape)
    (torch.int8, (2,))
    >>> torch.equal(data.weight(), layer.compressed_weight())
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from lightning_amct.export.sparse import is_4_2
from lightning_amct.modules.compressed_layers import CompressedLayer
from lightning_amct.quant import ActivationQuantizer, ArqWeightQuantizer, UlqWeightQuantizer
from lightning_amct.quant.functional import arq_scale, int_range


_INT32_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class ActivationGrid:
    """The fixed ULQ grid of a layer's input: ``y = (clamp(round(x/s + o), q_lo, q_hi) - o) * s``.

    Attributes:
        bits: activation bits.
        scale: ``s`` (a float32 value).
        offset: ``o``, an integer in ``[q_lo, q_hi]``.
        clip_max: the trained upper clip.
        clip_min: the trained lower clip.
    """

    bits: int
    scale: float
    offset: int
    clip_max: float
    clip_min: float

    @property
    def bounds(self) -> tuple[float, float]:
        """The smallest and largest representable values, ``((q_lo - o) s, (q_hi - o) s)`` in float32."""
        q_lo, q_hi = int_range(self.bits)
        scale = torch.tensor(self.scale, dtype=torch.float32)
        ends = torch.tensor([q_lo - self.offset, q_hi - self.offset], dtype=torch.float32) * scale
        return float(ends[0]), float(ends[1])


@dataclass(frozen=True)
class IntegerLayer:
    """One compressed layer in integer form.

    Attributes:
        name: module name in the model.
        layer_type: the plain layer class name (``"Conv2d"``).
        out_axis: output-channel axis of the weight (1 for ConvTranspose, else 0).
        in_axis: input-channel axis of the weight (the 4:2 axis).
        weight_bits: weight bits, or None when the weight is not quantized (4:2 only).
        weight_int: int8 weight values (in ``[-2^(n-1), 2^(n-1) - 1]``), when quantized.
        weight_scale: float32 scales, shape ``(C,)`` per channel or ``(1,)`` per tensor, when quantized.
        weight_float: the (masked) float weight, when not quantized.
        bias: float32 bias, or None.
        activation: the input's grid, or None when the input is not quantized.
        mask: the 4:2 mask (bool) when it can be stored 4:2, else None.
        folded_batchnorm: name of the BatchNorm folded into this layer, or None.
        notes: what the artifacts should say about this layer (a mask not chosen yet, ...).
    """

    name: str
    layer_type: str
    out_axis: int
    in_axis: int
    weight_bits: int | None
    weight_int: Tensor | None
    weight_scale: Tensor | None
    weight_float: Tensor | None
    bias: Tensor | None
    activation: ActivationGrid | None
    mask: Tensor | None
    folded_batchnorm: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def weight_shape(self) -> tuple[int, ...]:
        source = self.weight_int if self.weight_int is not None else self.weight_float
        return tuple(source.shape)

    def weight(self) -> Tensor:
        """The float32 weight the layer computes with (dequantized when quantized)."""
        if self.weight_int is None:
            return self.weight_float
        return self.weight_int.float() * self.weight_scale.reshape(self.scale_view_shape())

    def scale_view_shape(self) -> tuple[int, ...]:
        """Shape broadcasting ``weight_scale`` against the weight."""
        shape = [1] * len(self.weight_shape)
        if self.weight_scale is not None and self.weight_scale.numel() > 1:
            shape[self.out_axis] = self.weight_scale.numel()
        return tuple(shape)

    def deployed_bias(self) -> Tensor | None:
        """The bias as deployment computes with it: where input and weight are quantized, on the
        int32 grid of step ``s_x * s_w`` per output channel (:func:`int32_bias`); else the float bias."""
        if self.bias is None or self.activation is None or self.weight_scale is None:
            return self.bias
        found = int32_bias(self.bias.numpy(), self.activation.scale, self.weight_scale.numpy())
        if found is None:
            return self.bias
        integers, step = found
        return torch.from_numpy((integers.astype(np.float32) * step).astype(np.float32))

    def sparsity(self) -> float:
        """Share of exactly-zero weight entries."""
        source = self.weight_int if self.weight_int is not None else self.weight_float
        return float((source == 0).sum()) / max(source.numel(), 1)


def int32_bias(bias: np.ndarray, x_scale: float, w_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``bias`` as int32 integers on the grid of step ``s_x * s_w`` (per output channel), and that
    step, or None where an integer does not fit int32.

    This is the bias of ONNX Runtime's integer kernels, which it derives itself for a float bias,
    in float32 arithmetic: ``step = float32(s_x) * float32(s_w)``, integers ``round(b / step)``
    (half to even), value ``integers * step``. The frozen model computes with those values too, so
    all artifacts agree; the change from the float bias is at most half a step.

    ``w_scale`` holds one scale per channel of the weight's output axis, or one. A grouped
    transposed convolution's weight ``(C_in, C_out / groups, ...)`` has ``C_out / groups`` of them:
    output channel ``g * C_out / groups + j`` takes scale ``j``, so they repeat for every group.

    Example:
        >>> integers, step = int32_bias(np.array([0.1, -0.25], np.float32), 0.5, np.array([0.1, 0.1], np.float32))
        >>> integers.tolist()
        [2, -5]
    """
    w_scale = np.asarray(w_scale, dtype=np.float32).reshape(-1)
    if 1 < w_scale.size < bias.size:  # a grouped transposed convolution's
        w_scale = np.tile(w_scale, bias.size // w_scale.size)
    step = np.broadcast_to(np.float32(x_scale) * w_scale, bias.shape)
    integers = np.round(bias.astype(np.float32) / step)
    if not np.all(np.abs(integers) <= _INT32_LIMIT):
        return None
    return integers.astype(np.int32), np.ascontiguousarray(step, dtype=np.float32)


@torch.no_grad()
def integer_layer(name: str, layer: CompressedLayer) -> IntegerLayer:
    """The integer form of ``layer`` as its eval forward computes it.

    Args:
        name: the layer's module name.
        layer: a compressed layer (weight quantizer and/or 4:2 mask, activation quantizer or not).

    Raises:
        TypeError: the layer's weight quantizer is of an unknown kind.
    """
    notes: list[str] = []
    weight = layer.weight.detach().float().cpu()
    mask = None
    if layer.weight_mask is not None:
        dense_mask = layer.weight_mask.detach().cpu()
        weight = weight * dense_mask
        if is_4_2(dense_mask, layer.in_axis):
            mask = dense_mask.bool()
        else:
            notes.append("4:2 mask not chosen yet (no training batch ran): weight stored dense")
    weight_bits = weight_int = weight_scale = weight_float = None
    if layer.weight_quant is None:
        weight_float = weight.contiguous()
    else:
        weight_bits = layer.weight_quant.num_bits
        weight_scale = _weight_scale(layer.weight_quant, weight)
        q_lo, q_hi = int_range(weight_bits)
        view = [1] * weight.dim()
        if weight_scale.numel() > 1:
            view[layer.out_axis] = weight_scale.numel()
        weight_int = (weight / weight_scale.reshape(view)).round_().clamp_(q_lo, q_hi).to(torch.int8)
    activation = None if layer.act_quant is None else activation_grid(layer.act_quant)
    never_calibrated = layer.act_quant is not None and activation is None
    if never_calibrated:
        notes.append(
            "activation quantizer never calibrated (the layer ran in no training batch): input left in float, "
            "as the model runs it, and the weight stored as its quantized values in float"
        )
    bias = None if layer.bias is None else layer.bias.detach().float().cpu().clone()
    data = IntegerLayer(
        name=name,
        layer_type=layer.base_name(),
        out_axis=layer.out_axis,
        in_axis=layer.in_axis,
        weight_bits=weight_bits,
        weight_int=weight_int,
        weight_scale=weight_scale,
        weight_float=weight_float,
        bias=bias,
        activation=activation,
        mask=mask,
        notes=tuple(notes),
    )
    if never_calibrated and weight_int is not None:
        # ONNX Runtime would fuse integer weights under a float input into a kernel that quantizes
        # that input on the fly (MatMulNBits), which the model does not do: float weights instead
        return replace(data, weight_bits=None, weight_int=None, weight_scale=None, weight_float=data.weight())
    return data


def _weight_scale(quantizer: torch.nn.Module, weight: Tensor) -> Tensor:
    """The flat float32 scales the quantizer's next forward applies to ``weight``."""
    if isinstance(quantizer, ArqWeightQuantizer):
        return quantizer.scale(weight).float().cpu()
    if isinstance(quantizer, UlqWeightQuantizer):
        if bool(quantizer.initialized):
            return quantizer.effective_scale().reshape(-1).cpu()
        # Its first forward would set the scale by the ARQ rule: take that value, change nothing.
        return arq_scale(weight, quantizer.num_bits, quantizer.channel_axis).reshape(-1)
    raise TypeError(f"cannot export weight quantizer {type(quantizer).__name__}")


def activation_grid(quantizer: ActivationQuantizer) -> ActivationGrid | None:
    """The grid of the quantizer's next eval forward, or None if it passes inputs through."""
    if int(quantizer.calibrated_batches) == 0:
        return None
    scale, offset = quantizer.scale_offset()
    return ActivationGrid(
        bits=quantizer.num_bits,
        scale=float(scale.reshape(())),
        offset=int(offset.reshape(())),
        clip_max=float(quantizer.clip_max.detach().reshape(())),
        clip_min=0.0 if quantizer.fixed_min else float(quantizer.clip_min.detach().reshape(())),
    )
