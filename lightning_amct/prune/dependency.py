"""Channel dependency analysis: which channels of a model must be pruned together.

Removing output channel ``c`` of a conv is only valid if every tensor slot that holds channel ``c``
of that feature map is removed with it: the following BatchNorm, a depthwise conv (which then
shrinks in step and passes the same channels on), the input columns of the next conv or Linear,
the other branch of a residual add, the right offset range of a concatenation, a per-channel
parameter the feature map is multiplied by (a layer scale) and the parameters of a norm written
as a function. Such a set of channels is a :class:`ChannelGroup`; each slot is a
:class:`ChannelMember`: one axis of one parameter or buffer. :func:`channel_groups` walks the
model's captured graph (:mod:`lightning_amct.graph`: ATen operators, whatever Python the model
is written in) once, tracking for every tensor which groups its channel axis carries:

* a *layout* per tensor: the channel axis and a list of segments ``(group, count, width)``, where a
  channel occupies ``width`` consecutive positions (``width > 1`` after flattening a feature map
  into a Linear, or after a depthwise conv with a channel multiplier);
* elementwise operators between feature maps (a residual add, a squeeze-excite gate
  ``x * sigmoid(se(x))``) merge the groups of both sides (union-find), with broadcasting: a side
  of size 1 on the channel axis leaves the other alone; a parameter on the other side (through
  views and elementwise functions of it) becomes a member; concatenation along the channel axis
  chains the segments at their offsets;
* a grouped conv prunes its input group and its own output group per block (the same count in
  each), a ``group_norm`` its group per norm group;
* one parameter axis read in two places ties what it meets there (a module called twice);
* a reduction over the channel axis (an RMSNorm's mean square, a sum of ``q * k``) is a statistic
  of the channels: the groups stay prunable, as through a LayerNorm, and the result carries none;
* anything not understood (a reshape that splits channels, indexing or softmax over channels,
  attention kernels, unknown operators) makes every group touching it unprunable and warns,
  naming the operator and the module it runs in. The groups feeding the model output are never
  pruned, nor those added to a tensor no group owns (the model input). A table's channels (an
  embedding's columns, read by a layer or added to a feature map) join the group they meet.

The graph is captured in eval mode, so the groups do not depend on the mode the model is in.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
    ...                       nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    >>> [(g.key, g.num_channels, g.prunable) for g in find_channel_groups(model, torch.zeros(1, 3, 8, 8))]
    [('0', 8, True), ('3', 4, True), ('5', 2, False)]
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lightning_amct.graph import ModelGraph, Node, capture_graph, transposed_parameter
from lightning_amct.prune.layouts import (
    ALONG_AXIS,
    ARG_REDUCE,
    AXIS_OPS,
    BATCH_NORMS,
    BROADCAST,
    CONVS,
    LAST_AXIS_NORMS,
    MERGING,
    NORMALIZED_SHAPE,
    OPAQUE,
    REDUCE,
    RESHAPE,
    SHAPE_ONLY,
    SPATIAL,
    SPLIT,
    TRANSPOSED_CONVS,
    UNARY,
    Layout,
    Segment,
    Stored,
    axis_map,
    split_sizes,
)


@dataclass(frozen=True)
class ChannelMember:
    """One tensor axis that holds a group's channels.

    Attributes:
        module: the module holding the tensor, as in ``model.named_modules()``.
        tensor: the parameter or buffer's attribute name (``weight``, ``running_var``,
            ``layer_scale_parameter``), or ``normalized_shape``: the size a norm module holds
            (an int or a tuple of ints), which shrinks with the group.
        axis: the tensor's axis that indexes the channels (0: a conv's or Linear's output rows
            and per-channel parameters, 1: a conv's or Linear's input columns; the other way
            round for GPT-2's ``Conv1D``, whose weight is ``(inputs, outputs)``).
        offset: first position along that axis (non-zero behind a concatenation).
        width: positions per channel (``H*W`` for a Linear after flattening a feature map).
    """

    module: str
    tensor: str
    axis: int
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
        producers: non-depthwise convs, Linears and ``Conv1D`` layers whose output channels are
            these channels.
        num_channels: N, the channel count.
        members: every tensor axis holding the channels (see :class:`ChannelMember`).
        blocks: G when a grouped conv or a group norm constrains the group: channels are pruned
            per block of N/G, and each block keeps the same count.
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


def find_channel_groups(model: nn.Module, example_inputs: object) -> list[ChannelGroup]:
    """Capture ``model``'s graph and return its channel groups, in model order.

    Call it on the unpruned model: the groups describe its current shapes. Warns once per
    operator the analysis does not understand, naming it and the groups that stay whole.

    Args:
        model: the model.
        example_inputs: a tensor or tuple of tensors the model accepts (shapes matter, values not).

    Raises:
        lightning_amct.graph.GraphError: the graph cannot be captured.
    """
    return channel_groups(capture_graph(model, example_inputs))


def channel_groups(graph: ModelGraph) -> list[ChannelGroup]:
    """The channel groups of a captured graph (see :func:`find_channel_groups`)."""
    return _Analysis(graph).run()


@dataclass
class _Group:
    num_channels: int
    producers: list[str]
    members: list[ChannelMember]
    blocks: int = 1
    reasons: list[str] = field(default_factory=list)


class _Analysis:
    """One walk over the graph; ``info`` maps each node to a Layout, a Stored, a list of them
    (an operator with several results) or None (nothing tracked)."""

    def __init__(self, graph: ModelGraph) -> None:
        self.graph = graph
        self.order = {name: index for index, name in enumerate(graph.modules)}
        self.info: dict[Node, object] = {}
        self.groups: dict[int, _Group] = {}
        self.parent: dict[int, int] = {}
        self.stored_axes: dict[tuple[str, int], tuple[Layout, int]] = {}  # (tensor, axis) -> first use
        self.not_understood: list[tuple[str, set[int]]] = []
        self.divided: dict[int, list[int]] = {}  # a group a split of the channel axis cut -> its pieces

    def run(self) -> list[ChannelGroup]:
        for node in self.graph.nodes:
            self.info[node] = self._visit(node)
        return self._finish()

    # --- groups -------------------------------------------------------------------------------
    def _find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
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

    def _fix(self, layout: object, reason: str) -> set[int]:
        """Make every group in ``layout`` unprunable; return their ids."""
        segments = layout.segments if isinstance(layout, Layout) else ()
        gids = {self._find(s.gid) for s in segments if s.gid is not None}
        for gid in gids:
            self.groups[gid].reasons.append(reason)
        return gids

    def _unify(self, a: Layout | None, b: Layout | None, reason: str) -> None:
        """Declare that ``a`` and ``b`` hold the same channels, position by position."""
        if a is None or b is None or a.structure() != b.structure():
            self._fix(a, reason)
            self._fix(b, reason)
            return
        for sa, sb in zip(a.segments, b.segments):
            if sa.gid is not None and sb.gid is not None:
                self._union(sa.gid, sb.gid)
            elif sa.gid is not None or sb.gid is not None:
                self._fix(Layout(a.axis, (sa, sb)), reason)

    def _not_understood(self, node: Node, detail: str = "", sources: list[Node] | None = None) -> None:
        """Pin every group that reaches ``node`` (or ``sources``) and remember it for the warning."""
        where = f" in {node.module}" if node.module else ""
        what = f"node '{node.name}' ({node.op}{where}){': ' + detail if detail else ''}"
        gids: set[int] = set()
        for source in node.tensor_args() if sources is None else sources:
            info = self.info.get(source)
            for layout in info if isinstance(info, list) else (info,):
                gids |= self._fix(layout, f"used by {what}, which channel pruning does not understand")
        if gids:
            self.not_understood.append((what, gids))

    def _attach(self, tensor: str, axis: int, layout: Layout, multiplier: int = 1) -> tuple[Segment, ...]:
        """Make axis ``axis`` of stored tensor ``tensor`` a member of every group in ``layout``.

        Returns the segments of a result with ``multiplier`` positions per position of ``layout``.
        A stored axis met twice (a module called twice, tied weights) ties the two layouts.
        """
        seen = self.stored_axes.get((tensor, axis))
        if seen is not None:
            self._unify(seen[0], layout, f"'{tensor}' meets different channels in two places")
            return tuple(s._replace(width=s.width * seen[1]) for s in seen[0].segments)
        self.stored_axes[tensor, axis] = (layout, multiplier)
        module, _, attribute = tensor.rpartition(".")
        segments, offset = [], 0
        for segment in layout.segments:
            width = segment.width * multiplier
            if segment.gid is not None:
                member = ChannelMember(module, attribute, axis, offset, width)
                self.groups[self._find(segment.gid)].members.append(member)
            segments.append(segment._replace(width=width))
            offset += segment.count * width
        return tuple(segments)

    def _new_group(self, num_channels: int, axis: int, producers: list[str], blocks: int = 1) -> Layout:
        gid = len(self.parent)
        self.parent[gid] = gid
        self.groups[gid] = _Group(num_channels, producers, [], blocks)
        return Layout(axis, (Segment(gid, num_channels),))

    def _produce(self, weight: str, num_channels: int, axis: int, blocks: int = 1, weight_axis: int = 0) -> Layout:
        """The layout of the output channels of a conv or Linear with this weight (rows: weight axis 0;
        axis 1 for a ``Conv1D``)."""
        seen = self.stored_axes.get((weight, weight_axis))
        if seen is not None:
            return seen[0].shifted(axis)
        layout = self._new_group(num_channels, axis, [weight.rpartition(".")[0]], blocks)
        self._attach(weight, weight_axis, layout)
        return layout

    def _as_layout(self, value: Node, axis: int) -> Layout | None:
        """The channels of a tensor computed from stored tensors (embeddings, a position table) along
        ``axis``, as a group of their own that no layer produces: it joins the group of the
        feature map it meets, or stays out of the result. A source of size 1 there (broadcast: a
        statistic over the channels, as in an RMSNorm of embeddings) holds none of them; None when
        no source maps ``axis``, or one mixes it.
        """
        info = self.info.get(value)
        if isinstance(info, Layout):
            return info if info.axis == axis else None
        if not isinstance(info, Stored):
            return None
        holders = [(name, axes[axis]) for name, axes in info.sources if axes[axis] is not None]
        if not holders or any(stored_axis == OPAQUE for _, stored_axis in holders):
            return None
        layout = self._new_group(value.shape[axis], axis, [])
        for name, stored_axis in holders:
            self._attach(name, stored_axis, layout)
        self.info[value] = layout
        return layout

    # --- traversal ----------------------------------------------------------------------------
    def _layout(self, value: object) -> Layout | None:
        info = self.info.get(value) if isinstance(value, Node) else None
        return info if isinstance(info, Layout) else None

    def _visit(self, node: Node) -> object:
        if node.kind in ("parameter", "buffer", "constant"):
            return Stored(((node.target, tuple(range(len(node.shape or ())))),))
        if node.kind == "input":
            return None
        if node.kind == "output":
            for source in node.tensor_args():
                self._fix(self._layout(source), _FEEDS_OUTPUT)
            return None
        op = node.op
        if op == "getitem":
            info = self.info.get(node.args[0])
            return info[node.args[1]] if isinstance(info, list) and node.args[1] < len(info) else None
        if op in SHAPE_ONLY:
            return None
        tracked = [source for source in node.tensor_args() if self.info.get(source) is not None]
        if any(_folded(self.info[source]) for source in tracked) and not (op in _MOVING or op in UNARY):
            return self._unsupported(node, "it reads channels folded together with the axes before them")
        if op in CONVS:
            return self._conv(node)
        if op in TRANSPOSED_CONVS:
            return self._transposed_conv(node)
        if op == "linear":
            return self._linear(node)
        if op == "addmm" and _is_layer_weight(node.arg(2, "mat2")) and _is_vector(node.arg(0, "self")):
            return self._addmm(node)
        weight = transposed_parameter(node.args[1]) if op in ("matmul", "mm") and len(node.args) > 1 else None
        if weight is not None and weight.owner[1] == "weight":
            return self._written_out_linear(node, weight.target)
        if not tracked:
            return None
        if op in BROADCAST or op in UNARY:
            return self._broadcast(node)
        if op in BATCH_NORMS:
            return self._channel_norm(node, (1, 2, 3, 4), axis=1)
        if op in ("group_norm", "native_group_norm"):
            return self._group_norm(node)
        if op in LAST_AXIS_NORMS:
            return self._last_axis_norm(node)
        if op in ("prelu", "_prelu_kernel"):
            return self._channel_norm(node, (1,), axis=1)
        if op == "embedding":
            return self._embedding(node)
        if op == "glu":
            return self._glu(node)
        return self._shape_op(node)

    def _shape_op(self, node: Node) -> object:
        """Operators that move, keep or drop axes: views, permutations, pooling, reductions, cat."""
        op, source = node.op, node.args[0] if node.args else None
        info = self.info.get(source) if isinstance(source, Node) else None
        if op in ("cat", "concat", "concatenate", "stack"):
            return self._cat(node)
        if isinstance(info, list) or not isinstance(source, Node) or source.shape is None:
            return self._unsupported(node)
        if op in SPATIAL or op in ("pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d"):
            return self._spatial(node, info)
        if op in SPLIT:
            return self._split(node, info)
        if op in ARG_REDUCE and node.arg(1, "dim") is not None:
            return self._extremum(node, info)
        if op not in AXIS_OPS or (op == "index" and isinstance(info, Stored)):  # a parameter's rows picked
            return self._unsupported(node)
        if info is None:  # the channels are in another argument: the indices, or the shape of expand_as
            return self._unsupported(node, "its shape or indices come from the channels")
        axes = axis_map(node, source)
        if axes is None:
            return self._unsupported(node, "it splits, merges or picks from the channel axis")
        if isinstance(info, Stored):
            return info.remap(axes)
        new_axis = axes.index(info.axis) if info.axis in axes else None
        if new_axis is not None:
            return info.shifted(new_axis)
        if op in RESHAPE:
            return self._reshaped(node, info)
        if op in REDUCE:
            # a statistic of the channels (an RMSNorm's mean square, ConvNeXt-V2's mean response):
            # its shape does not depend on how many there are, so the groups stay prunable, as
            # through a LayerNorm (it then covers the kept ones), and it carries none on
            return None
        if op in ALONG_AXIS:
            return self._unsupported(node, "it mixes the channels (an operation along the channel axis)")
        return self._unsupported(node, "it splits, merges or picks from the channel axis")

    def _extremum(self, node: Node, info: object) -> list[Layout | None] | None:
        """``max``/``min`` over a ``dim``: the values and their positions along it.

        Over another axis (Hiera's pooling of query tokens) the values keep the channels; over the
        channel axis the positions name channels, which pins them.
        """
        source = node.args[0]
        dim = node.arg(1, "dim") % len(source.shape)
        if not isinstance(info, Layout) or dim == info.axis:
            return self._unsupported(node, "it gives the positions of an extremum over the channel axis")
        kept = node.arg(2, "keepdim", False) or info.axis < dim
        return [info.shifted(info.axis if kept else info.axis - 1), None]

    def _reshaped(self, node: Node, layout: Layout) -> Layout | None:
        """The channel axis through a reshape that does not keep it whole.

        In the flat order of the elements, the channels are a digit: ``count`` channels of
        ``width`` positions each, ``stride`` elements apart (``stride`` the size of the axes after
        the channel axis). Where one output axis holds that digit whole, the channels are on that
        axis, each ``width`` positions of it: a flatten into a Linear (the channels at its head,
        each ``H*W`` positions), or MobileViT's unfolding into patches (merged with the batch in
        front too: :attr:`Layout.outer`) and its reshape back. Channels of several widths (a
        concatenation flattened) follow only a reshape that keeps the whole axis in one.
        """
        in_shape, out_shape = node.args[0].shape, node.shape
        stride = math.prod(in_shape[layout.axis + 1 :])
        widths = {segment.width for segment in layout.segments}
        digit = len(widths) == 1  # else the whole axis, its segments and its outer repeats as they are
        low = stride * widths.pop() if digit else stride
        high = low * sum(segment.count for segment in layout.segments) if digit else stride * in_shape[layout.axis]
        for axis in range(len(out_shape)):
            inner = math.prod(out_shape[axis + 1 :])
            top = inner * out_shape[axis]
            if low % inner or top % high:
                continue
            if digit:
                return Layout(axis, tuple(s._replace(width=low // inner) for s in layout.segments), top // high)
            segments = tuple(s._replace(width=s.width * low // inner) for s in layout.segments)
            return Layout(axis, segments, layout.outer * top // high)
        return self._unsupported(node, "a reshape that splits or merges the channel axis")

    def _unsupported(self, node: Node, detail: str = "an operator it has no rule for") -> None:
        self._not_understood(node, detail)
        return None

    # --- layers -------------------------------------------------------------------------------
    def _weight(self, node: Node) -> str | None:
        """The name of the layer weight a conv or Linear reads directly; None (and the groups of
        its input pinned) when the weight is another parameter or computed from one."""
        weight = node.arg(1, "weight")
        if _is_layer_weight(weight):
            return weight.target
        if isinstance(weight, Node) and weight.kind == "parameter":
            self._unsupported(node, f"its weight is '{weight.target}', not a layer's own 'weight'")
        else:
            self._unsupported(node, "its weight is computed, not a layer's own 'weight' parameter")
        return None

    def _bias(self, node: Node, index: int, layout: Layout) -> None:
        bias = node.arg(index, "bias")
        if isinstance(bias, Node) and bias.kind in ("parameter", "buffer"):
            self._attach(bias.target, 0, layout)

    def _conv(self, node: Node) -> Layout | None:
        if node.op in ("convolution", "_convolution"):
            if node.arg(6, "transposed"):
                return self._unsupported(node, "a transposed convolution")
            groups = node.arg(8, "groups", 1)
        else:
            groups = node.arg(6, "groups", 1)
        weight, source = self._weight(node), node.args[0]
        layout = self._layout(source)
        if weight is None:
            return None
        in_channels = source.shape[1]
        if groups > 1 and groups == in_channels:  # depthwise: shrinks in step, passes channels on
            if layout is None:
                return None
            if layout.axis != 1:
                return self._unsupported(node, "a depthwise conv over a non-channel axis")
            multiplier = node.shape[1] // in_channels
            segments = self._attach(weight, 0, layout, multiplier)
            out = Layout(1, segments)
            self._bias(node, 2, out)
            return out
        self._consume(node, weight, layout, axis=1, blocks=groups)
        out = self._produce(weight, node.shape[1], axis=1, blocks=groups)
        self._bias(node, 2, out)
        return out

    def _transposed_conv(self, node: Node) -> Layout | None:
        """A transposed conv reads its input channels with weight axis 0; its output channels
        (weight axis 1) are not pruned: they form a group of their own that stays whole."""
        weight, groups = self._weight(node), node.arg(6, "groups", 1)
        if weight is None:
            return None
        if groups > 1:
            return self._unsupported(node, "a grouped transposed convolution")
        layout = self._layout(node.args[0]) or self._as_layout(node.args[0], 1)
        if layout is not None and layout.axis != 1:
            return self._unsupported(node, f"channels arrive on axis {layout.axis}, the layer reads axis 1")
        if layout is not None:
            self._attach(weight, 0, layout)
        out = self._new_group(node.shape[1], 1, [weight.rpartition(".")[0]])
        self._fix(out, "a transposed convolution's output channels are not pruned")
        self._attach(weight, 1, out)
        self._bias(node, 2, out)
        return out

    def _linear(self, node: Node) -> Layout | None:
        weight, source = self._weight(node), node.args[0]
        if weight is None:
            return None
        self._consume(node, weight, self._layout(source), axis=len(source.shape) - 1)
        out = self._produce(weight, node.shape[-1], axis=len(node.shape) - 1)
        self._bias(node, 2, out)
        return out

    def _written_out_linear(self, node: Node, weight: str) -> Layout:
        """``x @ W.T`` with a layer's own ``weight``: a Linear written out (Falcon's ``FalconLinear``);
        its bias, added after, joins the output's group as a parameter the channels meet."""
        source = node.args[0]
        self._consume(node, weight, self._layout(source), axis=len(source.shape) - 1)
        return self._produce(weight, node.shape[-1], axis=len(node.shape) - 1)

    def _addmm(self, node: Node) -> Layout | None:
        """``addmm(bias, x, weight)`` with a layer's own weight ``(inputs, outputs)`` and a vector bias:
        GPT-2's ``Conv1D`` (the rows of its weight read the channels of ``x``, its columns make the output's)."""
        weight, source = node.arg(2, "mat2").target, node.args[1]
        self._consume(node, weight, self._layout(source), axis=1, weight_axis=0, source=source)
        out = self._produce(weight, node.shape[1], axis=1, weight_axis=1)
        self._bias(node, 0, out)
        return out

    def _consume(
        self,
        node: Node,
        weight: str,
        layout: Layout | None,
        axis: int,
        blocks: int = 1,
        weight_axis: int = 1,
        source: Node | None = None,
    ) -> None:
        """Record a layer's input columns (weight axis 1; axis 0 for a ``Conv1D``) as members of the
        groups in ``layout``, the channels of its input ``source`` (default: its first argument).

        A grouped conv (``blocks`` = its groups) reads each block of in_channels/G channels with its
        own filters, so its input group is pruned per block (the same count in each).
        """
        if layout is None:
            layout = self._as_layout(node.args[0] if source is None else source, axis)
            if layout is None:
                return
        if layout.axis != axis:
            self._not_understood(node, f"channels arrive on axis {layout.axis}, the layer reads axis {axis}")
            return
        tracked = [s.gid for s in layout.segments if s.gid is not None]
        if blocks > 1 and tracked:
            if len(layout.segments) != 1 or layout.segments[0].width != 1:
                self._not_understood(node, "a grouped conv over concatenated or flattened channels")
                return
            group = self.groups[self._find(tracked[0])]
            group.blocks = math.lcm(group.blocks, blocks)
        self._attach(weight, weight_axis, layout)

    def _channel_norm(self, node: Node, stored_args: tuple[int, ...], axis: int) -> Layout | None:
        """An operator with per-channel parameters on ``axis`` (batch norm, PReLU)."""
        layout = self._layout(node.args[0])
        if layout is None:
            return self._unsupported(node) if self.info.get(node.args[0]) is not None else None
        if layout.axis != axis:
            return self._unsupported(node, f"per-channel parameters on axis {axis}, channels on {layout.axis}")
        for index in stored_args:
            value = node.args[index] if len(node.args) > index else None
            if isinstance(value, Node) and value.kind in ("parameter", "buffer") and value.shape[0] > 1:
                self._attach(value.target, 0, layout)
        return [layout, None, None] if node.op.startswith(("_native", "native")) else layout

    def _group_norm(self, node: Node) -> Layout | None:
        layout = self._layout(node.args[0])
        groups = node.arg(1, "num_groups") if node.op == "group_norm" else node.arg(6, "group")
        if layout is not None and (len(layout.segments) != 1 or layout.segments[0].width != 1):
            return self._unsupported(node, "a group norm over concatenated or flattened channels")
        if layout is not None and layout.axis == 1 and layout.segments[0].gid is not None:
            group = self.groups[self._find(layout.segments[0].gid)]
            group.blocks = math.lcm(group.blocks, groups)
        index = (2, 3) if node.op == "group_norm" else (1, 2)
        result = self._channel_norm(node, index, axis=1)
        return [result, None, None] if node.op == "native_group_norm" else result

    def _last_axis_norm(self, node: Node) -> object:
        """Layer norm (or RMS norm) over the last ``len(normalized_shape)`` axes.

        Over the channel axis it scales each channel by its own weight: the weight and bias are
        members, and so is the ``normalized_shape`` attribute of the module that runs it (a size,
        not a tensor: the surgery shrinks it where the module has one, as a norm without weights
        passes its size from there). The norm of stored tensors (embeddings) is a stored tensor
        of its own.
        """
        info, ndim = self.info.get(node.args[0]), len(node.args[0].shape)
        normalized = len(node.arg(1, "normalized_shape"))
        weights = [v.target for v in node.args[2:4] if isinstance(v, Node) and v.kind in ("parameter", "buffer")]
        # and the size its module passes (a norm without weights: OLMo's, adaLN's)
        members = weights + ([f"{node.module}.{NORMALIZED_SHAPE}"] if node.module else [])
        result = info
        if isinstance(info, Stored):
            if normalized != 1 or any(axes[-1] in (None, OPAQUE) for _, axes in info.sources):
                result = None
            else:
                result = Stored(info.sources + tuple((name, (None,) * (ndim - 1) + (0,)) for name in members))
        elif not isinstance(info, Layout):
            return self._unsupported(node)
        elif info.axis >= ndim - normalized:
            if normalized != 1:
                return self._unsupported(node, "a norm over the channel axis and others")
            for name in members:
                self._attach(name, 0, info)
        return [result, None, None] if node.op == "native_layer_norm" else result

    def _embedding(self, node: Node) -> Stored | None:
        """Rows of a table picked by index: the last axis is the table's axis 1."""
        weight, indices = node.args[0], node.args[1]
        if not isinstance(weight, Node) or not isinstance(self.info.get(weight), Stored):
            return None
        axes = [OPAQUE] * len(indices.shape) + [1]
        return Stored(((weight.target, tuple(axes)),))

    # --- elementwise, broadcasting ------------------------------------------------------------
    def _broadcast(self, node: Node) -> object:
        """Elementwise over broadcast operands: channels on one output axis, merged across operands."""
        out = node.shape
        operands = [v for v in node.tensor_args() if v.shape is not None]
        if out is None:
            return self._unsupported(node)
        if node.op in UNARY:
            operands = operands[:1]
        channel_axes = {}
        for value in operands:
            layout = self._layout(value)
            if layout is not None:
                axis = layout.axis + len(out) - len(value.shape)
                if value.shape[layout.axis] == out[axis]:
                    channel_axes.setdefault(axis, []).append(layout)
        if len(channel_axes) > 1:
            return self._unsupported(node, "channels on different axes of one elementwise operation")
        if not channel_axes:
            return self._stored_elementwise(node, operands)
        (axis, layouts), = channel_axes.items()
        result = layouts[0].shifted(axis)
        merging = "added to" if node.op in MERGING else "combined with"
        reason = f"{merging} channels that cannot be pruned in '{node.name}'"
        for layout in layouts[1:]:
            self._unify(layouts[0], layout, reason)
        for value in operands:
            pad = len(out) - len(value.shape)
            if self._layout(value) is not None or axis < pad or value.shape[axis - pad] == 1:
                continue
            self._unify(layouts[0], self._as_layout(value, axis - pad), reason)
        return result

    def _stored_elementwise(self, node: Node, operands: list[Node]) -> Stored | None:
        """Elementwise over stored tensors (and scalars) only: the result keeps their axes."""
        out = node.shape
        sources = []
        for value in operands:
            info = self.info.get(value)
            if not isinstance(info, Stored):
                return None
            pad = len(out) - len(value.shape)
            for name, axes in info.sources:
                mapped = [None] * pad + [a if value.shape[i] == out[i + pad] else None for i, a in enumerate(axes)]
                sources.append((name, tuple(mapped)))
        return Stored(tuple(sources))

    # --- axis-moving operators ----------------------------------------------------------------
    def _spatial(self, node: Node, info: object) -> object:
        """Pooling, upsampling, padding: axes 0 and 1 keep their sizes, the others change; or a
        constant pad of other axes than the channel axis, wherever that lies (a channels-last
        ``(B, H, W, C)`` map that Swin pads to whole windows)."""
        source = node.args[0]
        if isinstance(info, Layout) and info.axis == 1 and node.shape is not None:
            if len(node.shape) == len(source.shape) and node.shape[:2] == source.shape[:2]:
                return [info, None] if node.op.endswith("with_indices") or node.op.startswith("adaptive_max") else info
        if isinstance(info, Layout) and node.op in ("pad", "constant_pad_nd"):
            from_last = len(source.shape) - 1 - info.axis  # F.pad's widths run from the last axis
            if not any(node.arg(1, "pad")[2 * from_last : 2 * from_last + 2]):
                return info
        if isinstance(info, Stored):
            return None
        return self._unsupported(node, "it changes the channel axis")

    def _split(self, node: Node, info: object) -> object:
        source = node.args[0]
        dim = node.arg(1 if node.op == "unbind" else 2, "dim", 0) % len(source.shape)
        if isinstance(info, Stored):
            return None
        if info.axis == dim:
            if node.op == "unbind":
                return self._unsupported(node, "it splits the channel axis into single channels")
            return self._split_channels(node, info, split_sizes(node, source.shape[dim]))
        layout = info.shifted(info.axis - (1 if node.op == "unbind" and dim < info.axis else 0))
        parts = source.shape[dim] if node.op == "unbind" else len(split_sizes(node, source.shape[dim]))
        return [layout] * parts

    def _split_channels(self, node: Node, layout: Layout, sizes: list[int]) -> list[Layout] | None:
        """The parts of a split of the channel axis into runs of ``sizes`` positions: each part
        holds the channels of its run; a group that a run boundary cuts is refined first
        (:meth:`_refine`), so that the parts hold whole groups."""
        bounds = list(itertools.accumulate(sizes))[:-1]
        layout = self._refine(node, layout, bounds)
        if layout is None:
            return None
        parts, segments, position = [], list(layout.segments), 0
        for size in sizes:
            part, end = [], position + size
            while segments and position < end:
                segment = segments.pop(0)
                part.append(segment)
                position += segment.count * segment.width
            parts.append(Layout(layout.axis, tuple(part)))
        return parts

    def _glu(self, node: Node) -> Layout | None:
        """``a * sigmoid(b)`` of the two halves of an axis: along the channel axis, channel ``i`` of
        the result is channel ``i`` of each half, so the halves' groups join."""
        layout = self._layout(node.args[0])
        if layout is None:
            return self._unsupported(node)
        dim = node.arg(1, "dim", -1) % len(node.args[0].shape)
        if dim != layout.axis:
            return layout
        half = node.args[0].shape[dim] // 2
        parts = self._split_channels(node, layout, [half, half])
        if parts is None:
            return None
        self._unify(*parts, f"the two halves of the gated linear unit '{node.name}'")
        return parts[0]

    def _refine(self, node: Node, layout: Layout, bounds: list[int]) -> Layout | None:
        """``layout`` with a segment boundary at every position of ``bounds``: a group whose
        channels a bound cuts becomes one group per run of them (its members, weights and all,
        divided likewise), everywhere the analysis holds it. None (the groups pinned) where a bound
        cuts a channel's positions, or a group that grouped convs divide in blocks."""
        segments: list[Segment] = []
        position = 0
        for segment in layout.segments:
            span = segment.count * segment.width
            cuts = [b - position for b in bounds if position < b < position + span]
            position += span
            if not cuts:
                segments.append(segment)
                continue
            root = None if segment.gid is None else self._find(segment.gid)
            if any(cut % segment.width for cut in cuts) or (root is not None and self.groups[root].blocks > 1):
                return self._unsupported(node, "it splits the channel axis inside a channel or a block")
            counts = [b - a for a, b in itertools.pairwise([0, *(cut // segment.width for cut in cuts), segment.count])]
            pieces = [Segment(None, count) for count in counts] if root is None else self._divide(root, counts)
            segments += [piece._replace(width=segment.width) for piece in pieces]
        return Layout(layout.axis, tuple(segments))

    def _pieces(self, gid: int) -> list[int]:
        """The groups that hold group ``gid``'s channels now: itself, or the pieces it was divided into."""
        root = self._find(gid)
        return [p for piece in self.divided[root] for p in self._pieces(piece)] if root in self.divided else [root]

    def _divide(self, root: int, counts: list[int]) -> list[Segment]:
        """Make group ``root`` one group per run of ``counts`` channels, in every layout the
        analysis holds; return the runs' segments."""
        group, pieces, start = self.groups.pop(root), [], 0
        for count in counts:
            piece = self._new_group(count, 0, list(group.producers)).segments[0]
            self.groups[piece.gid].members += [replace(m, offset=m.offset + start * m.width) for m in group.members]
            self.groups[piece.gid].reasons += group.reasons
            pieces.append(piece)
            start += count
        self.divided[root] = [piece.gid for piece in pieces]

        def held(segment: Segment) -> bool:
            return segment.gid is not None and self._find(segment.gid) == root

        def divided(value: object) -> object:
            if isinstance(value, list):
                return [divided(v) for v in value]
            if not isinstance(value, Layout) or not any(map(held, value.segments)):
                return value
            segments = []
            for s in value.segments:
                segments += [p._replace(width=s.width) for p in pieces] if held(s) else [s]
            return value._replace(segments=tuple(segments))

        for node, info in self.info.items():
            self.info[node] = divided(info)
        for key, (layout, multiplier) in self.stored_axes.items():
            self.stored_axes[key] = (divided(layout), multiplier)
        return pieces

    def _cat(self, node: Node) -> Layout | None:
        tensors = list(node.arg(0, "tensors"))
        ndim = len(node.shape)
        dim = node.arg(1, "dim", 0) % ndim
        layouts = [self._layout(t) for t in tensors]
        if all(layout is None for layout in layouts):
            return None
        if node.op == "stack":
            first = next(layout for layout in layouts if layout is not None)
            for layout in layouts:
                self._unify(first, layout, f"stacked with other channels in '{node.name}'")
            return first.shifted(first.axis + (dim <= first.axis))
        if any(layout is not None and layout.axis != dim for layout in layouts):
            # joined along another axis: channels line up across the inputs
            first = next(layout for layout in layouts if layout is not None)
            reason = f"concatenated with other channels in '{node.name}'"
            for tensor, layout in zip(tensors, layouts):
                self._unify(first, layout or self._as_layout(tensor, first.axis), reason)
            return first
        segments: list[Segment] = []
        for tensor, layout in zip(tensors, layouts):
            segments += layout.segments if layout is not None else (Segment(None, tensor.shape[dim]),)
        return Layout(dim, tuple(segments))

    # --- result -------------------------------------------------------------------------------
    def _member_order(self, member: ChannelMember) -> tuple:
        return self.order.get(member.module, len(self.order)), member.tensor, member.axis, member.offset

    def _finish(self) -> list[ChannelGroup]:
        groups = {}
        for gid, group in self.groups.items():
            if not group.producers:
                continue  # channels of stored tensors that no layer's output channels joined
            producers = tuple(sorted(dict.fromkeys(group.producers), key=self.order.__getitem__))
            groups[gid] = ChannelGroup(
                key=producers[0],
                producers=producers,
                num_channels=group.num_channels,
                members=tuple(sorted(set(group.members), key=self._member_order)),
                blocks=group.blocks,
                reason="; ".join(dict.fromkeys(group.reasons)) or None,
            )
        groups = _distinct_keys(groups)
        for what, gids in self.not_understood:
            # a group that feeds the model output stays whole anyway: no warning on its account
            gids = {piece for gid in gids for piece in self._pieces(gid)}
            pinned = {g for g in map(self._find, gids) if g in groups and _FEEDS_OUTPUT not in self.groups[g].reasons}
            keys = [g.key for g in sorted((groups[g] for g in pinned), key=self._group_order)]
            if not keys:
                continue
            warnings.warn(f"channel pruning does not understand {what}; channel groups {keys} stay whole", stacklevel=4)
        return sorted(groups.values(), key=self._group_order)

    def _group_order(self, group: ChannelGroup) -> tuple:
        return self.order[group.producers[0]], group.key


def _distinct_keys(groups: dict[int, ChannelGroup]) -> dict[int, ChannelGroup]:
    """``groups`` with a key of its own for each: the groups of one layer's output channels that a
    split of the channel axis left apart are its parts, ``"fc:0"``, ``"fc:1"``, in the order of its
    weight's rows (numbers, not row ranges: the key must not change when the model is pruned)."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for gid, group in groups.items():
        by_key[group.key].append(gid)
    for key, gids in by_key.items():
        if len(gids) == 1:
            continue

        def first_row(gid: int, key: str = key) -> int:
            return min((m.offset for m in groups[gid].members if (m.module, m.tensor) == (key, "weight")), default=0)

        for part, gid in enumerate(sorted(gids, key=first_row)):
            groups[gid] = replace(groups[gid], key=f"{key}:{part}")
    return groups


#: Why the groups of the model's output stay whole.
_FEEDS_OUTPUT = "feeds the model output"
#: What a folded layout may pass through (:attr:`Layout.outer`): operators that move axes, not reduce them.
_MOVING = AXIS_OPS - REDUCE - ALONG_AXIS


def _folded(info: object) -> bool:
    """Whether ``info`` holds channels folded together with the axes before them (``Layout.outer > 1``)."""
    return isinstance(info, Layout) and info.outer > 1


def _is_layer_weight(value: object) -> bool:
    """Whether ``value`` is a layer's own ``weight`` parameter."""
    return isinstance(value, Node) and value.kind == "parameter" and value.owner[1] == "weight"


def _is_vector(value: object) -> bool:
    """Whether ``value`` is a node of a 1-D tensor."""
    return isinstance(value, Node) and value.shape is not None and len(value.shape) == 1
