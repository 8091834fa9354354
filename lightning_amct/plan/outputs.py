"""Which tensors must be quantized too, for a deploy model that ONNX Runtime runs in integers.

The AMCT dialect quantizes the *inputs* of layers. ONNX Runtime runs a convolution with an integer
kernel (QLinearConv) only when its output is quantized as well, and it runs an add or multiply of
two tensors, an average pool, a sigmoid or a concatenation in integers (QLinearAdd, QLinearMul,
QLinearGlobalAveragePool, QLinearSigmoid, QLinearConcat) only when its inputs and its output are.
A Linear layer needs no quantized output: QGemm and MatMulIntegerToFloat write float. With
``quantize_outputs`` the plan adds **output quantizers** where these need them, trained like any
activation quantizer (ULQ, IFMR-initialised clips), so that training sees exactly what
deployment runs:

1. the end of each quantized convolution's chain (the layer, then a BatchNorm, then a ReLU/ReLU6,
   each called once and the only reader of what comes before), unless quantized layers alone
   read it;
2. any other tensor that a quantized layer reads among other readers;
3. the inputs and the output of every add or multiply of two tensors, average pool, sigmoid and
   concatenation: where one of them cannot be quantized (below), the operation stays float.

Readers are found through operations that keep values on their grid (max pooling, flatten,
reshape, permute, dropout, identity): quantizing before or after them is the same.

A quantizer is applied by a forward hook on the module whose output the tensor is: a module
called once whose ``forward`` returns exactly that tensor (a layer, a ReLU, a squeeze-excite block
that ends in its multiply, a residual block that ends in its add); the module is the quantizer's
*site*. A ReLU in any form that is the tensor's only reader is looked through, when the module
returning its output can be found: its output is quantized then, on a grid from 0, and the deploy
model drops the ReLU (quantizing clamps at 0 anyway). A tensor no module returns (one computed
inside a ``forward`` and used there) cannot be quantized; nor can the model's inputs and outputs.

Where quantized layers read the tensor, with one activation quantizer among them, the site reuses
that quantizer (``shared_with``): the tensor is quantized once, and every reader, the residual add
included, reads the same values.

Example:
    >>> from lightning_amct.demo import DemoNet
    >>> from lightning_amct.graph import trace_model
    >>> from lightning_amct.plan.specs import QuantSpec
    >>> spec = QuantSpec(8, None, True, "arq", 8, True)
    >>> layers = ("stem.conv", "block.conv1", "block.conv2", "depthwise.conv", "pointwise.conv", "fc")
    >>> sites = output_sites(trace_model(DemoNet()), {name: spec for name in layers})
    >>> {site: (spec.after, spec.shared_with) for site, spec in sites.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'stem.relu': ('stem.conv', 'block.conv1'), 'block.bn2': ('block.conv2', None),
     'block.relu2': ('block.relu2', 'depthwise.conv'), 'pointwise.relu': ('pointwise.conv', None), 'gap': ('gap', 'fc')}
"""

from __future__ import annotations

import operator
from collections import Counter, defaultdict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_amct.plan.relu_inputs import is_non_negative, is_relu
from lightning_amct.plan.sharing import shared_quantizers
from lightning_amct.plan.specs import OutputSpec, QuantSpec

_CHAIN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6)

#: Operations that keep every value on its grid: quantizing before or after them is the same.
_KEEPS_GRID_MODULES = (
    nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_KEEPS_GRID_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.dropout,
}  # fmt: skip
_KEEPS_GRID_METHODS = {"flatten", "view", "reshape", "permute", "transpose", "contiguous", "squeeze", "unsqueeze"}

#: Operations ONNX Runtime runs in integers when their inputs and output are quantized.
_TWO_INPUT_FUNCTIONS = {operator.add, operator.iadd, operator.mul, operator.imul, torch.add, torch.mul}
_TWO_INPUT_METHODS = {"add", "add_", "mul", "mul_"}
_ONE_INPUT_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.Sigmoid)
_ONE_INPUT_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.avg_pool1d, F.avg_pool2d, torch.sigmoid, F.sigmoid}
_CONCAT_FUNCTIONS = {torch.cat, torch.concat}


