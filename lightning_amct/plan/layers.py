"""Which layers each feature can compress, what a config calls their types, and type-dependent defaults.

A layer is compressible when it is an instance of a supported torch class, subclasses included
(a model library's ``Linear`` or depthwise ``Conv2d`` subclass). A config's ``layer_type`` names
either the layer's own class or the supported class it derives from. A subclass that overrides
``forward`` is swapped for a compressed layer only when its captured graph shows that it computes
exactly what its base class does (see :func:`forward_obstacle`): a forward that standardises the
weight, adds an activation or reads the weight from elsewhere would be lost in the swap.

One layer that is not a torch class is supported too: ``Conv1D`` of GPT and GPT-2 (and of the
``transformers`` models that copy it), a Linear whose weight is stored transposed, ``(nx, nf)`` =
(inputs, outputs), computing ``addmm(bias, x.view(-1, nx), weight)`` viewed back to ``(..., nf)``.
It is recognised without importing ``transformers`` (:func:`is_conv1d`): a module whose class, or
a class it derives from, is named ``Conv1D``, holding a 2-D ``weight`` ``(nx, nf)``, a ``bias``
``(nf,)`` and the integers ``nx`` and ``nf``; and, as no torch class vouches for its forward, only
where its captured graph calls compute exactly that ``addmm`` on the call's input with its own
weight and bias. Without the graph, ``transformers``' own ``Conv1D`` (and subclasses that keep its
forward) is trusted as a torch class is, and any other class named ``Conv1D`` is left alone. A
config names it ``Conv1D``.

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
    >>> class Conv1D(nn.Module):  # the layout of transformers.pytorch_utils.Conv1D
    ...     def __init__(self, nf, nx):
    ...         super().__init__()
    ...         self.nf, self.nx = nf, nx
    ...         self.weight, self.bias = nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.zeros(nf))
    >>> type_names(Conv1D(6, 4)), weight_axes(Conv1D(6, 4)), weight_axes(nn.Linear(4, 6))
    (('Conv1D',), (1, 0), (0, 1))
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_amct.graph import ModelGraph, ModuleCall, Node, transposed_parameter

#: The supported torch classes, in the order errors list them.
SUPPORTED_CLASSES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
)

#: The class name of GPT-2's Linear with a transposed weight (see :func:`is_conv1d`).
CONV1D = "Conv1D"

#: Names of the supported layers: what can be quantized and 4:2-pruned (subclasses too).
QUANTIZABLE_TYPES: tuple[str, ...] = (*(cls.__name__ for cls in SUPPORTED_CLASSES), CONV1D)

#: Supported layers (by name) whose output channels filter pruning (BCP) can remove.
FILTER_PRUNABLE_TYPES: tuple[str, ...] = ("Conv1d", "Conv2d", "Conv3d", "Linear", CONV1D)
#: How messages name a type whose class name alone would mislead.
_DESCRIBED = {CONV1D: f"transformers' {CONV1D} (GPT-2)"}

#: Supported layers (by name) that are Linear layers: per-tensor weight scales by default.
LINEAR_TYPES: tuple[str, ...] = ("Linear", CONV1D)

#: The operator each supported layer computes, as the captured graph names it.
_OPERATORS = {
    "Linear": {"linear"},
    "Conv1d": {"conv1d", "convolution"},
    "Conv2d": {"conv2d", "convolution"},
    "Conv3d": {"conv3d", "convolution"},
    "ConvTranspose1d": {"conv_transpose1d", "convolution"},
    "ConvTranspose2d": {"conv_transpose2d", "convolution"},
}
#: Operators that pass a tensor on unchanged (a dtype conversion to the same dtype, an alias).
_PASSING = {"alias", "detach", "to", "_to_copy", "contiguous", "clone", "_assert_tensor_metadata"}
#: Operators that only reshape: ``Conv1D`` flattens its input to 2-D and its output back.
_RESHAPING = {"view", "reshape", "_unsafe_view"}
#: Where ``transformers`` defines its ``Conv1D`` (the second before version 4.26): trusted without the graph.
_KNOWN_CONV1D_MODULES = ("transformers.pytorch_utils", "transformers.modeling_utils")


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is laid out as GPT-2's ``Conv1D``: its class or a base named ``Conv1D``,
    a 2-D ``weight`` ``(nx, nf)``, a ``bias`` ``(nf,)`` and integer attributes ``nx`` and ``nf``.

    What it computes is checked from the graph (:func:`forward_obstacle`).
    """
    if not any(cls.__name__ == CONV1D for cls in type(module).__mro__):
        return False
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and isinstance(bias, torch.Tensor)
        and tuple(bias.shape) == (weight.shape[1],)
        and getattr(module, "nx", None) == weight.shape[0]
        and getattr(module, "nf", None) == weight.shape[1]
    )


