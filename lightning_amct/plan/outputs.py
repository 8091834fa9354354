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
3. the inputs and the output of every add or multiply of two tensors, average pool, sigmoid,
   concatenation and gated SiLU: where one of them cannot be quantized (below), the operation
   stays float.

The value of a gate (:mod:`~lightning_amct.plan.gates`: a sigmoid or hard sigmoid module's output)
is on the fixed gate grid already: it gets no output quantizer.

Readers are found through operations that keep values on their grid (max pooling, flatten,
reshape, permute, dropout, padding with zeros): quantizing before or after them is the same. A
TF-style "same" convolution pads its input with zeros first: its own input quantizer does it, and
the deploy model takes the padding into the convolution. (Quantizing the tensor before the padding
too would put two grids in a row, which ONNX Runtime merges into a third one.)

A quantizer is applied by a forward hook on the module whose output the tensor is: a module
called once whose ``forward`` returns exactly that tensor (a layer, a ReLU, a squeeze-excite block
that ends in its multiply, a residual block that ends in its add); the module is the quantizer's
*site*. A ReLU in any form that is the tensor's only reader is looked through, when a module
returns its output: its output is quantized then, on a grid from 0, and the deploy model drops the
ReLU (quantizing clamps at 0 anyway). A tensor no module returns (one computed inside a
``forward`` and used there) cannot be quantized; nor can the model's inputs and outputs.

Where quantized layers read the tensor, with one activation quantizer among them, the site reuses
that quantizer (``shared_with``): the tensor is quantized once, and every reader, the residual add
included, reads the same values.

Example:
    >>> import torch
    >>> from lightning_amct.demo import DemoNet
    >>> from lightning_amct.graph import capture_graph
    >>> from lightning_amct.plan.specs import QuantSpec
    >>> spec = QuantSpec(8, None, True, "arq", 8, True)
    >>> layers = ("stem.conv", "block.conv1", "block.conv2", "depthwise.conv", "pointwise.conv", "fc")
    >>> graph = capture_graph(DemoNet(), torch.zeros(1, 1, 8, 8))
    >>> sites = output_sites(graph, {name: spec for name in layers})
    >>> {site: (spec.after, spec.shared_with) for site, spec in sites.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'stem.relu': ('stem.conv', 'block.conv1'), 'block.bn2': ('block.conv2', None),
     'block.relu2': ('block.relu2', 'depthwise.conv'), 'pointwise.relu': ('pointwise.conv', None), 'gap': ('gap', 'fc')}
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from torch import nn

from lightning_amct.graph import ModelGraph, ModuleCall, Node
from lightning_amct.plan.gates import VALUE_GATES, gate_values
from lightning_amct.plan.layers import LINEAR_TYPES, supported_base
from lightning_amct.plan.relu_inputs import is_non_negative, is_relu
from lightning_amct.plan.sharing import shared_quantizers
from lightning_amct.plan.specs import OutputSpec, QuantSpec

_CHAIN_MODULES = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6)

#: Operators and modules that keep every value on its grid: quantizing before or after them is the
#: same. Dropout among them: deployment has none, and in training it scales the quantized values
#: of the eval-time grid, which is what a dropout after a quantizer means.
_KEEPS_GRID = {
    "max_pool1d", "max_pool2d", "max_pool3d", "flatten", "view", "reshape", "_unsafe_view", "permute",
    "transpose", "contiguous", "squeeze", "unsqueeze", "clone", "alias", "detach", "dropout", "dropout_",
    "feature_dropout", "feature_dropout_",
}  # fmt: skip
_KEEPS_GRID_MODULES = (
    nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
)  # fmt: skip
#: Operators ONNX Runtime runs in integers when their inputs and output are quantized.
_TWO_INPUTS = {"add", "add_", "mul", "mul_"}
_ONE_INPUT = {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "avg_pool1d", "avg_pool2d", "sigmoid", "sigmoid_"}
_CONCATS = {"cat", "concat"}


def output_sites(
    graph: ModelGraph, specs: Mapping[str, QuantSpec], gates: Mapping[str, str] | None = None
) -> dict[str, OutputSpec]:
    """The output quantizers a model needs, by the name of the module whose output they quantize.

    Args:
        graph: the model's captured graph.
        specs: the quantized layers' settings.
        gates: the gate sites (:func:`~lightning_amct.plan.gates.gate_sites`), if any.

    Returns:
        Site module name → :class:`~lightning_amct.plan.specs.OutputSpec`, in graph order.
    """
    return _Placement(graph, specs, gates or {}).sites()


