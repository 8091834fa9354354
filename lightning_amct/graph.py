"""The model's graph: captured once with ``torch.export``, read by the plan and by channel pruning.

This module is the only one that knows how the graph is captured. It runs the model once on
example inputs under ``torch.export`` (non-strict: the model's own Python runs, so whatever code
runs forward is captured, data-dependent branches aside) in eval mode, whatever mode the model is
in, so the result does not depend on it. It hands the rest of the package a :class:`ModelGraph`
of plain :class:`Node` objects: ATen operators (``conv2d``, ``linear``, ``batch_norm``, ``add``,
``view``...), a closed set whatever Python the model is written in, each with its output shape,
the parameters it reads as nodes of their own (named as in ``model.named_parameters()``), and the
module calls it runs inside (named as in ``model.named_modules()``), so the plan can ask which
tensor a layer reads and channel pruning which parameters a group of channels runs through.

Example:
    >>> import torch
    >>> from torch import nn
    >>> graph = capture_graph(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), torch.zeros(2, 4))
    >>> [(node.op, node.shape, node.module) for node in graph.nodes if node.kind == "op"]
    [('linear', (2, 8), '0'), ('relu', (2, 8), '1')]
    >>> call = graph.calls("1")[0]
    >>> call.inputs[0].op, call.outputs[0].op
    ('linear', 'relu')
"""

from __future__ import annotations

import logging
import operator
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import fx, nn

NodeKind = Literal["input", "parameter", "buffer", "constant", "op", "output"]

_TORCH_DIR = str(Path(torch.__file__).parent)
_PACKAGE_DIR = str(Path(__file__).parent)
_SPEC_KINDS = {"PARAMETER": "parameter", "BUFFER": "buffer", "CONSTANT_TENSOR": "constant"}


class GraphError(RuntimeError):
    """The model's graph could not be captured: no example inputs, or ``torch.export`` failed on it."""


class GraphWarning(UserWarning):
    """The model's graph could not be captured, and compression goes on without it."""


def as_input_tuple(example_inputs: object) -> tuple:
    """``example_inputs`` as a tuple of positional inputs (a lone tensor becomes a 1-tuple)."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def model_inputs(model: nn.Module, example_inputs: object) -> tuple:
    """``example_inputs`` as a tuple; when None, the model's own ``example_input_array`` if it has
    one (a LightningModule), else an empty tuple."""
    if example_inputs is None:
        example_inputs = getattr(model, "example_input_array", None)
    return as_input_tuple(example_inputs)


@dataclass(eq=False)
class Node:
    """One value of the graph and the operation that makes it.

    Attributes:
        name: unique within the graph.
        kind: ``"op"`` for an operator, ``"input"`` for a model input, ``"parameter"``/``"buffer"``/
            ``"constant"`` for a tensor the model holds, ``"output"`` for the model's result.
        op: the ATen operator without namespace and overload (``"conv2d"``, ``"add_"``;
            ``"getitem"`` picks one result of an operator with several); other namespaces keep
            theirs (``"my_lib::fused"``); empty for other kinds.
        args, kwargs: the operator's arguments: Nodes, Python values, lists of them.
        shape: the output's shape, or None when it is not one tensor.
        dtype: the output's dtype, or None when it is not one tensor.
        target: for a parameter, buffer or constant its name as in ``model.state_dict()``.
        stack: the module calls the operator runs in, outermost first: ``(call, module name)``
            pairs; ``call`` tells apart calls of one module (``"fc"``, ``"fc@1"``).
        users: the nodes reading this one, in graph order.
    """

    name: str
    kind: NodeKind
    op: str = ""
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    target: str | None = None
    stack: tuple[tuple[str, str], ...] = ()
    users: list[Node] = field(default_factory=list)

    @property
    def module(self) -> str | None:
        """The innermost module this operator runs in (``""`` for the model's own forward)."""
        return self.stack[-1][1] if self.stack else ("" if self.kind == "op" else None)

    @property
    def owner(self) -> tuple[str, str]:
        """For a parameter, buffer or constant: ``(module name, attribute name)``."""
        module, _, attribute = (self.target or "").rpartition(".")
        return module, attribute

    def arg(self, index: int, name: str, default: object = None) -> object:
        """Argument ``index`` (or keyword ``name``), ``default`` when not given."""
        return self.args[index] if len(self.args) > index else self.kwargs.get(name, default)

    def tensor_args(self) -> list[Node]:
        """The nodes among the arguments (lists included), in order, each once."""
        found: dict[Node, None] = {}
        for value in (*self.args, *self.kwargs.values()):
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, Node):
                    found[item] = None
        return list(found)

    def __repr__(self) -> str:
        return f"Node({self.name}: {self.op or self.kind}{list(self.shape) if self.shape is not None else ''})"