def weight_axes(module: nn.Module) -> tuple[int, int]:
    """``(output axis, input axis)`` of ``module.weight``: ``(1, 0)`` for a transposed conv and for
    a ``Conv1D`` (weight ``(nx, nf)``), else ``(0, 1)``."""
    return (1, 0) if getattr(module, "transposed", False) or is_conv1d(module) else (0, 1)


def layer_type(module: nn.Module) -> str:
    """The name of ``module``'s own class, as the plan shows it (``Conv2d``, ``EfficientNetDepthwiseConv2d``)."""
    return type(module).__name__


def supported_base(module: nn.Module) -> type[nn.Module] | None:
    """The supported torch class ``module`` is an instance of (the nearest in its MRO), the class
    named ``Conv1D`` for a layer in that layout (:func:`is_conv1d`), or None."""
    if is_conv1d(module):
        return next(cls for cls in type(module).__mro__ if cls.__name__ == CONV1D)
    return next((cls for cls in type(module).__mro__ if cls in SUPPORTED_CLASSES), None)


def type_names(module: nn.Module) -> tuple[str, ...]:
    """The names a config's ``layer_type`` may use for ``module``: its class, then its supported base."""
    base = supported_base(module)
    return tuple(dict.fromkeys((layer_type(module), *((base.__name__,) if base else ()))))


def quantize_obstacle(module: nn.Module) -> str | None:
    """Why ``module`` cannot be compressed, from its class and settings alone, or None."""
    if supported_base(module) is None:
        torch_types = ", ".join(cls.__name__ for cls in SUPPORTED_CLASSES)
        return (
            f"compressible types: {torch_types} and their subclasses, and GPT-2's {CONV1D} "
            "(weight (nx, nf), bias (nf,), attributes nx and nf)"
        )
    padding = getattr(module, "padding_mode", "zeros")
    if padding != "zeros":
        return f"padding_mode='{padding}' (compressed convolutions pad with zeros)"
    return None


def forward_obstacle(module: nn.Module, name: str, graph: ModelGraph | None) -> str | None:
    """Why swapping ``module`` (named ``name``) for a compressed layer would change the model, or None.

    With the graph: the model must call the module, and a subclass that overrides ``forward``
    must compute exactly its base class's operator on its input with its own weight and bias (a
    Linear may write it out, ``x @ W.T + b``); a ``Conv1D`` (no torch class vouches for its
    forward) always must. Without the graph a subclass that overrides ``forward`` is not swapped,
    nor a ``Conv1D`` other than ``transformers``' own.
    """
    base = supported_base(module)
    conv1d = base.__name__ == CONV1D
    overrides = type(module).forward is not base.forward
    if graph is None:
        if conv1d and base.__module__ not in _KNOWN_CONV1D_MODULES:
            return (
                f"a {CONV1D} of {base.__module__} is swapped only where the graph shows what it computes, "
                "and there is no graph"
            )
        return "its class overrides forward and there is no graph to check it" if overrides else None
    overrides = overrides or conv1d
    calls = graph.calls(name)
    if not calls:
        return "the model does not call it on the example inputs (its weight may be read directly)"
    if not overrides:
        return None
    for call in calls:
        ops = [node for node in call.nodes if node.op not in _PASSING and not (conv1d and node.op in _RESHAPING)]
        own = {f"{name}.weight", f"{name}.bias"}
        reads = {arg.target for node in call.nodes for arg in node.tensor_args() if arg.kind == "parameter"}
        if conv1d:
            plain = len(ops) == 1 and _is_conv1d_call(call, ops[0], name, module)
        elif base is nn.Linear and _is_written_out_linear(ops, name):
            plain = True
        else:
            plain = len(ops) == 1 and ops[0].op in _OPERATORS[base.__name__] and reads <= own
            plain = plain and f"{name}.weight" in reads
        if not plain:
            done = ", ".join(dict.fromkeys(node.op for node in ops)) or "nothing"
            what = f"addmm(bias, input, weight) as a {CONV1D} does" if conv1d else f"a plain {base.__name__}"
            return f"its forward computes {done}, not {what}: swapping it for a compressed layer would change the model"
    return None


