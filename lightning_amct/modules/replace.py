"""Swapping one module of a model for another, by its name in ``model.named_modules()``."""

from __future__ import annotations

from torch import nn


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``model.get_submodule(name)`` is.

    An ``nn.TransformerEncoderLayer`` above it is taken off torch's fused inference path (eval
    mode without gradients: Lightning's validation, test and predict), which reads the weights of
    the layer's Linear modules itself and would never call ``new``
    (:func:`keep_submodules_called`).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> replace_module(model, "1", nn.Identity())
        >>> model
        Sequential(
          (0): Linear(in_features=2, out_features=2, bias=True)
          (1): Identity()
        )
    """
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    keep_submodules_called(model, name)


def keep_submodules_called(model: nn.Module, name: str) -> None:
    """Make every ``nn.TransformerEncoderLayer`` that holds submodule ``name`` call its submodules
    in every mode.

    In eval mode without gradients such a layer runs one fused operator on its parameters
    (``torch._transformer_encoder_layer_fwd``) instead of its modules, where its activation is
    ReLU or GELU. Marking the activation as neither (``activation_relu_or_gelu = 0``, which serves
    that choice alone: the layer still applies its ``activation``) keeps it on the path that
    training takes, the same values computed by the modules. ``nn.MultiheadAttention`` alone is
    left as it is: it reads ``out_proj``'s weight itself on both paths, so its ``out_proj`` is
    never compressed (the graph does not see it called).

    Example:
        >>> block = nn.TransformerEncoderLayer(8, 2, batch_first=True)
        >>> encoder = nn.TransformerEncoder(block, 1, enable_nested_tensor=False)
        >>> keep_submodules_called(encoder, "layers.0.linear1")
        >>> encoder.layers[0].activation_relu_or_gelu
        0
    """
    parts = name.split(".")
    for depth in range(len(parts)):
        module = model.get_submodule(".".join(parts[:depth]))
        if isinstance(module, nn.TransformerEncoderLayer):
            module.activation_relu_or_gelu = 0
