"""Tracing a model into a ``torch.fx`` graph: what the plan and the channel analysis read.

The plan reads the graph to fill model-dependent defaults (``fixed_min`` when a layer's input
comes out of a ReLU; layers that share one input tensor), and channel pruning reads it to find
coupled channels. Standard ``torch.nn`` layers stay leaves of the graph, so a node's ``target``
names the module as in ``model.named_modules()``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> gm = trace_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.zeros(2, 4),))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    >>> gm.graph.find_nodes(op="call_module", target="0")[0].meta["tensor_meta"].shape
    torch.Size([2, 4])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp


class GraphError(RuntimeError):
    """The model could not be traced into a graph (``torch.fx`` failed on it)."""


def as_input_tuple(example_inputs: object) -> tuple:
    """``example_inputs`` as a tuple of positional inputs (a lone tensor becomes a 1-tuple)."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def trace_model(model: nn.Module, example_inputs: object = None) -> fx.GraphModule:
    """Trace ``model`` with ``torch.fx``; with ``example_inputs`` annotate every node's shape.

    Raises:
        GraphError: the model (or the submodule named in the message) is not symbolically
            traceable, e.g. because it branches on tensor values.
    """
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types: TraceError, TypeError, AttributeError...
        raise GraphError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
            "the plan needs the model's graph: make forward traceable, or skip the layers involved"
        ) from exc
    inputs = as_input_tuple(example_inputs)
    if inputs:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                ShapeProp(graph_module).propagate(*inputs)
        except Exception as exc:
            raise GraphError(f"running {type(model).__name__} on example_inputs failed: {exc}") from exc
        finally:
            model.train(was_training)
    return graph_module
