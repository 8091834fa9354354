"""Channel dependency analysis: which channels of a model must be pruned together.

Removing output channel ``c`` of a conv is only valid if every tensor slot that holds channel ``c``
of that feature map is removed with it: the following BatchNorm, a depthwise conv (which then
shrinks in step and passes the same channels on), the input columns of the next conv or Linear,
the other branch of a residual add, and the right offset range of a concatenation. Such a set of
channels is a :class:`ChannelGroup`. :func:`find_channel_groups` traces the model with ``torch.fx``
and walks the graph once, tracking for every tensor which groups its channel axis carries:

* a *layout* per tensor: the channel axis and a list of segments ``(group, count, width)``, where a
  channel occupies ``width`` consecutive positions (``width > 1`` after flattening a feature map
  into a Linear, or after a depthwise conv with a channel multiplier);
* residual adds merge the groups of both branches (union-find), concatenation along the channel
  axis chains the segments at their offsets;
* anything not understood (a reshape that splits channels, a ``mul`` of two tensors, indexing,
  attention modules, unknown functions or modules) makes every group touching it unprunable and
  warns, naming the node. The groups feeding the model output are never pruned.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
    ...                       nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    >>> [(g.key, g.num_channels, g.prunable) for g in find_channel_groups(model, torch.zeros(1, 3, 8, 8))]
    [('0', 8, True), ('3', 4, True), ('5', 2, False)]
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from lightning_amct.graph import GraphError, as_input_tuple

Role = Literal["out", "in"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.sigmoid, torch.tanh, torch.clamp, operator.neg, F.relu, F.relu6, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.softplus, F.dropout, F.dropout1d, F.dropout2d,
}  # fmt: skip
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_", "contiguous", "clone", "to", "float"}
_SPATIAL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate,
}  # fmt: skip
_ADD = {operator.add, operator.iadd, operator.sub, torch.add, torch.sub, "add", "add_", "sub"}
_SCALE = {operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_RESHAPE = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, "flatten", "view", "reshape", "squeeze",
            "unsqueeze"}  # fmt: skip
_PERMUTE = {torch.permute, torch.transpose, "permute", "transpose"}
_REDUCE = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}
_QUERIES = {"size", "dim", "numel"}
_TENSOR_FACTS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}  # read by getattr
_RESHAPES_WITH_SIZES = {"view", "reshape", torch.reshape}


@dataclass(frozen=True)
class ChannelMember:
    """One tensor slot that holds a group's channels.

    Attributes:
        module: module name, as in ``model.named_modules()``.
        role: ``"out"`` for the slots indexed by the module's output channels (conv/Linear weight
            rows and bias, BatchNorm and LayerNorm parameters and statistics, depthwise conv rows),
            ``"in"`` for the input-channel axis of a conv or Linear weight (axis 1).
        offset: first position along that axis (non-zero behind a concatenation).
        width: positions per channel (``H*W`` for a Linear after flattening a feature map).
    """

    module: str
    role: Role
    offset: int = 0
    width: int = 1

    def positions(self, channels: torch.Tensor) -> torch.Tensor:
        """Positions along this member's axis that ``channels`` (group indices) occupy."""
        span = torch.arange(self.width, dtype=torch.long)
        return (self.offset + channels.long()[:, None] * self.width + span).flatten()


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together.

    Attributes:
        key: stable name: the first producer in ``model.named_modules()`` order.
        producers: non-depthwise convs and Linears whose output channels are these channels.
        num_channels: N, the channel count.
        members: every slot holding the channels (see :class:`ChannelMember`).
        blocks: G when a grouped conv constrains the group: channels are pruned per block of
            N/G, and each block keeps the same count.
        reason: why the group must stay whole, or None when it can be pruned.
    """

    key: str
    producers: tuple[str, ...]
    num_channels: int
    members: tuple[ChannelMember, ...]
    blocks: int = 1
    reason: str | None = None

    @property
    def prunable(self) -> bool:
        """Whether the group may lose channels."""
        return self.reason is None


class _Segment(NamedTuple):
    gid: int | None  # None: channels that no group owns (they are never pruned)
    count: int
    width: int = 1


class _Layout(NamedTuple):
    axis: int
    segments: tuple[_Segment, ...]

    def structure(self) -> tuple:
        return self.axis, tuple((s.count, s.width) for s in self.segments)


@dataclass
class _Group:
    num_channels: int
    producers: list[str]
    members: list[ChannelMember]
    blocks: int = 1
    reasons: list[str] = field(default_factory=list)


def find_channel_groups(model: nn.Module, example_inputs: object) -> list[ChannelGroup]:
    """Trace ``model`` and return its channel groups, in model order.

    Call it on the unpruned model: the groups describe its current shapes. Warns once per node the
    analysis does not understand, naming the node and the groups that stay whole because of it.

    Args:
        model: the model; traced with ``torch.fx`` (standard layers stay leaves).
        example_inputs: a tensor or tuple of tensors the model accepts (shapes matter, values not).

    Raises:
        lightning_amct.graph.GraphError: the model is not traceable.
    """
    graph_module = trace_model(model, example_inputs)
    return _Analysis(model).run(graph_module.graph)


def trace_model(model: nn.Module, example_inputs: object) -> fx.GraphModule:
    """Trace ``model`` with ``torch.fx`` and annotate every node's shape."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types: TraceError, TypeError, AttributeError...
        raise GraphError(f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc})") from exc
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(*as_input_tuple(example_inputs))
    finally:
        model.train(was_training)
    return graph_module


