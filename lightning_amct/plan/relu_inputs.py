"""Which layers read a non-negative input: the graph fact behind the ``fixed_min`` default.

And which ReLU modules only one layer reads (:func:`relus_read_only_by`), which that layer can
apply itself (:mod:`~lightning_amct.modules.input_relu`), and which BatchNorms only such a ReLU
reads (:func:`norms_before_relus`), which the layer can apply too
(:mod:`~lightning_amct.modules.input_norm`).

The schema's default is ``fixed_min: true`` when a layer's input comes from a ReLU. The input is
followed back through operations that keep a non-negative tensor non-negative (pooling, flatten,
views, dropout, padding with zeros), so ``ReLU → MaxPool → Conv`` and
``ReLU → AdaptiveAvgPool → Flatten → Linear`` count as ReLU inputs too. A ReLU is any operator
that clamps at zero from below, whichever way the model writes it: ``nn.ReLU``, ``F.relu``,
``x.relu_()``, ``nn.ReLU6`` (a ``hardtanh`` from 0), ``x.clamp(min=0)``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_amct.graph import capture_graph
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU6(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2))
    >>> sorted(layers_reading_relu_output(capture_graph(model, torch.zeros(1, 1, 4, 4))))
    ['2', '3', '4']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from lightning_amct.graph import ModelGraph, Node

_RELUS = {"relu", "relu_", "relu6"}
_CLAMPS = {"hardtanh", "hardtanh_", "clamp", "clamp_", "clamp_min", "clamp_min_"}  # a ReLU when min >= 0
_SIGN_KEEPING = {
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "mean", "flatten", "view", "reshape", "_unsafe_view", "squeeze", "unsqueeze", "permute",
    "transpose", "contiguous", "clone", "alias", "detach", "dropout", "dropout_", "feature_dropout", "to", "_to_copy",
    "expand", "select", "slice", "getitem",
}  # fmt: skip
_RESHAPES = {"view", "reshape", "_unsafe_view", "flatten"}
#: The BatchNorm classes whose forward is torch's (a subclass may compute something else).
_PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def is_relu(node: Node) -> bool:
    """Whether ``node`` clamps at zero from below (``relu``, ``relu6``, ``hardtanh``/``clamp`` from 0)."""
    if node.kind != "op":
        return False
    if node.op in _RELUS:
        return True
    if node.op in _CLAMPS:
        low = node.arg(1, "min_val" if node.op.startswith("hardtanh") else "min", -1.0)
        return isinstance(low, (int, float)) and low >= 0
    return False


def is_non_negative(node: Node) -> bool:
    """Whether ``node``'s output is a ReLU output, possibly through sign-keeping operations."""
    while node.kind == "op":
        if is_relu(node):
            return True
        if node.op == "constant_pad_nd" or node.op == "pad":
            if node.arg(2, "mode", "constant") != "constant" or (node.arg(3, "value", 0.0) or 0.0) < 0:
                return False
        elif node.op not in _SIGN_KEEPING:
            return False
        if not node.args or not isinstance(node.args[0], Node):
            return False
        node = node.args[0]
    return False


def layers_reading_relu_output(graph: ModelGraph) -> set[str]:
    """Names of the modules whose first input is a ReLU output (through sign-keeping operations).

    A module called several times counts only when every call reads a ReLU output.
    """
    return {
        module
        for module, calls in graph.called_modules().items()
        if all(call.inputs and is_non_negative(call.inputs[0]) for call in calls)
    }


def relus_read_only_by(
    graph: ModelGraph, layers: Iterable[str], pools: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Layer → the ``nn.ReLU`` module whose output only that layer reads, for those of ``layers`` that have one.

    The layer is called once; its input, followed back through reshapes that nothing else reads
    (``nn.Flatten``), or through the max-pool that ``pools`` names for it (layer → pool module,
    :func:`~lightning_amct.plan.pool_inputs.pools_read_only_by`), is the output of an ``nn.ReLU``
    (exactly that class) call whose only operator is the ReLU and which nothing else reads. A
    ReLU module called more than once (a residual block's ``self.relu``) is named with the call:
    ``"relu@0"`` for its first; such a ReLU can leave itself to the layer only together with a
    BatchNorm before that call (:func:`norms_before_relus`), which tells the call apart at run time.

    Example:
        >>> import torch
        >>> from lightning_amct.graph import capture_graph
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2), nn.ReLU())
        >>> relus_read_only_by(capture_graph(model, torch.zeros(1, 1, 4, 4)), ["0", "3"])
        {'3': '1'}
    """
    found = {}
    for name in layers:
        node = only_input(graph, name)
        if node is None:
            continue
        if pools and name in pools:  # a max-pool between them, which the layer applies too
            node = graph.calls(pools[name])[0].inputs[0]
        while node.kind == "op" and node.op in _RESHAPES and len(node.users) == 1 and isinstance(node.arg(0, ""), Node):
            node = node.args[0]
        if node.kind != "op" or node.op not in ("relu", "relu_") or len(node.users) != 1:
            continue
        relu = node.module
        relu_calls = graph.calls(relu) if relu else []
        if type(graph.modules.get(relu)) is not nn.ReLU:
            continue
        index = next((i for i, call in enumerate(relu_calls) if call.nodes == [node]), None)
        if index is not None:
            found[name] = relu if len(relu_calls) == 1 else f"{relu}@{index}"
    return found


def only_input(graph: ModelGraph, module: str) -> Node | None:
    """The input of ``module``, a module called once; None for one called more than once, or without inputs."""
    calls = graph.calls(module)
    return calls[0].inputs[0] if len(calls) == 1 and calls[0].inputs else None


def relu_call(entry: str) -> tuple[str, int | None]:
    """``(module name, call index)`` of an entry of :func:`relus_read_only_by`; the index is None
    for a ReLU module called once."""
    module, _, index = entry.partition("@")
    return module, int(index) if index else None


def norms_before_relus(graph: ModelGraph | None, relus: Mapping[str, str]) -> dict[str, str]:
    """Layer → the BatchNorm module whose output only the layer's ReLU reads, for the layers of
    ``relus`` (layer → ReLU entry of :func:`relus_read_only_by`) that have one.

    The input of that ReLU call is the output of a BatchNorm (``nn.BatchNorm1d``/``2d``/``3d``
    exactly) called once, whose only operator is ``batch_norm`` and which nothing else reads.

    Example:
        >>> import torch
        >>> from lightning_amct.graph import capture_graph
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 1))
        >>> norms_before_relus(capture_graph(model, torch.zeros(2, 1, 4, 4)), {"3": "2"})
        {'3': '1'}
    """
    found = {}
    for layer, entry in relus.items():
        relu, index = relu_call(entry)
        relu_calls = graph.calls(relu) if graph is not None else []
        call = relu_calls[index or 0] if len(relu_calls) > (index or 0) else None
        if call is None or not call.inputs:
            continue
        node = call.inputs[0]
        norm = node.module
        norm_calls = graph.calls(norm) if norm else []
        if (
            node.kind == "op"
            and node.op == "batch_norm"
            and len(node.users) == 1
            and type(graph.modules.get(norm)) in _PLAIN_NORMS
            and len(norm_calls) == 1
            and norm_calls[0].nodes == [node]
        ):
            found[layer] = norm
    return found
