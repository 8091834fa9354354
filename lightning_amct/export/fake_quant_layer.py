"""A compressed layer frozen for inference: fixed grids, no training state.

:class:`FakeQuantLayer` is what a compressed layer becomes in the model that
:func:`~lightning_amct.export.load_compressed` returns and in the copy that is exported to ONNX.
It holds the dequantized weight (``weight_int * weight_scale``, 4:2 mask and any folded
BatchNorm included), the bias on the int32 grid deployment computes with
(:meth:`~lightning_amct.export.integer.IntegerLayer.deployed_bias`), the activation grid as a :class:`~lightning_amct.export.grid_quantizer.GridQuantizer`
and the weight scales as buffers, and computes with torch's affine fake-quant operators, which the
ONNX exporter turns into QuantizeLinear/DequantizeLinear pairs:

* input: the grid quantizer (ULQ's grid with zero point ``o``; see its module for the rounding
  tolerance against the training-time layer);
* weight: ``fake_quantize_per_channel_affine`` (or per tensor) with zero point 0. The stored weight
  lies on the grid already, so this reproduces it exactly; it is there for the Q/DQ pair.

Attributes it does not have itself are the replaced layer's (``stride``, ``padding``...), as model
code may read them from the module it called.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_amct.export.integer import ActivationGrid, IntegerLayer
    >>> data = IntegerLayer("fc", "Linear", 0, 1, 8, torch.tensor([[100, -128]], dtype=torch.int8),
    ...                     torch.tensor([0.01]), None, None, ActivationGrid(8, 0.1, 0, 12.7, -12.8), None)
    >>> layer = FakeQuantLayer(nn.Linear(2, 1, bias=False), data)
    >>> layer(torch.tensor([[1.04, 20.0]]))
    tensor([[-15.2560]])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_amct.export.grid_quantizer import CONTAINER_RANGE, GridQuantizer
from lightning_amct.export.integer import IntegerLayer
from lightning_amct.modules.compressed_layers import compressed_class, instance_like


class FakeQuantLayer(nn.Module):
    """A frozen compressed layer: ``op(Qa(x), Qw(W_int * s), b)`` with fixed grids.

    Args:
        layer: a plain layer of the right shape (``nn.Conv2d``, ``nn.Linear``...); its weight and
            bias are replaced by the data's, so pass one that may be consumed.
        data: the layer's integer form.

    Attributes:
        data: the integer form, kept so the frozen model can be saved again.

    Raises:
        ValueError: the layer's weight shape differs from the data's.
    """

    def __init__(self, layer: nn.Module, data: IntegerLayer) -> None:
        super().__init__()
        if tuple(layer.weight.shape) != data.weight_shape:
            raise ValueError(
                f"layer {data.name}: the model's weight has shape {tuple(layer.weight.shape)}, "
                f"the stored one {data.weight_shape}"
            )
        layer = _without_parametrizations(layer)
        layer.weight = nn.Parameter(data.weight().clone(), requires_grad=False)
        bias = data.deployed_bias()
        layer.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)
        self.layer = compressed_class(layer).from_float(layer)
        self.data = data
        self.act_quant = None if data.activation is None else GridQuantizer(data.activation)
        self.weight_per_channel = data.weight_scale is not None and data.weight_scale.numel() > 1
        if data.weight_scale is not None:
            self.register_buffer("weight_scale", data.weight_scale.float().clone())
            self.register_buffer("weight_zero_point", torch.zeros(data.weight_scale.numel(), dtype=torch.int32))

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (read-only use: the layer is frozen)."""
        return self.layer.weight

    def __getattr__(self, name: str) -> object:
        """The replaced layer's attributes (``stride``, ``kernel_size``...): model code reads them,
        e.g. to pad TF-style before the convolution."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self._modules.get("layer")
            if layer is None or name.startswith("_"):
                raise
            return getattr(layer, name)

    @property
    def bias(self) -> Tensor | None:
        """The bias the layer computes with: BatchNorm folded in, on the int32 grid where input and
        weight are quantized."""
        return self.layer.bias

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        """The layer on its grids; further arguments as the layer takes them (a transposed
        convolution's ``output_size``)."""
        if self.act_quant is not None:
            x = self.act_quant(x)
        return self.layer.apply_weight(x, self._weight(), *args, **kwargs)

    def _weight(self) -> Tensor:
        weight = self.layer.weight
        if self.data.weight_scale is None:
            return weight
        if self.weight_per_channel:
            return torch.fake_quantize_per_channel_affine(
                weight, self.weight_scale, self.weight_zero_point, self.data.out_axis, *CONTAINER_RANGE
            )
        return torch.fake_quantize_per_tensor_affine(
            weight, self.weight_scale, self.weight_zero_point, *CONTAINER_RANGE
        )

    def extra_repr(self) -> str:
        weight = "float" if self.data.weight_bits is None else f"INT{self.data.weight_bits}"
        act = "float" if self.data.activation is None else f"INT{self.data.activation.bits}"
        return f"activation={act}, weight={weight}"


def _without_parametrizations(layer: nn.Module) -> nn.Module:
    """``layer`` as an instance of its class before ``torch.nn.utils.parametrize`` changed it, and
    without its parametrizations (``weight_norm``): the frozen layer stores the tensors they
    computed. Its own parametrization modules stay as they were (a compressed layer shares them)."""
    if not parametrize.is_parametrized(layer):
        return layer
    plain = instance_like(layer, type(layer).__bases__[0])
    del plain._modules["parametrizations"]
    return plain
