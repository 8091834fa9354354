"""Where a quantized layer's output must be quantized too, for a deploy model that is integer throughout.

The AMCT dialect quantizes the *inputs* of layers. A layer whose output (after its BatchNorm and
ReLU) is read only by quantized layers is therefore followed by a quantize in the exported graph,
and ONNX Runtime runs it with integer kernels (QLinearConv, QGemm). A layer whose output also goes
elsewhere (a residual add, a pooling, a concat) has no quantize after it, and ONNX Runtime has to
run it in float: in a ResNet about half the convolutions. With ``quantize_outputs`` the plan adds
an **output quantizer** at the end of each such layer's chain, trained like any activation
quantizer (ULQ, IFMR-initialised clips), so that training sees exactly what deployment runs.

The chain of a layer is the layer followed by the modules that deployment folds into it: a
BatchNorm and then a ReLU/ReLU6, each called once and the only reader of what comes before. The
quantizer goes on the output of the last module of the chain (the *site*): a forward hook there
can apply it. Where some readers of that output are quantized layers that share one activation
quantizer, the site reuses that quantizer (``shared_with``): the tensor is quantized once, and
every reader, the residual add included, reads the same quantized values. The same holds for the
output of any other module (a ReLU after a layer left in float, say) that a quantized layer reads
among other readers: it is quantized once, at that module, with the reader's quantizer. A ReLU that is a
function (or a module called more than once) is looked through to find the readers, and stays
after the quantizer. A layer feeding the model's output and a layer called more than once are
left as they are.

Example:
    >>> import torch
    >>> from lightning_amct.demo import DemoNet
    >>> from lightning_amct.graph import capture_graph
    >>> from lightning_amct.plan.specs import QuantSpec
    >>> spec = QuantSpec(8, None, True, "arq", 8, True)
    >>> layers = ("stem.conv", "block.conv1", "block.conv2", "depthwise.conv", "pointwise.conv", "fc")
    >>> graph = capture_graph(DemoNet(), torch.zeros(1, 1, 8, 8))
    >>> sites = output_sites(graph, {name: spec for name in layers})
    >>> {site: (spec.after, spec.shared_with) for site, spec in sites.items()}
    {'stem.relu': ('stem.conv', 'block.conv1'), 'block.bn2': ('block.conv2', None), 'pointwise.relu': ('pointwise.conv', None)}
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from lightning_amct.graph import ModelGraph, ModuleCall, Node
from lightning_amct.plan.relu_inputs import is_non_negative, is_relu
from lightning_amct.plan.sharing import shared_quantizers
from lightning_amct.plan.specs import OutputSpec, QuantSpec

_CHAIN_MODULES = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6)


def output_sites(graph: ModelGraph, specs: Mapping[str, QuantSpec]) -> dict[str, OutputSpec]:
    """The output quantizers a model needs, by the name of the module whose output they quantize.

    Args:
        graph: the model's captured graph.
        specs: the quantized layers' settings.

    Returns:
        Site module name → :class:`~lightning_amct.plan.specs.OutputSpec`, in graph order.
    """
    owners = shared_quantizers(graph, specs)

    def quantizers_reading(value: Node) -> tuple[set[str], bool]:
        """The quantizers of the quantized layers reading ``value``, and whether others read it."""
        readers = graph.readers(value)
        quantized = [
            reader.module
            for reader in readers
            if isinstance(reader, ModuleCall) and reader.module in specs and reader.inputs[:1] == (value,)
        ]
        return {owners[name] for name in quantized}, len(quantized) < len(readers)

    sites: dict[str, tuple[Node, OutputSpec]] = {}
    for name in specs:
        calls = graph.calls(name)
        if len(calls) != 1 or len(calls[0].outputs) != 1:
            continue
        site = _chain_end(graph, calls[0])
        value = site.outputs[0]
        end = _through_relus(value)
        quantizers, other_readers = quantizers_reading(end)
        if not other_readers or any(user.kind == "output" for user in end.users):
            continue  # every reader quantizes the tensor already, or it is the model's output
        shared_with = quantizers.pop() if len(quantizers) == 1 and end is value else None
        spec = OutputSpec(
            after=name,
            bits=specs[shared_with or name].act_bits,
            fixed_min=is_non_negative(value),
            shared_with=shared_with,
        )
        sites[site.module] = (value, spec)
    for module, calls in graph.called_modules().items():
        # any other module whose output a quantized layer reads, among other readers
        if module in specs or module in sites or len(calls) != 1 or len(calls[0].outputs) != 1:
            continue
        value = calls[0].outputs[0]
        if value.stack[-1][0] != calls[0].call:
            continue  # made by a submodule: that one is the site
        quantizers, other_readers = quantizers_reading(value)
        if len(quantizers) == 1 and other_readers:
            owner = quantizers.pop()
            sites[module] = (value, OutputSpec(module, specs[owner].act_bits, specs[owner].fixed_min, owner))
    ordered = sorted(sites.items(), key=lambda item: graph.position(item[1][0]))
    return {site: spec for site, (_, spec) in ordered}


def _chain_end(graph: ModelGraph, call: ModuleCall) -> ModuleCall:
    """The last module call of ``call``'s chain: BatchNorm then ReLU, each called once, each the sole reader."""
    while True:
        readers = graph.readers(call.outputs[0])
        if len(readers) != 1 or not isinstance(readers[0], ModuleCall):
            return call
        reader = readers[0]
        if len(graph.calls(reader.module)) > 1 or reader.inputs[:1] != call.outputs or len(reader.outputs) != 1:
            return call
        if not isinstance(graph.modules[reader.module], _CHAIN_MODULES):
            return call
        call = reader


def _through_relus(value: Node) -> Node:
    """``value`` followed through sole-reader ReLUs of any form (function, method, shared module)."""
    while len(value.users) == 1:
        (reader,) = value.users
        if not (is_relu(reader) and reader.args[0] is value):
            break
        value = reader
    return value