@dataclass(eq=False)
class ModuleCall:
    """One call of a module: the operators it ran, what it read from outside and what it returned.

    Attributes:
        module: the module's name, as in ``model.named_modules()``.
        call: tells apart calls of the same module (``"fc"``, ``"fc@1"``).
        nodes: its operators, in graph order (those of its submodules included).
        inputs: the tensors it read that came from outside the call (parameters and buffers
            excepted), in the order it first read them.
        outputs: the tensors it made that something outside the call reads.
    """

    module: str
    call: str
    nodes: list[Node] = field(default_factory=list)
    inputs: tuple[Node, ...] = ()
    outputs: tuple[Node, ...] = ()


class ModelGraph:
    """The captured graph of a model: :class:`Node` objects in execution order, and module calls.

    Build one with :func:`capture_graph`.
    """

    def __init__(self, nodes: list[Node], model: nn.Module) -> None:
        self.nodes = nodes
        self.modules = dict(model.named_modules())
        self.model_name = type(model).__name__
        self._positions = {node: index for index, node in enumerate(nodes)}
        self._calls: dict[str, ModuleCall] = {}
        self._by_module: dict[str, list[ModuleCall]] = {}
        for node in nodes:
            for call, module in node.stack:
                if call not in self._calls:
                    self._calls[call] = ModuleCall(module, call)
                    self._by_module.setdefault(module, []).append(self._calls[call])
                self._calls[call].nodes.append(node)
        for record in self._calls.values():
            _close(record)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def position(self, node: Node) -> int:
        """``node``'s index in execution order."""
        return self._positions[node]

    def calls(self, module: str) -> list[ModuleCall]:
        """The calls of ``module`` in graph order; empty when it ran no operator (``nn.Identity``)."""
        return self._by_module.get(module, [])

    def called_modules(self) -> dict[str, list[ModuleCall]]:
        """Every module that ran an operator, with its calls, in order of first call."""
        return dict(self._by_module)

    def innermost_call(self, node: Node) -> ModuleCall | None:
        """The innermost module call ``node`` runs in, or None for the model's own forward."""
        return self._calls[node.stack[-1][0]] if node.stack else None

    def entered_call(self, value: Node, user: Node) -> ModuleCall | None:
        """The innermost module call ``user`` runs in when ``value`` enters it from outside.

        None when ``user`` runs in the model's own forward or in a call that made ``value`` too
        (a function applied next to where ``value`` was made, not a module it is passed to).
        """
        if not user.stack or user.stack[-1] in value.stack:
            return None
        return self._calls[user.stack[-1][0]]

    def readers(self, value: Node) -> list[ModuleCall | Node]:
        """What reads ``value``, each once in graph order: the module calls it enters, the other
        operators that read it, and the output node when it is (part of) the model's result."""
        found: dict[ModuleCall | Node, None] = {}
        for user in value.users:
            found[self.entered_call(value, user) or user] = None
        return list(found)


def _close(record: ModuleCall) -> None:
    inside = set(record.nodes)
    inputs: dict[Node, None] = {}
    outputs: dict[Node, None] = {}
    for node in record.nodes:
        for source in node.tensor_args():
            if source not in inside and source.kind in ("op", "input"):
                inputs[source] = None
        if any(user not in inside for user in node.users):
            outputs[node] = None
    record.inputs, record.outputs = tuple(inputs), tuple(outputs)