def _is_conv1d_call(call: ModuleCall, op: Node, name: str, module: nn.Module) -> bool:
    """Whether ``call`` computes ``addmm(bias, x.view(-1, nx), weight).view(*x.shape[:-1], nf)`` on
    its one input ``x``, with the layer's own weight and bias (``op`` its one non-reshaping operator)."""
    bias, flat, weight = (op.arg(i, key) for i, key in enumerate(("self", "mat1", "mat2")))
    if op.op != "addmm" or op.arg(3, "beta", 1) != 1 or op.arg(4, "alpha", 1) != 1:
        return False
    if not all(isinstance(v, Node) for v in (bias, flat, weight)) or len(call.inputs) != 1 or len(call.outputs) != 1:
        return False
    (source,), (result,) = call.inputs, call.outputs
    return (
        (bias.target, weight.target) == (f"{name}.bias", f"{name}.weight")
        and source.shape is not None
        and source.shape[-1:] == (module.nx,)
        and flat.shape == (math.prod(source.shape[:-1]), module.nx)
        and result.shape == (*source.shape[:-1], module.nf)
    )


def _is_written_out_linear(ops: list[Node], name: str) -> bool:
    """Whether ``ops`` compute ``input @ weight.T`` (``+ bias``) with the layer's own weight and bias:
    a Linear written out with a matrix product, as Falcon's ``FalconLinear`` is. The compressed
    layer computes the same with ``F.linear`` (equal but for float rounding)."""
    if len(ops) not in (2, 3):
        return False
    transposed, product, *rest = ops
    weight = transposed_parameter(transposed)
    if weight is None or weight.target != f"{name}.weight":
        return False
    if product.op not in ("matmul", "mm") or len(product.args) < 2 or product.args[1] is not transposed:
        return False
    if _is_parameter(product.args[0]):
        return False
    if not rest:
        return True
    (add,) = rest
    operands = set(map(id, add.args[:2]))
    bias = next((a for a in add.args[:2] if _is_parameter(a, f"{name}.bias")), None)
    return add.op in ("add", "add_") and bias is not None and operands == {id(product), id(bias)}


def _is_parameter(value: object, target: str | None = None) -> bool:
    """Whether ``value`` is a parameter node (named ``target``, where given)."""
    return isinstance(value, Node) and value.kind == "parameter" and (target is None or value.target == target)


def filter_prune_obstacle(module: nn.Module) -> str | None:
    """Why filter pruning cannot remove ``module``'s output channels, or None when it can."""
    base = supported_base(module)
    if base is None or base.__name__ not in FILTER_PRUNABLE_TYPES:
        *others, last = [_DESCRIBED.get(name, name) for name in FILTER_PRUNABLE_TYPES]
        kind = type(module).__name__ if base is None else base.__name__
        return f"filter pruning removes output channels of {', '.join(others)} and {last} only, not of {kind}"
    groups = getattr(module, "groups", 1)
    if base in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and groups > 1 and groups == module.in_channels:
        return "a depthwise conv is not a producer: it shrinks in step with its input"
    return None


def n_out_of_m_obstacle(module: nn.Module) -> str | None:
    """Why 4:2 sparsity would leave ``module``'s weights dense, or None when it applies.

    4:2 keeps 2 of every 4 weights along the input channels (per group of a grouped conv): with 2
    input channels or fewer every weight is kept.
    """
    inputs = module.weight.shape[weight_axes(module)[1]]
    if inputs <= 2:
        return f"4:2 keeps every weight of a layer with {inputs} input channel(s) per group (it needs more than 2)"
    return None


def default_channel_wise(base: str) -> bool:
    """Schema default of ``channel_wise``: per-channel scales for convolutions, per-tensor for Linear
    (and ``Conv1D``, a Linear)."""
    return base not in LINEAR_TYPES
