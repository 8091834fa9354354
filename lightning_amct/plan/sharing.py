"""Layers that share one activation quantizer: they read the same tensor with the same settings.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_amct.graph import capture_graph
    >>> from lightning_amct.plan.specs import QuantSpec
    >>> class Heads(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 3)
    ...     def forward(self, x):
    ...         return self.a(x), self.b(x)
    >>> spec = QuantSpec(8, None, False, "arq", 8, False)
    >>> shared_quantizers(capture_graph(Heads(), torch.zeros(1, 4)), {"a": spec, "b": spec})
    {'a': 'a', 'b': 'a'}
"""

from __future__ import annotations

from collections.abc import Mapping

from lightning_amct.graph import ModelGraph
from lightning_amct.plan.specs import QuantSpec


def shared_quantizers(graph: ModelGraph, specs: Mapping[str, QuantSpec]) -> dict[str, str]:
    """Quantized layer → the first layer (in graph order) reading the same tensor with the same
    activation settings (itself when it is the first): layers mapped to one name share a quantizer.

    Layers called more than once, or not at all, map to themselves.
    """
    first: dict[tuple, str] = {}
    owners = {name: name for name in specs}
    calls = [(name, graph.calls(name)) for name in specs]
    single = [(call_list[0], name) for name, call_list in calls if len(call_list) == 1 and call_list[0].inputs]
    for call, name in sorted(single, key=lambda item: graph.position(item[0].nodes[0])):
        spec = specs[name]
        key = (call.inputs[0], spec.act_bits, spec.act_clip, spec.fixed_min)
        owners[name] = first.setdefault(key, name)
    return owners
