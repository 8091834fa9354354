"""The model's graph: captured once by running the model, read by the plan and by channel pruning.

This module is the only one that knows how the graph is captured. It runs the model once on
example inputs (without gradients, in eval mode whatever mode the model is in, so the result
does not depend on it) and records each ATen operator at the level ``torch.export`` records its
training IR; whatever Python runs forward is captured, reads of tensor values into Python aside.
It hands the rest of the package a :class:`ModelGraph`
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

import contextlib
import operator
import sys
import traceback
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch._dispatch.python import enable_python_dispatcher
from torch._export.utils import _compiling_state_context
from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_amct.bulk import collection_paused

NodeKind = Literal["input", "parameter", "buffer", "constant", "op", "output"]

_TORCH_DIR = str(Path(torch.__file__).parent)
_PACKAGE_DIR = str(Path(__file__).parent)

#: Operators that can swap the two axes of a 2-D tensor (``W.t()``, ``W.T``, ``W.mT``,
#: ``W.transpose(0, 1)``, ``W.permute(1, 0)``): how a Linear written out reads its weight.
TRANSPOSING = frozenset({"t", "numpy_T", "mT", "transpose", "permute"})


def transposed_parameter(value: object) -> Node | None:
    """The 2-D parameter whose two axes ``value`` swaps (``W.T``, ``W.t()``), or None."""
    if not (isinstance(value, Node) and value.op in TRANSPOSING and value.args):
        return None
    source = value.args[0]
    if not (isinstance(source, Node) and source.kind == "parameter" and source.shape is not None):
        return None
    return source if len(source.shape) == 2 and value.shape == source.shape[::-1] else None


class GraphError(RuntimeError):
    """The model's graph could not be captured: no example inputs, or running the model failed or read tensor values."""


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
    hint = ""
    if isinstance(example_inputs, Mapping):  # Lightning's example_input_array as keyword arguments
        hint = (
            ": a dict is taken for keyword arguments, which are not supported; give (batch,) for a forward "
            "that takes the batch dict, or the tensors in the order of forward's parameters"
        )
    raise TypeError(
        "example_inputs must be a tensor or a tuple of forward's positional inputs (tensors, or dicts, "
        f"lists or tuples of tensors), got {type(example_inputs).__name__}{hint}"
    )


def model_inputs(model: nn.Module, example_inputs: object) -> tuple:
    """``example_inputs`` as a tuple; when None, the model's own ``example_input_array`` if it has
    one (a LightningModule), else an empty tuple."""
    if example_inputs is None:
        example_inputs = getattr(model, "example_input_array", None)
    return as_input_tuple(example_inputs)


def cpu_inputs(inputs: tuple) -> tuple:
    """``inputs`` detached on the CPU, floating-point tensors as float32, in their containers
    (a dict of tensors stays a dict): what the artifacts are traced and measured with."""
    return tuple(pytree.tree_map_only(torch.Tensor, _cpu_input, inputs))


def _cpu_input(x: torch.Tensor) -> torch.Tensor:
    return x.detach().cpu().float() if x.is_floating_point() else x.detach().cpu()


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


#: What a caller of the Python API does about missing example inputs (the command says its own option instead).
HOW_TO_GIVE_INPUTS = "set the LightningModule's example_input_array or pass example_inputs"