def capture_graph(model: nn.Module, example_inputs: object) -> ModelGraph:
    """Capture ``model``'s graph with ``torch.export`` (non-strict), in eval mode.

    The model runs once, on fake tensors of the example inputs' shapes (no real computation);
    its modules' train/eval modes are put back as they were.

    Args:
        model: the model, uncompressed.
        example_inputs: a tensor or a tuple of tensors the model accepts; None: the model's
            ``example_input_array``.

    Raises:
        GraphError: no example inputs, or the capture failed; the one-line message names the
            error and the line of model code that raised it.
    """
    inputs = model_inputs(model, example_inputs)
    if not inputs:
        raise GraphError(
            f"no example inputs to capture the graph of {type(model).__name__} with: set the "
            "LightningModule's example_input_array or pass example_inputs"
        )
    device = next((p.device for p in model.parameters()), None)
    if device is not None:
        inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    modes = {module: module.training for module in model.modules()}
    quiet = logging.getLogger("torch")
    level = quiet.level
    model.eval()
    quiet.setLevel(logging.CRITICAL)  # export logs the partial graph of a failure at length
    try:
        exported = torch.export.export(model, inputs, strict=False)
    except Exception as exc:  # export raises many types; all mean the same here
        message = f"cannot capture the graph of {type(model).__name__} with torch.export: {_one_line(exc)}"
        raise GraphError(message) from exc
    finally:
        quiet.setLevel(level)
        for module, training in modes.items():
            module.training = training
    return _convert(exported, model)


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message (at file:line: code)`` with the model code that raised it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith((_TORCH_DIR, _PACKAGE_DIR)) and "<" not in frame.filename
    ]
    if frames:
        frame = frames[-1]
        text += f" (at {frame.filename}:{frame.lineno}: {frame.line})"
    return text


def _convert(exported: torch.export.ExportedProgram, model: nn.Module) -> ModelGraph:
    kinds: dict[str, tuple[NodeKind, str | None]] = {}
    for spec in exported.graph_signature.input_specs:
        kind = _SPEC_KINDS.get(spec.kind.name, "input")
        kinds[spec.arg.name] = (kind, spec.target if kind != "input" else None)
    nodes: dict[fx.Node, Node] = {}
    for fx_node in exported.graph.nodes:
        nodes[fx_node] = _node(fx_node, nodes, kinds)
    result = list(nodes.values())
    for node in result:
        for source in node.tensor_args():
            source.users.append(node)
    return ModelGraph(result, model)


def _node(fx_node: fx.Node, nodes: dict[fx.Node, Node], kinds: dict[str, tuple[NodeKind, str | None]]) -> Node:
    def mapped(value: object) -> object:
        if isinstance(value, fx.Node):
            return nodes[value]
        if isinstance(value, (list, tuple)):
            return type(value)(mapped(v) for v in value)
        return value

    value = fx_node.meta.get("val")
    is_tensor = isinstance(value, torch.Tensor)
    common = {
        "name": fx_node.name,
        "shape": tuple(int(d) for d in value.shape) if is_tensor else None,
        "dtype": value.dtype if is_tensor else None,
    }
    if fx_node.op == "placeholder":
        kind, target = kinds.get(fx_node.name, ("input", None))
        return Node(kind=kind, target=target, **common)
    if fx_node.op == "output":
        return Node(kind="output", args=mapped(fx_node.args), **common)
    stack = tuple((call, path) for call, (path, _) in (fx_node.meta.get("nn_module_stack") or {}).items() if path)
    return Node(
        kind="op",
        op=_op_name(fx_node.target),
        args=mapped(fx_node.args),
        kwargs={k: mapped(v) for k, v in fx_node.kwargs.items()},
        stack=stack,
        **common,
    )


def _op_name(target: object) -> str:
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "overloadpacket", None)
    if packet is None:
        return getattr(target, "__name__", str(target))
    namespace = getattr(target, "namespace", "aten")
    return packet.__name__ if namespace == "aten" else f"{namespace}::{packet.__name__}"
