"""Which ``nn.MaxPool2d`` modules only one layer reads: the layer can pool in its own node
(:mod:`~lightning_amct.modules.input_pool`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_amct.graph import capture_graph
    >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 2, 1))
    >>> pools_read_only_by(capture_graph(model, torch.zeros(1, 1, 6, 6)), ["0", "3"])
    {'3': '2'}
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from lightning_amct.graph import ModelGraph
from lightning_amct.plan.relu_inputs import only_input


def pools_read_only_by(graph: ModelGraph, layers: Iterable[str]) -> dict[str, str]:
    """Layer → the ``nn.MaxPool2d`` module whose output only that layer reads, for those of ``layers`` that have one.

    The layer is called once and its input is the output of a call of an ``nn.MaxPool2d``
    (exactly that class, without ``return_indices``) called once, whose only operator is
    ``max_pool2d`` and which nothing else reads.
    """
    found = {}
    for name in layers:
        node = only_input(graph, name)
        if node is None or node.kind != "op" or node.op != "max_pool2d" or len(node.users) != 1:
            continue
        pool = node.module
        module = graph.modules.get(pool)
        if type(module) is not nn.MaxPool2d or module.return_indices:
            continue
        pool_calls = graph.calls(pool)
        if len(pool_calls) == 1 and pool_calls[0].nodes == [node]:
            found[name] = pool
    return found
