"""Which layers each feature can compress, what a config calls their types, and type-dependent defaults.

A layer is compressible when it is an instance of a supported torch class, subclasses included
(a model library's ``Linear`` or depthwise ``Conv2d`` subclass). A config's ``layer_type`` names
either the layer's own class or the supported class it derives from. A subclass that overrides
``forward`` is swapped for a compressed layer only when its captured graph shows that it computes
exactly what its base class does (see :func:`forward_obstacle`): a forward that standardises the
weight, adds an activation or reads the weight from elsewhere would be lost in the swap.

Example:
    >>> from torch import nn
    >>> class Linear(nn.Linear):  # a library's own subclass, of the same name
    ...     pass
    >>> class Depthwise(nn.Conv2d):
    ...     pass
    >>> type_names(Linear(2, 2)), type_names(Depthwise(4, 4, 3, groups=4))
    (('Linear',), ('Depthwise', 'Conv2d'))
    >>> quantize_obstacle(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))
    "padding_mode='reflect' (compressed convolutions pad with zeros)"
"""

from __future__ import annotations

from torch import nn

from lightning_amct.graph import ModelGraph

#: The supported torch classes, in the order errors list them.
SUPPORTED_CLASSES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
)

#: Names of the supported classes: what can be quantized and 4:2-pruned (subclasses too).
QUANTIZABLE_TYPES: tuple[str, ...] = tuple(cls.__name__ for cls in SUPPORTED_CLASSES)

#: Supported classes (by name) whose output channels filter pruning (BCP) can remove.
FILTER_PRUNABLE_TYPES: tuple[str, ...] = ("Conv2d", "Linear")

#: The operator each supported class computes, as the captured graph names it.
_OPERATORS = {
    nn.Linear: {"linear"},
    nn.Conv1d: {"conv1d", "convolution"},
    nn.Conv2d: {"conv2d", "convolution"},
    nn.Conv3d: {"conv3d", "convolution"},
    nn.ConvTranspose1d: {"conv_transpose1d", "convolution"},
    nn.ConvTranspose2d: {"conv_transpose2d", "convolution"},
}
#: Operators that pass a tensor on unchanged (a dtype conversion to the same dtype, an alias).
_PASSING = {"alias", "detach", "to", "_to_copy", "contiguous", "clone", "_assert_tensor_metadata"}


def layer_type(module: nn.Module) -> str:
    """The name of ``module``'s own class, as the plan shows it (``Conv2d``, ``EfficientNetDepthwiseConv2d``)."""
    return type(module).__name__


def supported_base(module: nn.Module) -> type[nn.Module] | None:
    """The supported torch class ``module`` is an instance of (the nearest in its MRO), or None."""
    return next((cls for cls in type(module).__mro__ if cls in _OPERATORS), None)


def type_names(module: nn.Module) -> tuple[str, ...]:
    """The names a config's ``layer_type`` may use for ``module``: its class, then its supported base."""
    base = supported_base(module)
    return tuple(dict.fromkeys((layer_type(module), *((base.__name__,) if base else ()))))


def quantize_obstacle(module: nn.Module) -> str | None:
    """Why ``module`` cannot be compressed, from its class and settings alone, or None."""
    if supported_base(module) is None:
        return f"compressible types: {', '.join(QUANTIZABLE_TYPES)} and their subclasses"
    padding = getattr(module, "padding_mode", "zeros")
    if padding != "zeros":
        return f"padding_mode='{padding}' (compressed convolutions pad with zeros)"
    return None


def forward_obstacle(module: nn.Module, name: str, graph: ModelGraph | None) -> str | None:
    """Why swapping ``module`` (named ``name``) for a compressed layer would change the model, or None.

    With the graph: the model must call the module, and a subclass that overrides ``forward``
    must compute exactly its base class's operator on its input with its own weight and bias.
    Without the graph a subclass that overrides ``forward`` is not swapped.
    """
    base = supported_base(module)
    overrides = type(module).forward is not base.forward
    if graph is None:
        return "its class overrides forward and there is no graph to check it" if overrides else None
    calls = graph.calls(name)
    if not calls:
        return "the model does not call it on the example inputs (its weight may be read directly)"
    if not overrides:
        return None
    for call in calls:
        ops = [node for node in call.nodes if node.op not in _PASSING]
        own = {f"{name}.weight", f"{name}.bias"}
        reads = {arg.target for node in call.nodes for arg in node.tensor_args() if arg.kind == "parameter"}
        if len(ops) != 1 or ops[0].op not in _OPERATORS[base] or not reads <= own or f"{name}.weight" not in reads:
            done = ", ".join(dict.fromkeys(node.op for node in ops)) or "nothing"
            return (
                f"its forward computes {done}, not a plain {base.__name__}: "
                "swapping it for a compressed layer would change the model"
            )
    return None


def filter_prune_obstacle(module: nn.Module) -> str | None:
    """Why filter pruning cannot remove ``module``'s output channels, or None when it can."""
    base = supported_base(module)
    if base is None or base.__name__ not in FILTER_PRUNABLE_TYPES:
        return f"filter pruning removes output channels of {' and '.join(FILTER_PRUNABLE_TYPES)} only"
    groups = getattr(module, "groups", 1)
    if base is nn.Conv2d and groups > 1 and groups == module.in_channels:
        return "a depthwise conv is not a producer: it shrinks in step with its input"
    return None


def n_out_of_m_obstacle(module: nn.Module) -> str | None:
    """Why 4:2 sparsity would leave ``module``'s weights dense, or None when it applies.

    4:2 keeps 2 of every 4 weights along the input channels (per group of a grouped conv): with 2
    input channels or fewer every weight is kept.
    """
    if isinstance(module, nn.Linear):
        inputs = module.in_features
    else:
        inputs = module.weight.shape[0 if getattr(module, "transposed", False) else 1]
    if inputs <= 2:
        return f"4:2 keeps every weight of a layer with {inputs} input channel(s) per group (it needs more than 2)"
    return None


def default_channel_wise(base: str) -> bool:
    """Schema default of ``channel_wise``: per-channel scales for convolutions, per-tensor for Linear."""
    return base != "Linear"