def output_sites(graph_module: fx.GraphModule, specs: Mapping[str, QuantSpec]) -> dict[str, OutputSpec]:
    """The output quantizers a model needs, by the name of the module whose output they quantize.

    Args:
        graph_module: the model's ``torch.fx`` graph (standard layers as leaves).
        specs: the quantized layers' settings.

    Returns:
        Site module name → :class:`~lightning_amct.plan.specs.OutputSpec`, in graph order.
    """
    return _Placement(graph_module, specs).sites()


class _Placement:
    """The graph facts the rules read, and the sites they choose."""

    def __init__(self, graph_module: fx.GraphModule, specs: Mapping[str, QuantSpec]) -> None:
        self.graph = graph_module.graph
        self.modules = dict(graph_module.named_modules())
        self.specs = specs
        self.owners = shared_quantizers(graph_module, specs)
        self.escaping: dict[str, list[fx.Node]] = defaultdict(list)  # scope key -> values leaving it
        keys: dict[str, set[str]] = defaultdict(set)  # module path -> its calls' keys ("path", "path@1"...)
        for node in self.graph.nodes:
            for key in _scope_keys(node):
                keys[_scope_path(node, key)].add(key)
                if any(key not in _scope_keys(user) for user in node.users):
                    self.escaping[key].append(node)
        self.calls = {path: len(found) for path, found in keys.items()}
        self.chosen: dict[str, tuple[fx.Node, OutputSpec]] = {}

    def sites(self) -> dict[str, OutputSpec]:
        for node in self.graph.nodes:  # rule 1: the ends of quantized convolutions' chains
            if self._is_layer(node) and not isinstance(self.modules[node.target], nn.Linear):
                self._quantize(self._chain_end(node), after=node.target, only_if_others_read=True)
        for node in self.graph.nodes:  # rule 2: tensors quantized layers read among other readers
            if node.op != "output" and not self._is_layer(node):
                owners, others = self._readers(node)
                if len(owners) == 1 and others:
                    self._quantize(node, after=None, only_if_others_read=True)
        for node in self.graph.nodes:  # rule 3: inputs and outputs of operations run in integers
            inputs = self._integer_op_inputs(node)
            if inputs is None:
                continue
            plans = [self._site_for(value) for value in (*inputs, node)]
            if all(plan is not None or self._quantized(value) for plan, value in zip(plans, (*inputs, node))):
                for value in (*inputs, node):
                    if not self._quantized(value):
                        self._quantize(value, after=None, only_if_others_read=False)
        order = {node: index for index, node in enumerate(self.graph.nodes)}
        chosen = sorted(self.chosen.items(), key=lambda item: order[item[1][0]])
        return {site: spec for site, (_, spec) in chosen}

    # -- the rules' building blocks ------------------------------------------------------------
    def _quantize(self, value: fx.Node, after: str | None, only_if_others_read: bool) -> None:
        """Choose a site for ``value`` (its ReLUs looked through where that can be hooked)."""
        end = _through_relus(value, self.modules)
        if any(user.op == "output" for user in end.users):
            return  # the model's output stays float
        if only_if_others_read and not self._readers(end)[1]:
            return  # quantized layers alone read it: their own quantizer does it
        found = self._site_for(value)
        if found is None or found[0] in self.chosen:
            return
        site, node = found
        owners = self._readers(node)[0]
        shared_with = owners.pop() if len(owners) == 1 else None
        if shared_with is not None:
            owner = self.specs[shared_with]
            spec = OutputSpec(after or site, owner.act_bits, owner.fixed_min, shared_with)
        else:
            bits = self.specs[after].act_bits if after in self.specs else self._bits()
            spec = OutputSpec(after or site, bits, is_non_negative(node, self.modules))
        self.chosen[site] = (node, spec)

    def _site_for(self, value: fx.Node) -> tuple[str, fx.Node] | None:
        """The module to hook for ``value`` and the node it quantizes: after sole-reader ReLUs when
        a module returns their output, else at ``value`` itself."""
        end = _through_relus(value, self.modules)
        for node in (end, value) if end is not value else (value,):
            site = self._returning_module(node)
            if site is not None:
                return site, node
        return None

    def _returning_module(self, node: fx.Node) -> str | None:
        """The module called once whose forward returns exactly ``node``, innermost first."""
        keys = _scope_keys(node)
        for key in reversed(keys):
            if node not in self.escaping[key]:
                return None  # used inside this module only: no module returns it
            path = _scope_path(node, key)
            if self.escaping[key] == [node] and self.calls.get(path) == 1:
                return path
        return None

    def _quantized(self, value: fx.Node) -> bool:
        """Whether a chosen site already quantizes ``value`` (or what it keeps the grid of)."""
        while True:
            if any(node is value for node, _ in self.chosen.values()):
                return True
            if not _keeps_grid(value, self.modules) or not isinstance(value.args[0], fx.Node):
                return False
            value = value.args[0]

    def _readers(self, value: fx.Node) -> tuple[set[str], bool]:
        """The quantizers of the quantized layers reading ``value`` (through grid-keeping
        operations), and whether anything else reads it."""
        owners: set[str] = set()
        others = False
        for user in value.users:
            if _keeps_grid(user, self.modules) and user.args[0] is value:
                more, other = self._readers(user)
                owners |= more
                others |= other
            elif self._is_layer(user) and user.args[0] is value:
                owners.add(self.owners[user.target])
            else:
                others = True
        return owners, others

    def _integer_op_inputs(self, node: fx.Node) -> list[fx.Node] | None:
        """The tensor inputs of an operation ONNX Runtime runs in integers, or None for any other."""
        tensors = [arg for arg in node.args if _is_tensor(arg)]
        if node.op == "call_function" and node.target in _TWO_INPUT_FUNCTIONS or (
            node.op == "call_method" and node.target in _TWO_INPUT_METHODS
        ):
            return tensors if len(tensors) == 2 and len(node.args) == 2 else None
        if node.op == "call_module" and isinstance(self.modules[node.target], _ONE_INPUT_MODULES):
            return tensors[:1] if self.calls.get(node.target) == 1 else None
        if node.op == "call_function" and node.target in _ONE_INPUT_FUNCTIONS:
            return tensors[:1] or None
        if node.op == "call_method" and node.target == "sigmoid":
            return tensors[:1] or None
        if node.op == "call_function" and node.target in _CONCAT_FUNCTIONS and node.args:
            parts = node.args[0]
            return list(parts) if all(_is_tensor(part) for part in parts) else None
        return None

    def _chain_end(self, node: fx.Node) -> fx.Node:
        """The last module of ``node``'s chain: BatchNorm then ReLU, each called once, each the sole reader."""
        while len(node.users) == 1:
            (reader,) = node.users
            if reader.op != "call_module" or self.calls.get(reader.target) != 1 or reader.args[0] is not node:
                break
            if not isinstance(self.modules[reader.target], _CHAIN_MODULES):
                break
            node = reader
        return node

    def _is_layer(self, node: fx.Node) -> bool:
        return node.op == "call_module" and node.target in self.specs and self.calls.get(node.target) == 1

    def _bits(self) -> int:
        """Bits of a quantizer no layer decides: the most common among the quantized layers."""
        return Counter(spec.act_bits for spec in self.specs.values()).most_common(1)[0][0]


def _scope_keys(node: fx.Node) -> list[str]:
    """The keys of the module calls ``node`` runs inside, outermost first (``"path"``, ``"path@1"``...)."""
    return list(node.meta.get("nn_module_stack", {}))


def _scope_path(node: fx.Node, key: str) -> str:
    return node.meta["nn_module_stack"][key][0]


def _is_tensor(arg: object) -> bool:
    return isinstance(arg, fx.Node) and arg.op in ("placeholder", "call_module", "call_function", "call_method")


def _keeps_grid(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        return isinstance(modules[node.target], _KEEPS_GRID_MODULES)
    if node.op == "call_function":
        return node.target in _KEEPS_GRID_FUNCTIONS
    return node.op == "call_method" and node.target in _KEEPS_GRID_METHODS


def _through_relus(node: fx.Node, modules: Mapping[str, nn.Module]) -> fx.Node:
    """``node`` followed through sole-reader ReLUs of any form (function, method, shared module)."""
    while len(node.users) == 1:
        (reader,) = node.users
        if not (is_relu(reader, modules) and reader.args[0] is node):
            break
        node = reader
    return node