class _Placement:
    """The rules, over one graph, and the sites they choose."""

    def __init__(self, graph: ModelGraph, specs: Mapping[str, QuantSpec], gates: Mapping[str, str]) -> None:
        self.graph = graph
        self.specs = specs
        self.gates = gates
        self.gated = gate_values(graph, gates)
        #: a gated SiLU's output → its input: ONNX Runtime runs it in integers when both are
        #: quantized (a sigmoid, then the multiply of the input by it)
        self.gated_products = {
            call.outputs[0]: list(call.inputs[:1])
            for name, function in gates.items() if function not in VALUE_GATES
            for call in graph.calls(name) if len(call.outputs) == 1
        }  # fmt: skip
        self.owners = shared_quantizers(graph, specs)
        self.chosen: dict[str, tuple[Node, OutputSpec]] = {}

    def sites(self) -> dict[str, OutputSpec]:
        for name in self.specs:  # rule 1: the ends of quantized convolutions' chains
            calls = self.graph.calls(name)
            if len(calls) == 1 and len(calls[0].outputs) == 1 and not self._is_linear(name):
                self._quantize(self._chain_end(calls[0]).outputs[0], after=name, only_if_others_read=True)
        for node in self.graph:  # rule 2: tensors quantized layers read among other readers
            if node.kind == "op" and node.shape is not None and len(self._readers(node)[0]) == 1:
                self._quantize(node, after=None, only_if_others_read=True)
        for node in self.graph:  # rule 3: inputs and outputs of operations run in integers
            inputs = self.gated_products.get(node) or _integer_op_inputs(node)
            if inputs is None:
                continue
            values = (*inputs, node)
            if all(self._quantized(value) or self._site_for(value) is not None for value in values):
                for value in values:
                    if not self._quantized(value):
                        self._quantize(value, after=None, only_if_others_read=False)
        chosen = sorted(self.chosen.items(), key=lambda item: self.graph.position(item[1][0]))
        return {site: spec for site, (_, spec) in chosen}

    def _is_linear(self, name: str) -> bool:
        return supported_base(self.graph.modules[name]).__name__ in LINEAR_TYPES

    def _quantize(self, value: Node, after: str | None, only_if_others_read: bool) -> None:
        """Choose a site for ``value`` (its ReLUs looked through where a module returns their output)."""
        end = _through_relus(value)
        if any(user.kind == "output" for user in end.users):
            return  # the model's output stays float
        if only_if_others_read and not self._readers(end)[1]:
            return  # quantized layers alone read it: their own quantizer does it
        found = self._site_for(value)
        if found is None or found[0] in self.chosen:
            return
        site, node = found
        if node in self.gated:
            return  # on the gate grid already
        owners = self._readers(node)[0]
        shared_with = owners.pop() if len(owners) == 1 else None
        if shared_with is not None:
            owner = self.specs[shared_with]
            spec = OutputSpec(after or site, owner.act_bits, owner.fixed_min, shared_with)
        else:
            bits = self.specs[after].act_bits if after in self.specs else self._bits()
            spec = OutputSpec(after or site, bits, is_non_negative(node))
        self.chosen[site] = (node, spec)

    def _site_for(self, value: Node) -> tuple[str, Node] | None:
        """The module to hook for ``value`` and the node it quantizes: after sole-reader ReLUs when
        a module returns their output, else ``value`` itself."""
        end = _through_relus(value)
        for node in (end, value) if end is not value else (value,):
            site = self._returning_module(node)
            if site is not None:
                return site, node
        return None

    def _returning_module(self, value: Node) -> str | None:
        """The innermost module, called once, whose forward returns exactly ``value``."""
        for call_key, module in reversed(value.stack):
            calls = self.graph.calls(module)
            call = next(call for call in calls if call.call == call_key)
            if value not in call.outputs:
                return None  # used inside this call only: no module returns it
            if call.outputs == (value,) and len(calls) == 1:
                return module
        return None

    def _quantized(self, value: Node) -> bool:
        """Whether a chosen site quantizes ``value``, or a tensor it keeps the grid of."""
        while True:
            if value in self.gated or any(node is value for node, _ in self.chosen.values()):
                return True
            if not _keeps_grid(value) or not isinstance(value.arg(0, "self"), Node):
                return False
            value = value.arg(0, "self")

    def _readers(self, value: Node) -> tuple[set[str], bool]:
        """The quantizers of the quantized layers reading ``value`` (through grid-keeping operators
        and modules), and whether anything else reads it."""
        owners: set[str] = set()
        others = False
        for reader in self.graph.readers(value):
            onward = self._grid_kept(reader, value) or self._grid_kept_on_entry(reader, value)
            if onward is not None:
                more, other = self._readers(onward)
                owners |= more
                others |= other
            elif self._is_layer_reading(reader, value):
                owners.add(self.owners[reader.module])
            else:
                others = True
        return owners, others

    def _grid_kept(self, reader: ModuleCall | Node, value: Node) -> Node | None:
        """What ``reader`` makes of ``value`` when it keeps it on its grid, else None."""
        if isinstance(reader, Node):
            keeps = _keeps_grid(reader) and reader.arg(0, "self") is value
            return reader if keeps else None
        module = self.graph.modules[reader.module]
        if isinstance(module, _KEEPS_GRID_MODULES) and reader.inputs[:1] == (value,) and len(reader.outputs) == 1:
            return reader.outputs[0]
        return None

    def _grid_kept_on_entry(self, reader: ModuleCall | Node, value: Node) -> Node | None:
        """What a module call makes of ``value`` first thing, when that alone reads it and keeps its
        grid: a conv block that pads its input before its convolution."""
        if not isinstance(reader, ModuleCall):
            return None
        inside = [user for user in value.users if user in reader.nodes]
        if len(inside) == 1 and _keeps_grid(inside[0]) and inside[0].arg(0, "self") is value:
            return inside[0]
        return None

    def _is_layer_reading(self, reader: ModuleCall | Node, value: Node) -> bool:
        return (
            isinstance(reader, ModuleCall)
            and reader.module in self.specs
            and len(self.graph.calls(reader.module)) == 1
            and reader.inputs[:1] == (value,)
        )

    def _chain_end(self, call: ModuleCall) -> ModuleCall:
        """The last module call of ``call``'s chain: BatchNorm then ReLU, each called once, each the sole reader."""
        while True:
            readers = self.graph.readers(call.outputs[0])
            if len(readers) != 1 or not isinstance(readers[0], ModuleCall):
                return call
            reader = readers[0]
            if len(self.graph.calls(reader.module)) > 1 or reader.inputs[:1] != call.outputs or len(reader.outputs) != 1:
                return call
            if not isinstance(self.graph.modules[reader.module], _CHAIN_MODULES):
                return call
            call = reader

    def _bits(self) -> int:
        """Bits of a quantizer no layer decides: the most common among the quantized layers."""
        return Counter(spec.act_bits for spec in self.specs.values()).most_common(1)[0][0]


