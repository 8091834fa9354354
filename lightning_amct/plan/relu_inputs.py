"""Which layers read a non-negative input: the graph fact behind the ``fixed_min`` default.

The schema's default is ``fixed_min: true`` when a layer's input comes from a ReLU. We follow the
input back through operations that keep a non-negative tensor non-negative (pooling, flatten,
dropout, identity, padding with zeros), so ``ReLU → MaxPool → Conv`` and
``ReLU → AdaptiveAvgPool → Flatten → Linear`` count as ReLU inputs too.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = {F.relu, torch.relu, F.relu6, torch.relu_, F.relu_}
_SIGN_KEEPING_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
)  # fmt: skip
_SIGN_KEEPING_FUNCTIONS = {
    torch.flatten, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
    F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout,
    operator.getitem,
}  # fmt: skip
_SIGN_KEEPING_METHODS = {"flatten", "view", "reshape", "contiguous", "relu", "clamp_min"}


def is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` applies a ReLU (module, function or tensor method)."""
    if node.op == "call_module":
        return isinstance(modules[node.target], _RELU_MODULES)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target == "relu"


def is_non_negative(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s output is a ReLU output, possibly through sign-keeping operations."""
    while True:
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, _RELU_MODULES):
                return True
            if not isinstance(module, _SIGN_KEEPING_MODULES):
                return False
        elif node.op == "call_function":
            if node.target in _RELU_FUNCTIONS:
                return True
            if node.target not in _SIGN_KEEPING_FUNCTIONS:
                return False
        elif node.op == "call_method":
            if node.target == "relu":
                return True
            if node.target not in _SIGN_KEEPING_METHODS:
                return False
        else:
            return False
        if not node.args or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]


def layers_reading_relu_output(graph_module: fx.GraphModule) -> set[str]:
    """Names of the leaf modules whose first input is a ReLU output (through sign-keeping ops)."""
    modules = dict(graph_module.named_modules())
    verdicts: dict[str, bool] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            first = node.args[0] if node.args else None
            non_negative = isinstance(first, fx.Node) and is_non_negative(first, modules)
            # A module called several times counts only when every call reads a ReLU output.
            verdicts[node.target] = verdicts.get(node.target, True) and non_negative
    return {name for name, non_negative in verdicts.items() if non_negative}
