"""A ReLU that leaves itself to the one compressed layer reading its output, where that layer can apply it.

In a Conv-BN-ReLU block before a quantized layer, the ReLU costs a pass over the activation in
the forward (``relu_``) and one in the backward (``threshold_backward``), about 3 % of a training
step of a small CNN on the CPU. A layer that quantizes its input inside its own autograd node
(:mod:`~lightning_amct.quant.functional.ulq_layer`) with ``fixed_min`` needs neither: its
quantizer maps every ``x <= 0`` to 0 as ReLU does, and its backward pass computes ReLU's
gradient on the way. The plan names such ReLUs (``CompressionPlan.input_relus``): ``nn.ReLU``
modules called once, whose output only that layer reads (reshapes aside).

:class:`InputReLU` takes such a module's place. Before each forward it asks its reader
(:meth:`~lightning_amct.modules.compressed_layers.CompressedLayer.defer_relu`): where the reader
will quantize in its own node, the module hands its input on unchanged and the reader applies
ReLU; elsewhere (evaluation, ``torch.compile``, calibration, CUDA) it is a ReLU. A reader told to
apply ReLU that then cannot quantize in its node applies ``torch.relu`` first: values and
gradients never depend on the choice. :func:`restore_relus` puts plain ``nn.ReLU`` modules back
(the exported and frozen models).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_amct import compress_model
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> model = compress_model(model, "retrain_data_quant_config { ulq_quantize {} }", torch.zeros(1, 4))
    >>> type(model[1]).__name__, dict(restore_relus(model)), type(model[1]).__name__
    ('InputReLU', {'1': '2'}, 'ReLU')
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_amct.modules.replace import replace_module


class InputReLU(nn.ReLU):
    """An ``nn.ReLU`` whose output only ``reader`` reads (see the module docstring).

    The reader is held outside the module tree (it is not a submodule): copies and pickles keep
    the link, ``state_dict`` and ``named_modules`` do not see it.
    """

    def __init__(self, reader: nn.Module, inplace: bool = False) -> None:
        super().__init__(inplace)
        self.__dict__["reader"] = reader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reader.defer_relu(x):
            return x
        return super().forward(x)


def defer_relus(model: nn.Module, relus: dict[str, str]) -> None:
    """Replace each ``nn.ReLU`` named in ``relus`` (ReLU → the layer that reads its output) by an :class:`InputReLU`."""
    for relu_name, layer_name in relus.items():
        relu = model.get_submodule(relu_name)
        if type(relu) is not nn.ReLU:
            raise ValueError(f"the plan expects '{relu_name}' to be an nn.ReLU, the model has a {type(relu).__name__}")
        replace_module(model, relu_name, InputReLU(model.get_submodule(layer_name), relu.inplace))


def restore_relus(model: nn.Module) -> dict[str, str]:
    """Put a plain ``nn.ReLU`` in place of each :class:`InputReLU`; returns them as ReLU → reader name."""
    names = {id(module): name for name, module in model.named_modules()}
    restored = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, InputReLU):
            restored[name] = names.get(id(module.reader), "")
            replace_module(model, name, nn.ReLU(module.inplace))
    return restored
