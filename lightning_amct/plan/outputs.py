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
    >>> from lightning_amct.demo import DemoNet
    >>> from lightning_amct.graph import trace_model
    >>> from lightning_amct.plan.specs import QuantSpec
    >>> spec = QuantSpec(8, None, True, "arq", 8, True)
    >>> layers = ("stem.conv", "block.conv1", "block.conv2", "depthwise.conv", "pointwise.conv", "fc")
    >>> sites = output_sites(trace_model(DemoNet()), {name: spec for name in layers})
    >>> {site: (spec.after, spec.shared_with) for site, spec in sites.items()}
    {'stem.relu': ('stem.conv', 'block.conv1'), 'block.bn2': ('block.conv2', None), 'pointwise.relu': ('pointwise.conv', None)}
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from torch import fx, nn

from lightning_amct.plan.relu_inputs import is_non_negative, is_relu
from lightning_amct.plan.sharing import shared_quantizers
from lightning_amct.plan.specs import OutputSpec, QuantSpec

_CHAIN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6)


def output_sites(graph_module: fx.GraphModule, specs: Mapping[str, QuantSpec]) -> dict[str, OutputSpec]:
    """The output quantizers a model needs, by the name of the module whose output they quantize.

    Args:
        graph_module: the model's ``torch.fx`` graph (standard layers as leaves).
        specs: the quantized layers' settings.

    Returns:
        Site module name → :class:`~lightning_amct.plan.specs.OutputSpec`, in graph order.
    """
    modules = dict(graph_module.named_modules())
    owners = shared_quantizers(graph_module, specs)
    calls = Counter(node.target for node in graph_module.graph.nodes if node.op == "call_module")

    def quantizers_reading(node: fx.Node) -> tuple[set[str], bool]:
        """The quantizers of the quantized layers reading ``node``, and whether others read it."""
        readers = list(node.users)
        quantized = [r.target for r in readers if r.op == "call_module" and r.target in specs and r.args[0] is node]
        return {owners[name] for name in quantized}, len(quantized) < len(readers)

    sites: dict[str, OutputSpec] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or node.target not in specs or calls[node.target] > 1:
            continue
        site = _chain_end(node, modules, calls)
        end = _through_relus(site, modules)
        quantizers, other_readers = quantizers_reading(end)
        if not other_readers or any(reader.op == "output" for reader in end.users):
            continue  # every reader quantizes the tensor already, or it is the model's output
        shared_with = quantizers.pop() if len(quantizers) == 1 and end is site else None
        sites[site.target] = OutputSpec(
            after=node.target,
            bits=specs[shared_with or node.target].act_bits,
            fixed_min=is_non_negative(site, modules),
            shared_with=shared_with,
        )
    for node in graph_module.graph.nodes:
        # any other module whose output a quantized layer reads, among other readers
        if node.op != "call_module" or node.target in specs or node.target in sites or calls[node.target] > 1:
            continue
        quantizers, other_readers = quantizers_reading(node)
        if len(quantizers) == 1 and other_readers:
            owner = quantizers.pop()
            sites[node.target] = OutputSpec(node.target, specs[owner].act_bits, specs[owner].fixed_min, owner)
    order = {node.target: index for index, node in enumerate(graph_module.graph.nodes)}
    return dict(sorted(sites.items(), key=lambda item: order[item[0]]))


def _chain_end(node: fx.Node, modules: dict[str, nn.Module], calls: Counter) -> fx.Node:
    """The last module of ``node``'s chain: BatchNorm then ReLU, each called once, each the sole reader."""
    while len(node.users) == 1:
        (reader,) = node.users
        if reader.op != "call_module" or calls[reader.target] > 1 or reader.args[0] is not node:
            break
        if not isinstance(modules[reader.target], _CHAIN_MODULES):
            break
        node = reader
    return node


def _through_relus(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """``node`` followed through sole-reader ReLUs of any form (function, method, shared module)."""
    while len(node.users) == 1:
        (reader,) = node.users
        if not (is_relu(reader, modules) and reader.args[0] is node):
            break
        node = reader
    return node
