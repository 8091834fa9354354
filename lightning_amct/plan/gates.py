"""Gates: the sigmoid-type activations whose value, in ``[0, 1]``, goes on a fixed INT8 grid.

With ``quantize_outputs`` (an integer deploy model), every module of the model that computes a
gate value in ``[0, 1]`` is a **gate site**: its gate value is fake-quantized on the fixed grid of
:class:`~lightning_amct.quant.GateQuantizer`, in training as in deployment, so that ONNX Runtime
runs the sigmoid as a table lookup (QLinearSigmoid) and the multiply that applies the gate in
integers (QLinearMul) while the deploy model and PyTorch keep computing the same values:

* ``nn.Sigmoid`` and ``nn.Hardsigmoid``: their output is the gate value (a squeeze-excite gate);
* ``nn.SiLU``: ``x * sigmoid(x)`` becomes ``x * Q(sigmoid(x))``.

``nn.Hardswish`` is no gate: ONNX Runtime has no integer hard sigmoid, so ``x * Q(hardsigmoid(x))``
runs as a float HardSigmoid between a dequantize and a quantize, then a QLinearMul, which measured
no faster than the float HardSwish between the same quantized tensors (MobileNetV3-small, ONNX
Runtime 1.31, 2 threads: 0.99x to 1.07x, about 1.01x in the median, at batch 1 and 32), while its
integer multiply rounds ties of its grid otherwise than PyTorch does.

A subclass counts when it keeps the class's own ``forward`` (one with a ``forward`` of its own may
compute anything). Left out: an in-place module (its input is gone by the time the gate could be
computed) and a sigmoid or hard sigmoid whose output is the model's output (that stays float).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_amct.graph import capture_graph
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.SiLU(), nn.Conv2d(4, 4, 1), nn.Sigmoid(), nn.Flatten(), nn.Linear(4, 2))
    >>> gate_sites(capture_graph(model, torch.zeros(1, 1, 1, 1)))
    {'1': 'silu', '3': 'sigmoid'}
"""

from __future__ import annotations

from torch import nn

from lightning_amct.graph import ModelGraph, Node

#: Gate modules by the kind of gate.
GATE_MODULES: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid, "silu": nn.SiLU,
}  # fmt: skip
#: The gates whose output is the gate value itself (the others multiply their input by it).
VALUE_GATES = ("sigmoid", "hardsigmoid")


def gate_function(module: nn.Module) -> str | None:
    """The kind of gate ``module`` is (a key of :data:`GATE_MODULES`), or None for a module that is
    no gate: another class, a subclass with its own ``forward``, an in-place one."""
    for function, cls in GATE_MODULES.items():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return None if getattr(module, "inplace", False) else function
    return None


def gate_sites(graph: ModelGraph) -> dict[str, str]:
    """The gate sites of a model: module name → function of its gate value, in model order.

    Args:
        graph: the model's captured graph (modules that never run are left out).
    """
    sites = {}
    for name, module in graph.modules.items():
        function = gate_function(module)
        calls = graph.calls(name)
        if function is None or not calls:
            continue
        if function in VALUE_GATES and any(user.kind == "output" for call in calls for user in _users(call.outputs)):
            continue  # the model's output stays float
        sites[name] = function
    return sites


def gate_values(graph: ModelGraph, gates: dict[str, str]) -> set[Node]:
    """The tensors that gate sites put on the gate grid: the outputs of sigmoids and hard sigmoids."""
    values = [call.outputs for name, function in gates.items() if function in VALUE_GATES for call in graph.calls(name)]
    return {out for outputs in values for out in outputs}


def _users(values: tuple[Node, ...]) -> list[Node]:
    return [user for value in values for user in value.users]
