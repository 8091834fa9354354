"""Weight quantizers: ARQ (scale from the current weights) and WtsULQ (learned scale).

Both are symmetric with offset 0, per output channel or per tensor. ``channel_axis`` is the
output-channel axis of the weight they receive: 0 for Linear and Conv, 1 for ConvTranspose
(``(C_in, C_out/groups, ...)``), None for one scale per tensor.

Example:
    >>> w = torch.tensor([[0.5, -1.0], [0.25, 0.1]])
    >>> ArqWeightQuantizer(num_bits=4, channel_axis=0).scale(w)
    tensor([0.1250, 0.0357])
    >>> quantizer = UlqWeightQuantizer(num_bits=4, channel_axis=0, num_channels=2)
    >>> quantizer(w).detach()  # the first forward initialises the learned scale by the ARQ rule
    tensor([[ 0.5000, -1.0000],
            [ 0.2500,  0.1071]])
    >>> quantizer.scale
    Parameter containing:
    tensor([0.1250, 0.0357], requires_grad=True)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_amct.quant.functional.arq import arq_fake_quant, arq_scale
from lightning_amct.quant.functional.precision import validate_num_bits
from lightning_amct.quant.functional.wts_ulq import wts_ulq_effective_scale, wts_ulq_fake_quant


class ArqWeightQuantizer(nn.Module):
    """ARQ fake quantization: the scale is recomputed from the weights at every forward.

    Stateless; the gradient is straight-through.

    Args:
        num_bits: weight bits (4 or 8 in the config).
        channel_axis: output-channel axis, or None for per tensor.

    Raises:
        ValueError: bad ``num_bits``.
    """

    def __init__(self, num_bits: int, channel_axis: int | None) -> None:
        super().__init__()
        validate_num_bits(num_bits)
        self.num_bits = num_bits
        self.channel_axis = channel_axis

    def forward(self, w: Tensor) -> Tensor:
        return arq_fake_quant(w, self.num_bits, self.channel_axis)

    @torch.no_grad()
    def scale(self, w: Tensor) -> Tensor:
        """The scales ``forward(w)`` uses, flattened: shape ``(C,)``, or ``(1,)`` per tensor; for export."""
        return arq_scale(w, self.num_bits, self.channel_axis).reshape(-1)

    def extra_repr(self) -> str:
        return f"num_bits={self.num_bits}, channel_axis={self.channel_axis}"


class UlqWeightQuantizer(nn.Module):
    """WtsULQ fake quantization with a learned scale, initialised by the ARQ rule.

    The first forward (in any mode) sets ``scale`` from the weights it receives, under no_grad;
    from then on ``scale`` is a free Parameter trained through
    :func:`~lightning_amct.quant.functional.wts_ulq_fake_quant`'s gradient. The ``initialized``
    buffer records this in the ``state_dict``, so a resumed run never re-initialises. Create the
    quantizer before the optimizer, so that ``scale`` is among the optimised parameters.

    Args:
        num_bits: weight bits (4 or 8 in the config).
        channel_axis: output-channel axis, or None for per tensor.
        num_channels: size of the output-channel axis (ignored per tensor: one scale).

    Raises:
        ValueError: bad ``num_bits`` or ``num_channels`` < 1.
    """

    def __init__(self, num_bits: int, channel_axis: int | None, num_channels: int) -> None:
        super().__init__()
        validate_num_bits(num_bits)
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        self.num_bits = num_bits
        self.channel_axis = channel_axis
        self.scale = nn.Parameter(torch.ones(num_channels if channel_axis is not None else 1))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized: bool | None = False  # host copy of the buffer; None: read it
        self.register_load_state_dict_post_hook(_forget_host_state)

    def forward(self, w: Tensor) -> Tensor:
        """Fake-quantize ``w`` (initialising ``scale`` from it on the first call).

        Raises:
            ValueError: ``w`` does not have ``num_channels`` channels on ``channel_axis``.
        """
        if self._initialized is None:
            self._initialized = bool(self.initialized)
        if not self._initialized:
            self._initialize(w)
        return wts_ulq_fake_quant(w, self.scale, self.num_bits, self.channel_axis)

    @torch.no_grad()
    def effective_scale(self) -> Tensor:
        """The scales the forward uses (a scale trained below 1.1920929e-7 acts as 1); for export."""
        return wts_ulq_effective_scale(self.scale)

    def extra_repr(self) -> str:
        return f"num_bits={self.num_bits}, channel_axis={self.channel_axis}, num_channels={self.scale.numel()}"

    @torch.no_grad()
    def _initialize(self, w: Tensor) -> None:
        scale = arq_scale(w, self.num_bits, self.channel_axis)
        if scale.numel() != self.scale.numel():
            raise ValueError(
                f"weight of shape {tuple(w.shape)} has {scale.numel()} channels on axis {self.channel_axis}, "
                f"but the quantizer was built for {self.scale.numel()}"
            )
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.initialized.fill_(True)
        self._initialized = True


def _forget_host_state(module: UlqWeightQuantizer, incompatible_keys: object) -> None:
    """After ``load_state_dict``: re-read ``initialized`` at the next forward."""
    module._initialized = None