@collection_paused()
def capture_graph(model: nn.Module, example_inputs: object) -> ModelGraph:
    """Capture ``model``'s graph by running it once on the example inputs, in eval mode.

    Each ATen operator is recorded where ``torch.export`` records its training IR (before
    autograd, so ``linear`` and ``conv2d`` rather than what they decompose into), with the module
    calls it runs in and the tensors it reads; libraries see ``torch.compiler.is_exporting()``
    as under ``torch.export`` and take the same traceable paths. The run is real (no gradients):
    about 0.1 ms an operator where ``torch.export`` takes about 2 ms, so a 10,000-layer model
    (20,000 operators) is captured in about 2 s. What it changes is put back: modules' train/eval
    modes and other attributes, the random number generators, and tensors it writes in place
    (parameters, buffers, example inputs). A forward
    that reads a tensor's value in Python (``if x.sum() > 0``, ``.item()``) is refused: its graph
    would hold only for these inputs.

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
        raise GraphError(f"no example inputs to capture the graph of {type(model).__name__} with: {HOW_TO_GIVE_INPUTS}")
    device = next((p.device for p in model.parameters()), None)
    if device is not None:
        inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    attributes = _attributes(model)
    model.eval()
    recorder = _Recorder(model, inputs)
    cuda = [device.index or 0] if device is not None and device.type == "cuda" else []
    try:
        with (
            torch.random.fork_rng(cuda),
            torch.no_grad(),
            _compiled_code_eager(),
            _compiling_state_context(),
            recorder.recording(),
        ):
            result = model(*inputs)
    except Exception as exc:  # the model's own code raises any type; all mean the same here
        raise GraphError(f"cannot capture the graph of {type(model).__name__}: {_one_line(exc)}") from exc
    finally:
        recorder.restore_written()
        _put_back(attributes)
    return ModelGraph(recorder.finish(result), model)


#: What torch keeps in a module's ``__dict__`` for itself: its parameters, buffers, submodules, hooks.
_REGISTRIES = frozenset(vars(nn.Module())) - {"training"}


#: Containers a forward may fill in place: :func:`_attributes` keeps a copy of their contents.
_CONTAINERS = (dict, list, set)


class _Container(NamedTuple):
    """A container attribute and a copy of its contents, as the capture found them."""

    container: dict | list | set
    contents: dict | list | set

    def refill(self) -> dict | list | set:
        """The container with its contents again (the same object, as whatever else holds it sees)."""
        self.container.clear()
        if isinstance(self.container, list):
            self.container.extend(self.contents)
        else:
            self.container.update(self.contents)
        return self.container


def _attributes(model: nn.Module) -> dict[nn.Module, dict[str, Any]]:
    """Each module's own attributes (its mode included), as they are: what a forward may set.

    A dict, list or set is kept with a copy of its contents, which a forward may change without
    rebinding the attribute.
    """
    return {
        module: {
            key: _Container(value, type(value)(value)) if type(value) in _CONTAINERS else value
            for key, value in vars(module).items()
            if key not in _REGISTRIES
        }
        for module in model.modules()
    }


def _put_back(attributes: dict[nn.Module, dict[str, Any]]) -> None:
    """Give each module the attributes :func:`_attributes` saw, dropping those set since.

    A forward may keep state in plain attributes, beside the tensors it writes: RWKV divides its
    weights in place in eval mode and records that in a flag, which its next training forward
    reads to multiply them back. The weights are put back, so the flag must be too. LeViT's
    attention fills a dict with its biases in eval mode and empties it only in its own
    ``train()``, which Lightning does not call: left filled, the biases of capture time would
    outlive training into the exported models.
    """
    for module, saved in attributes.items():
        for key in vars(module).keys() - _REGISTRIES - saved.keys():
            del module.__dict__[key]
        for key, value in saved.items():
            module.__dict__[key] = value.refill() if isinstance(value, _Container) else value


def _compiled_code_eager() -> contextlib.AbstractContextManager:
    """Run compiled code of the model (``torch.compile(module)``, the forward Lightning compiles
    for ``trainer.fit(torch.compile(module))``) eagerly while its operators are recorded: the
    compiler would trace the recorder itself. No code is compiled while torch's compiler was never
    imported, and importing it costs most of a second, so then nothing is done."""
    if "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


class DataDependentError(RuntimeError):
    """The model read a tensor's value into Python while its graph was being captured: the graph
    would hold only for the example inputs."""

    def __init__(self, how: str) -> None:
        super().__init__(
            f"the model reads a tensor's value in Python ({how}), so its graph would hold only for these inputs"
        )


# operators that hand a tensor's value to Python: the graph after them depends on the data
_VALUE_READS = frozenset({"item", "_local_scalar_dense", "is_nonzero", "equal"})


class _NoValuesToPython(TorchFunctionMode):
    """Refuses the tensor methods that hand values to NumPy or Python lists, below any operator."""

    _REFUSED = frozenset({torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.__array__})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._REFUSED:
            raise DataDependentError(func.__name__)
        return func(*args, **(kwargs or {}))


class _Recorder(ProxyTorchDispatchMode):
    """Records ATen operators at the pre-dispatch level, the level of ``torch.export``'s training IR.

    Derives from ``ProxyTorchDispatchMode`` only because torch accepts no other mode at that
    level; none of its tracing runs. Tensors are told apart by identity, held weakly.
    """

    def __init__(self, model: nn.Module, inputs: tuple) -> None:
        TorchDispatchMode.__init__(self, torch._C.DispatchKey.PreDispatch)
        self._mode_key = torch._C._TorchDispatchModeKey.PROXY
        self.enter_stack: list = []
        self.placeholders: list[Node] = []
        self.ops: list[Node] = []
        self._values: dict[int, tuple[weakref.ref, Node]] = {}
        self._written: dict[Node, tuple[torch.Tensor, torch.Tensor]] = {}
        self._names: dict[int, str] = {}
        self._attributes: dict[int, str] = {}  # tensors held as plain attributes, not registered
        for name, module in model.named_modules():
            self._names[id(module)] = name
            for attribute, value in vars(module).items():
                if isinstance(value, torch.Tensor):
                    self._attributes[id(value)] = f"{name}.{attribute}" if name else attribute
        self._calls: dict[str, int] = {}
        self._stack: list[tuple[tuple[str, str], ...]] = [()]
        self._counts: dict[str, int] = {}
        for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
            for target, tensor in named:
                self._placeholder(tensor, kind, target)
        constants = len(self.placeholders)
        for index, tensor in enumerate(leaf for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, torch.Tensor)):
            self._placeholder(tensor, "input", f"input_{index}")
        self._inputs = self.placeholders[constants:]
        del self.placeholders[constants:]

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the operators and module calls run inside."""
        pre = register_module_forward_pre_hook(self._enter)
        post = register_module_forward_hook(self._leave, always_call=True)
        try:
            with enable_python_dispatcher(), self, _NoValuesToPython():
                yield
        finally:
            pre.remove()
            post.remove()

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """No: the recorder runs eagerly, never under ``torch.compile``, so its ``__torch_dispatch__``
        is left unwrapped by ``torch._dynamo.disable`` (whose wrapper costs per operator, and whose
        first call imports dynamo: 0.8 s)."""
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _op_name(func)
        if op in _VALUE_READS:
            raise DataDependentError(op)
        if func._schema.is_mutable:
            self._keep_before_write(args, kwargs)
        out = func(*args, **kwargs)
        node = self._op(op, self._mapped(args), {k: self._mapped(v) for k, v in kwargs.items()}, out)
        if isinstance(out, (tuple, list)):
            for index, item in enumerate(out):
                if isinstance(item, torch.Tensor):
                    self._op("getitem", (node, index), {}, item)
        return out

    def finish(self, result: object) -> list[Node]:
        """The nodes in graph order: parameters, buffers, constants, inputs, operators, output;
        ``getitem`` nodes nothing reads are left out, as ``torch.export`` leaves them out."""
        ops = [node for node in self.ops if node.op != "getitem" or node.users]
        leaves = [leaf for leaf in pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor)]
        output = Node(name="output", kind="output", args=(tuple(self._mapped(leaf) for leaf in leaves),))
        for source in output.tensor_args():
            source.users.append(output)
        return [*self.placeholders, *self._inputs, *ops, output]

    def restore_written(self) -> None:
        """Put back the model's and the inputs' tensors the run wrote in place."""
        with torch.no_grad():
            for tensor, before in self._written.values():
                tensor.copy_(before)

    # -- module calls ---------------------------------------------------------------------
    def _enter(self, module: nn.Module, args: object) -> None:
        name = self._names.get(id(module))
        stack = self._stack[-1]
        if name:  # the model itself ("") is not a call of its own
            count = self._calls[name] = self._calls.get(name, -1) + 1
            stack = (*stack, (f"{name}@{count}" if count else name, name))
        self._stack.append(stack)

    def _leave(self, module: nn.Module, args: object, output: object) -> None:
        if len(self._stack) > 1:
            self._stack.pop()

    # -- values ---------------------------------------------------------------------------
    def _placeholder(self, tensor: torch.Tensor, kind: NodeKind, target: str | None) -> Node:
        label = (target or kind).replace(".", "_")
        shape, dtype = tuple(tensor.shape), tensor.dtype
        node = Node(name=f"{kind[0]}_{label}", kind=kind, target=target, shape=shape, dtype=dtype)
        self._values[id(tensor)] = (weakref.ref(tensor), node)
        self.placeholders.append(node)
        return node

    def _node_of(self, tensor: torch.Tensor) -> Node:
        known = self._values.get(id(tensor))
        if known is not None and known[0]() is tensor:
            return known[1]
        # a tensor no recorded operator made: a tensor attribute or a literal of the model's code
        target = self._attributes.get(id(tensor))
        if target is None:
            target = f"constant_{sum(node.kind == 'constant' for node in self.placeholders)}"
        return self._placeholder(tensor, "constant", target)

    def _mapped(self, value: object) -> object:
        if isinstance(value, torch.Tensor):
            return self._node_of(value)
        if isinstance(value, (list, tuple)):
            return type(value)(self._mapped(item) for item in value)
        return value

    def _op(self, op: str, args: tuple, kwargs: dict, out: object) -> Node:
        count = self._counts[op] = self._counts.get(op, -1) + 1
        is_tensor = isinstance(out, torch.Tensor)
        node = Node(
            name=f"{op}_{count}" if count else op,
            kind="op",
            op=op,
            args=args,
            kwargs=kwargs,
            shape=tuple(out.shape) if is_tensor else None,
            dtype=out.dtype if is_tensor else None,
            stack=self._stack[-1],
        )
        for source in node.tensor_args():
            source.users.append(node)
        if is_tensor:  # an in-place operator's result is its input: later readers read this node
            self._values[id(out)] = (weakref.ref(out), node)
        self.ops.append(node)
        return node

    def _keep_before_write(self, args: tuple, kwargs: dict) -> None:
        for value in pytree.tree_leaves((args, kwargs)):
            if isinstance(value, torch.Tensor):
                node = self._node_of(value)
                if node.kind != "op" and node not in self._written:
                    self._written[node] = (value, value.clone())


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


def _op_name(target: object) -> str:
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "overloadpacket", None)
    if packet is None:
        return getattr(target, "__name__", str(target))
    namespace = getattr(target, "namespace", "aten")
    return packet.__name__ if namespace == "aten" else f"{namespace}::{packet.__name__}"
