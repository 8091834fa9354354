"""Layers that share one activation quantizer: they read the same tensor with the same settings.

Example:
    >>> from lightning_amct.graph import trace_model
    >>> from lightning_amct.plan.specs import QuantSpec
    >>> from torch import nn
    >>> class Heads(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 3)
    ...     def forward(self, x):
    ...         return self.a(x), self.b(x)
    >>> spec = QuantSpec(8, None, False, "arq", 8, False)
    >>> shared_quantizers(trace_model(Heads()), {"a": spec, "b": spec})
    {'a': 'a', 'b': 'a'}
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import fx

from lightning_amct.plan.specs import QuantSpec


def shared_quantizers(graph_module: fx.GraphModule, specs: Mapping[str, QuantSpec]) -> dict[str, str]:
    """Quantized layer → the first layer (in graph order) reading the same tensor with the same
    activation settings (itself when it is the first): layers mapped to one name share a quantizer.

    Layers the graph does not call as modules map to themselves.
    """
    first: dict[tuple, str] = {}
    owners = {name: name for name in specs}
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and node.target in specs and node.args:
            spec = specs[node.target]
            key = (str(node.args[0]), spec.act_bits, spec.act_clip, spec.fixed_min)
            owners[node.target] = first.setdefault(key, node.target)
    return owners