def _keeps_grid(node: Node) -> bool:
    """Whether operator ``node`` keeps its first input's values on their grid (0 is on every grid)."""
    if node.kind != "op":
        return False
    if node.op == "pad":
        return node.arg(2, "mode", "constant") == "constant" and not node.arg(3, "value")
    if node.op == "constant_pad_nd":
        return not node.arg(2, "value")
    return node.op in _KEEPS_GRID


def _integer_op_inputs(node: Node) -> list[Node] | None:
    """The tensor inputs of an operator ONNX Runtime runs in integers, or None for any other."""
    if node.kind != "op":
        return None
    tensors = [arg for arg in node.args if isinstance(arg, Node) and arg.kind in ("op", "input")]
    if node.op in _TWO_INPUTS:
        # two tensors of the model's own, not a tensor and a number or a parameter (layer scale)
        return tensors if len(tensors) == 2 and len(node.args) == 2 and not node.kwargs.get("alpha") else None
    if node.op in _ONE_INPUT:
        return tensors[:1] or None
    if node.op in _CONCATS and node.args and isinstance(node.args[0], (list, tuple)):
        parts = node.args[0]
        return list(parts) if all(isinstance(p, Node) and p.kind in ("op", "input") for p in parts) else None
    return None


def _through_relus(value: Node) -> Node:
    """``value`` followed through sole-reader ReLUs of any form (function, method, shared module)."""
    while len(value.users) == 1:
        (reader,) = value.users
        if not (is_relu(reader) and reader.args[0] is value):
            break
        value = reader
    return value