def _is_channel_prelu(module: nn.Module) -> bool:
    return isinstance(module, nn.PReLU) and module.num_parameters > 1


def _shape(node: object) -> torch.Size | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta.shape if isinstance(meta, TensorMetadata) else None


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _size_left_to_runtime(node: fx.Node, axis: int) -> bool:
    """Whether a ``view``/``reshape`` leaves output ``axis``'s size to the runtime (flattens always do)."""
    if node.target not in _RESHAPES_WITH_SIZES:
        return True
    sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
    return axis < len(sizes) and (isinstance(sizes[axis], fx.Node) or sizes[axis] == -1)


def _target_name(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return type(module).__name__
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


class _Analysis:
    """One walk over the graph; ``layouts`` maps each node to its channel layout (None: untracked)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self.order = {name: index for index, name in enumerate(self.modules)}
        self.layouts: dict[fx.Node, _Layout | None] = {}
        self.groups: dict[int, _Group] = {}
        self.parent: dict[int, int] = {}
        self.calls: dict[str, tuple[_Layout | None, _Layout | None]] = {}
        self.shapes: dict[fx.Node, fx.Node] = {}  # a node holding a tensor's whole shape -> that tensor
        self.not_understood: list[tuple[str, set[int]]] = []

    def run(self, graph: fx.Graph) -> list[ChannelGroup]:
        for node in graph.nodes:
            self.layouts[node] = self._visit(node)
        return self._finish()

    # --- groups -------------------------------------------------------------------------------
    def _find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def _new_group(self, module: str, num_channels: int, blocks: int) -> int:
        gid = len(self.parent)
        self.parent[gid] = gid
        self.groups[gid] = _Group(num_channels, [module], [ChannelMember(module, "out")], blocks)
        return gid

    def _union(self, a: int, b: int) -> None:
        a, b = sorted((self._find(a), self._find(b)))
        if a == b:
            return
        merged = self.groups.pop(b)
        group = self.groups[a]
        group.producers += merged.producers
        group.members += merged.members
        group.blocks = math.lcm(group.blocks, merged.blocks)
        group.reasons += merged.reasons
        self.parent[b] = a

    def _fix(self, layout: _Layout | None, reason: str) -> set[int]:
        gids = {self._find(s.gid) for s in (layout.segments if layout else ()) if s.gid is not None}
        for gid in gids:
            self.groups[gid].reasons.append(reason)
        return gids

    def _unify(self, a: _Layout | None, b: _Layout | None, reason: str) -> None:
        """Declare that ``a`` and ``b`` hold the same channels, position by position."""
        if a is None or b is None or a.structure() != b.structure():
            self._fix(a, reason)
            self._fix(b, reason)
            return
        for sa, sb in zip(a.segments, b.segments):
            if sa.gid is not None and sb.gid is not None:
                self._union(sa.gid, sb.gid)
            else:
                self._fix(_Layout(a.axis, (sa, sb)), reason)

    def _not_understood(
        self, node: fx.Node, detail: str = "", module: nn.Module | None = None, sources: list | None = None
    ) -> None:
        """Pin every group that reaches ``node`` (or ``sources``) and remember it for the warning."""
        what = f"node '{node.name}' ({_target_name(node, module)}){': ' + detail if detail else ''}"
        gids: set[int] = set()
        for source in node.all_input_nodes if sources is None else sources:
            gids |= self._fix(self.layouts.get(source), f"used by {what}, which channel pruning does not understand")
        if gids:
            self.not_understood.append((what, gids))

    # --- traversal ----------------------------------------------------------------------------
    def _visit(self, node: fx.Node) -> _Layout | None:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            for source in node.all_input_nodes:
                self._fix(self.layouts.get(source), "feeds the model output")
            return None
        if node.op == "call_module":
            return self._visit_module(node, node.target, self.modules[node.target])
        return self._visit_op(node)

    def _visit_module(self, node: fx.Node, name: str, module: nn.Module) -> _Layout | None:
        if isinstance(module, (*_CONVS, nn.Linear, *_NORMS, nn.LayerNorm)) or _is_channel_prelu(module):
            return self._call_parametrised(node, name, module)
        if isinstance(module, _ELEMENTWISE_MODULES):
            return self._pass_through(node, node.args[0], spatial=False, module=module)
        if isinstance(module, _SPATIAL_MODULES):
            return self._pass_through(node, node.args[0], spatial=True, module=module)
        if isinstance(module, nn.Flatten):
            return self._reshape(node, module)
        return self._unsupported(node, module=module)

    def _call_parametrised(self, node: fx.Node, name: str, module: nn.Module) -> _Layout | None:
        """A layer with channel-indexed parameters; a second call must see the same channels."""
        layout = self.layouts.get(node.args[0])
        if name in self.calls:
            first_in, first_out = self.calls[name]
            self._unify(first_in, layout, f"'{name}' is called on inputs with different channels")
            return first_out
        if isinstance(module, _CONVS):
            out = self._conv(node, name, module, layout)
        elif isinstance(module, nn.Linear):
            self._consume(node, name, layout, axis=len(_shape(node.args[0])) - 1, module=module)
            out = self._produce(name, module.out_features, axis=len(_shape(node)) - 1)
        elif isinstance(module, nn.LayerNorm):
            out = self._layer_norm(node, name, module, layout)
        else:
            out = self._channelwise(node, name, layout, module, axis=1)
        self.calls[name] = (layout, out)
        return out

    def _attach(self, name: str, role: Role, layout: _Layout, multiplier: int = 1) -> tuple[_Segment, ...]:
        """Make ``name`` a member of every group in ``layout``; return the segments it outputs."""
        segments, offset = [], 0
        for segment in layout.segments:
            width = segment.width * multiplier
            if segment.gid is not None:
                self.groups[self._find(segment.gid)].members.append(ChannelMember(name, role, offset, width))
            segments.append(segment._replace(width=width))
            offset += segment.count * width
        return tuple(segments)

    def _conv(self, node: fx.Node, name: str, conv: nn.Module, layout: _Layout | None) -> _Layout | None:
        if conv.groups > 1 and conv.groups == conv.in_channels:
            return self._depthwise(node, name, conv, layout)
        self._consume(node, name, layout, axis=1, module=conv, blocks=conv.groups)
        return self._produce(name, conv.out_channels, axis=1, blocks=conv.groups)

    def _produce(self, name: str, num_channels: int, axis: int, blocks: int = 1) -> _Layout:
        return _Layout(axis, (_Segment(self._new_group(name, num_channels, blocks), num_channels),))

    def _consume(
        self, node: fx.Node, name: str, layout: _Layout | None, axis: int, module: nn.Module, blocks: int = 1
    ) -> None:
        """Record ``name``'s input columns as members of the groups in ``layout``.

        A grouped conv (``blocks`` = its groups) reads each block of in_channels/G channels with its
        own filters, so its input group is pruned per block (the same count in each).
        """
        if layout is None:
            return
        if layout.axis != axis:
            self._not_understood(node, f"channels arrive on axis {layout.axis}, the layer reads axis {axis}", module)
            return
        tracked = [s.gid for s in layout.segments if s.gid is not None]
        if blocks > 1 and tracked:
            if len(layout.segments) != 1 or layout.segments[0].width != 1:
                self._not_understood(node, "grouped conv over concatenated or flattened channels", module)
                return
            group = self.groups[self._find(tracked[0])]
            group.blocks = math.lcm(group.blocks, blocks)
        self._attach(name, "in", layout)

    def _depthwise(self, node: fx.Node, name: str, conv: nn.Module, layout: _Layout | None) -> _Layout | None:
        """A depthwise conv keeps its input's channels: it shrinks in step and passes them on."""
        if layout is None:
            return None
        if layout.axis != 1:
            return self._unsupported(node, "depthwise conv over a non-channel axis", conv)
        return _Layout(1, self._attach(name, "out", layout, multiplier=conv.out_channels // conv.in_channels))

    def _channelwise(
        self, node: fx.Node, name: str, layout: _Layout | None, module: nn.Module, axis: int
    ) -> _Layout | None:
        """BatchNorm, LayerNorm, per-channel PReLU: parameters indexed by the channel on ``axis``."""
        if layout is None:
            return None
        if layout.axis != axis:
            return self._unsupported(node, f"per-channel parameters on axis {axis}, channels on {layout.axis}", module)
        self._attach(name, "out", layout)
        return layout

    def _layer_norm(self, node: fx.Node, name: str, norm: nn.LayerNorm, layout: _Layout | None) -> _Layout | None:
        if layout is None:
            return None
        ndim = len(_shape(node))
        if layout.axis < ndim - len(norm.normalized_shape):
            return layout  # normalises over other axes: channels stay independent
        if len(norm.normalized_shape) != 1:
            return self._unsupported(node, "LayerNorm over the channel axis and others", norm)
        return self._channelwise(node, name, layout, norm, axis=ndim - 1)

    def _pass_through(
        self, node: fx.Node, source: object, spatial: bool, module: nn.Module | None = None
    ) -> _Layout | None:
        """Elementwise ops keep the shape; spatial ops (pooling, upsampling) keep axes 0 and 1."""
        layout = self.layouts.get(source) if isinstance(source, fx.Node) else None
        others = [n for n in node.all_input_nodes if n is not source and _shape(n) is not None]
        if layout is None and not others:
            return None
        in_shape, out_shape = _shape(source), _shape(node)
        same = in_shape is not None and out_shape is not None and len(in_shape) == len(out_shape)
        if spatial:
            same = same and layout is not None and layout.axis == 1 and in_shape[:2] == out_shape[:2]
        else:
            same = same and in_shape == out_shape
        if others or not same:
            return self._unsupported(node, module=module)
        return layout

    def _unsupported(self, node: fx.Node, detail: str = "", module: nn.Module | None = None) -> None:
        self._not_understood(node, detail, module)
        return None

    def _visit_op(self, node: fx.Node) -> _Layout | None:
        target = node.target
        if target in _QUERIES or (target is getattr and node.args[1] in _TENSOR_FACTS):
            return self._size_read(node)
        if target is operator.getitem and node.args[0] in self.shapes:
            return self._size_read(node)
        if target is operator.getitem and self.layouts.get(node.args[0]) is None:
            return None
        if target in _ELEMENTWISE_FUNCTIONS or target in _ELEMENTWISE_METHODS:
            return self._pass_through(node, _arg(node, 0, "input"), spatial=False)
        if target in _SPATIAL_FUNCTIONS:
            return self._pass_through(node, _arg(node, 0, "input"), spatial=True)
        if target in _ADD or target in _SCALE:
            return self._binary(node, merges=target in _ADD)
        if target in _CAT:
            return self._cat(node)
        if target in _RESHAPE:
            return self._reshape(node)
        if target in _PERMUTE:
            return self._permute(node)
        if target in _REDUCE:
            return self._reduce(node)
        return self._unsupported(node)

    def _size_read(self, node: fx.Node) -> None:
        """A size read as a number: reading the channel count ties it to wherever the number goes.

        Harmless only when every use reshapes the measured tensor itself (``x.view(b, c, -1)``);
        anything else (``b, t, d = x.shape`` then ``y.reshape(b, t, d)``) pins the groups.
        """
        if node.target is operator.getitem:
            source, axis = self.shapes[node.args[0]], node.args[1]
        elif node.target == "dim" or node.target is getattr and node.args[1] != "shape":
            return None
        else:
            source, axis = node.args[0], _arg(node, 1, "dim") if node.target == "size" else None
        layout = self.layouts.get(source)
        if layout is None:
            return None
        if axis is None and node.target != "numel":
            self.shapes[node] = source  # a whole shape: its items are checked where they are read
            if all(user.target is operator.getitem for user in node.users):
                return None
        if isinstance(axis, int) and axis % len(_shape(source)) != layout.axis:
            return None
        if not all(user.target in _RESHAPES_WITH_SIZES and user.args[0] is source for user in node.users):
            self._not_understood(node, "reads the channel count as a number", sources=[source])
        return None

    def _binary(self, node: fx.Node, merges: bool) -> _Layout | None:
        tensors = [a for a in node.args[:2] if _shape(a) is not None]
        if len(tensors) == 1:
            return self._pass_through(node, tensors[0], spatial=False)
        if not merges or len(tensors) != 2:
            return self._unsupported(node, "product or quotient of two tensors" if not merges else "")
        a, b = (self.layouts.get(t) for t in tensors)
        shapes = {len(_shape(t)) for t in (*tensors, node)}
        if len(shapes) != 1:
            self._fix(a, f"broadcast in '{node.name}'")
            self._fix(b, f"broadcast in '{node.name}'")
        else:
            self._unify(a, b, f"added to channels that cannot be pruned in '{node.name}'")
        return a if a is not None else b

    def _cat(self, node: fx.Node) -> _Layout | None:
        tensors = list(_arg(node, 0, "tensors"))
        dim = _arg(node, 1, "dim", 0) % len(_shape(node))
        layouts = [self.layouts.get(t) for t in tensors]
        if all(layout is None for layout in layouts):
            return None
        if any(layout is not None and layout.axis != dim for layout in layouts):
            for layout in layouts[1:]:  # stacked along another axis: channels line up across inputs
                self._unify(layouts[0], layout, f"concatenated with other channels in '{node.name}'")
            return next(layout for layout in layouts if layout is not None)
        segments: list[_Segment] = []
        for tensor, layout in zip(tensors, layouts):
            segments += layout.segments if layout is not None else (_Segment(None, _shape(tensor)[dim]),)
        return _Layout(dim, tuple(segments))

    def _reshape(self, node: fx.Node, module: nn.Module | None = None) -> _Layout | None:
        """A reshape is understood when the channel axis survives whole, or as the head of a flatten.

        ``view``/``reshape`` must also leave the channel size to the runtime (``-1`` or a size read
        from a tensor): a literal channel count would break once the channels shrink.
        """
        layout = self.layouts.get(node.args[0])
        if layout is None:
            return None
        in_shape, out_shape = list(_shape(node.args[0])), list(_shape(node))
        before, after = math.prod(in_shape[: layout.axis]), math.prod(in_shape[layout.axis + 1 :])
        channels = in_shape[layout.axis]
        for axis in range(len(out_shape)):
            if math.prod(out_shape[:axis]) != before or not _size_left_to_runtime(node, axis):
                continue
            if out_shape[axis] == channels and math.prod(out_shape[axis + 1 :]) == after:
                return _Layout(axis, layout.segments)
            if out_shape[axis] == channels * after and math.prod(out_shape[axis + 1 :]) == 1:
                return _Layout(axis, tuple(s._replace(width=s.width * after) for s in layout.segments))
        return self._unsupported(node, "reshape that splits or merges the channel axis, or fixes its size", module)

    def _permute(self, node: fx.Node) -> _Layout | None:
        layout = self.layouts.get(node.args[0])
        if layout is None:
            return None
        ndim = len(_shape(node))
        if node.target in (torch.transpose, "transpose"):
            a, b = _arg(node, 1, "dim0") % ndim, _arg(node, 2, "dim1") % ndim
            order = list(range(ndim))
            order[a], order[b] = b, a
        else:
            order = [d % ndim for d in (node.args[1:] if len(node.args) > 2 else _arg(node, 1, "dims"))]
        return _Layout(order.index(layout.axis), layout.segments)

    def _reduce(self, node: fx.Node) -> _Layout | None:
        layout = self.layouts.get(node.args[0])
        if layout is None:
            return None
        ndim = len(_shape(node.args[0]))
        dims = _arg(node, 1, "dim")
        if dims is None:
            return self._unsupported(node, "reduction over all axes")
        dims = {d % ndim for d in ((dims,) if isinstance(dims, int) else dims)}
        if layout.axis in dims:
            return self._unsupported(node, "reduction over the channel axis")
        keepdim = _arg(node, 2, "keepdim", False)
        return _Layout(layout.axis - (0 if keepdim else sum(d < layout.axis for d in dims)), layout.segments)

    # --- result -------------------------------------------------------------------------------
    def _member_order(self, member: ChannelMember) -> tuple[int, bool, int]:
        return self.order[member.module], member.role == "in", member.offset

    def _finish(self) -> list[ChannelGroup]:
        groups = {}
        for gid, group in self.groups.items():
            producers = tuple(sorted(dict.fromkeys(group.producers), key=self.order.__getitem__))
            groups[gid] = ChannelGroup(
                key=producers[0],
                producers=producers,
                num_channels=group.num_channels,
                members=tuple(sorted(set(group.members), key=self._member_order)),
                blocks=group.blocks,
                reason="; ".join(dict.fromkeys(group.reasons)) or None,
            )
        for what, gids in self.not_understood:
            keys = sorted({groups[self._find(gid)].key for gid in gids}, key=self.order.__getitem__)
            warnings.warn(f"channel pruning does not understand {what}; channel groups {keys} stay whole", stacklevel=3)
        return sorted(groups.values(), key=lambda g: self.order[g.key])
