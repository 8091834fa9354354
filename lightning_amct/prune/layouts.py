"""How a tensor carries channels, and how ATen operators move, keep or drop its axes.

The vocabulary of the channel analysis (:mod:`lightning_amct.prune.dependency`): a :class:`Layout`
says on which axis a feature map carries which groups' channels; a :class:`Stored` tensor is one
computed from parameters and buffers alone (a layer scale viewed as ``(1, C, 1, 1)``, embeddings)
and says which of their axes each of its axes is; :func:`axis_map` says, for an operator that
moves axes (views, permutations, reductions, slices), which input axis each output axis is. The
operator sets name the ATen operators the analysis reads, by what they do to channels.

Example:
    >>> reshape_axes((2, 8, 4, 4), (2, 8, 16))  # a flatten of the spatial axes keeps axis 1 whole
    [0, 1, -1]
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

from lightning_amct.graph import Node


class Segment(NamedTuple):
    """``count`` channels of group ``gid`` (None: channels no group owns), ``width`` positions each."""

    gid: int | None  # None: channels that no group owns (they are never pruned)
    count: int
    width: int = 1


class Layout(NamedTuple):
    """Where a tensor carries channels: its channel axis and the segments along it.

    ``outer`` > 1: the channel axis holds the segments that many times over (a reshape merged it
    with the axes before it: the batch, in MobileViT's unfolding into patches). Such a tensor is
    *folded*: only a reshape that takes the channels out again (or a transpose, a copy on the way)
    may read it.
    """

    axis: int
    segments: tuple[Segment, ...]
    outer: int = 1

    def structure(self) -> tuple[tuple[int, int], ...]:
        """The segments' sizes: two layouts of the same structure can hold the same channels."""
        return tuple((s.count, s.width) for s in self.segments)

    def shifted(self, axis: int) -> Layout:
        return self._replace(axis=axis)


#: Per axis of a tensor computed from one stored tensor: the stored tensor's axis it is, None when
#: it has size 1 there (broadcast), or OPAQUE when it is neither (gathered rows, a partial slice).
OPAQUE = -1


class Stored(NamedTuple):
    """A tensor computed from stored tensors (parameters, buffers) by views and elementwise ops.

    ``sources`` pairs each stored tensor's name with its axes (see ``OPAQUE``), per axis of this
    tensor. Where it meets channels at full size, each source becomes a group member.
    """

    sources: tuple[tuple[str, tuple[int | None, ...]], ...]

    def remap(self, axes: list[int | None]) -> Stored:
        """New axes from old ones: ``axes[i]`` is the old axis of new axis i (None: a new size-1 axis)."""

        def old_axis(old: tuple[int | None, ...], axis: int | None) -> int | None:
            return axis if axis is None or axis == OPAQUE else old[axis]

        return Stored(tuple((name, tuple(old_axis(old, a) for a in axes)) for name, old in self.sources))


# ATen operators by what they do to the channel axis.
#: Elementwise on their first argument (the others are not data).
UNARY = {
    "relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardtanh",
    "hardtanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "leaky_relu", "leaky_relu_", "elu", "elu_",
    "selu", "selu_", "celu", "celu_", "mish", "mish_", "softplus", "dropout", "dropout_", "feature_dropout",
    "feature_dropout_", "alpha_dropout", "alpha_dropout_", "clone", "contiguous", "to", "_to_copy", "alias", "detach",
    "detach_", "lift_fresh_copy", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "reciprocal", "square", "sin", "cos",
    "erf", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "sign", "type_as",
}  # fmt: skip
#: Elementwise over broadcast tensor arguments.
BROADCAST = {
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "true_divide", "maximum", "minimum", "where",
    "pow", "copy_", "masked_fill", "masked_fill_", "addcmul", "addcdiv", "lerp", "gt", "lt", "ge", "le", "eq", "ne",
    "logical_and", "logical_or", "logical_not", "bitwise_and", "bitwise_or",
}  # fmt: skip
MERGING = {"add", "add_", "sub", "sub_", "rsub", "copy_"}  # the words for the reason of a pinned group
SPATIAL = {
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d",
    "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "_adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "upsample_nearest1d",
    "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d",
    "upsample_trilinear3d", "_upsample_bilinear2d_aa", "_upsample_nearest_exact2d",
}  # fmt: skip
RESHAPE = {"view", "reshape", "view_as", "reshape_as", "_unsafe_view", "flatten", "unflatten", "_reshape_alias"}
REDUCE = {
    "mean", "sum", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "logsumexp", "norm",
    "linalg_vector_norm",
}  # fmt: skip
#: Reductions whose ``dim`` is their third argument, after the order of the norm.
NORM_REDUCE = {"norm", "linalg_vector_norm"}
#: Reductions that give, with a ``dim``, the positions of their values too (the channel an extremum is in).
ARG_REDUCE = {"max", "min"}
ALONG_AXIS = {"softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod"}
SPLIT = {"split", "split_with_sizes", "chunk", "unbind", "tensor_split"}
AXIS_OPS = {
    "permute", "transpose", "swapaxes", "t", "mT", "mH", "adjoint", "unsqueeze", "squeeze", "select", "slice",
    "expand", "expand_as", "index",
    *REDUCE, *ALONG_AXIS, *RESHAPE,
}  # fmt: skip
CONVS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
TRANSPOSED_CONVS = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
BATCH_NORMS = {
    "batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
    "instance_norm", "_batch_norm_impl_index",
}  # fmt: skip
LAST_AXIS_NORMS = {"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"}
#: The attribute of a norm module that holds the size it normalizes (a member of the group it reads).
NORMALIZED_SHAPE = "normalized_shape"
SHAPE_ONLY = {"_assert_tensor_metadata", "sym_size", "sym_numel", "sym_stride", "_assert_scalar", "zeros_like",
               "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty", "new_full"}  # fmt: skip


def axis_map(node: Node, source: Node) -> list[int | None] | None:
    """For each output axis, the input axis it is (None: new, size 1); None when not a plain map.

    An input axis that a reduction, a partial slice or an index removes is absent, so a
    tensor whose channel axis is absent is not understood by the caller.
    """
    op, ndim, shape = node.op, len(source.shape), source.shape
    out = node.shape
    if out is None:
        return None
    if op in ("expand", "expand_as"):
        pad = len(out) - ndim
        return [None] * pad + [a if shape[a] == out[a + pad] else None for a in range(ndim)]
    if op == "permute":
        return [d % ndim for d in node.arg(1, "dims")]
    if op in ("transpose", "swapaxes", "t", "mT", "mH", "adjoint"):
        if op in ("t", "mT", "mH", "adjoint"):
            a, b = (0, 1) if op == "t" else (ndim - 2, ndim - 1)
        else:
            a, b = node.arg(1, "dim0") % ndim, node.arg(2, "dim1") % ndim
        order = list(range(ndim))
        order[a], order[b] = b, a
        return order
    if op == "unsqueeze":
        dim = node.arg(1, "dim") % (ndim + 1)
        return [*range(dim), None, *range(dim, ndim)]
    if op == "squeeze":
        dims = node.arg(1, "dim", None)
        dims = range(ndim) if dims is None else [dims] if isinstance(dims, int) else dims
        gone = {d % ndim for d in dims if shape[d % ndim] == 1}
        return [a for a in range(ndim) if a not in gone]
    if op == "select":
        dim = node.arg(1, "dim") % ndim
        return [a for a in range(ndim) if a != dim]
    if op == "slice":
        dim = node.arg(1, "dim", 0) % ndim
        return [a if a != dim or out[a] == shape[a] else OPAQUE for a in range(ndim)]
    if op in REDUCE or op in ALONG_AXIS:
        return _reduced_axes(node, ndim)
    if op in RESHAPE:
        return reshape_axes(shape, out)
    if op == "index":
        return _indexed_axes(node, shape, out)
    return None


def _indexed_axes(node: Node, shape: tuple[int, ...], out: tuple[int, ...]) -> list[int | None] | None:
    """:func:`axis_map` of advanced indexing ``t[i, j]`` (``aten.index``), or None where the
    result's shape does not follow from it (a boolean mask over several axes).

    The indexed axes give way to the index tensors' broadcast axes: in their place where they are
    adjacent, first otherwise (numpy's rule); the other axes keep their sizes. A sequence
    classifier picks each sequence's last token this way: ``logits[arange(B), lengths]``.
    """
    indices = node.arg(1, "indices")
    indexed = [axis for axis, index in enumerate(indices) if index is not None]
    if not indexed or not all(isinstance(indices[axis], Node) and indices[axis].shape is not None for axis in indexed):
        return None
    broadcast = [None] * max(len(indices[axis].shape) for axis in indexed)
    kept = [axis for axis in range(len(shape)) if axis not in indexed]
    if indexed == list(range(indexed[0], indexed[-1] + 1)):
        axes = [*range(indexed[0]), *broadcast, *range(indexed[-1] + 1, len(shape))]
    else:
        axes = [*broadcast, *kept]
    if len(axes) != len(out) or any(a is not None and shape[a] != size for a, size in zip(axes, out)):
        return None
    return axes


def _reduced_axes(node: Node, ndim: int) -> list[int | None] | None:
    dims = node.arg(2, "dim") if node.op in NORM_REDUCE else node.arg(1, "dim")
    if node.op in ALONG_AXIS:
        return [OPAQUE if a == dims % ndim else a for a in range(ndim)]  # the axis stays, mixed
    if dims is None or dims == []:
        return [] if len(node.shape or ()) == 0 else None
    dims = {d % ndim for d in ((dims,) if isinstance(dims, int) else dims)}
    if len(node.shape) == ndim:  # keepdim
        return [None if a in dims else a for a in range(ndim)]
    return [a for a in range(ndim) if a not in dims]


def split_sizes(node: Node, size: int) -> list[int]:
    """The sizes of the results of a ``split``/``split_with_sizes``/``chunk``/``tensor_split`` of
    an axis of ``size``, in order.

    Example:
        >>> from types import SimpleNamespace
        >>> chunk = SimpleNamespace(op="chunk", arg=lambda index, name, default=None: 3)
        >>> split_sizes(chunk, 8)
        [3, 3, 2]
    """
    if node.op == "split_with_sizes":
        return list(node.arg(1, "split_sizes"))
    if node.op == "tensor_split":
        sections = node.arg(1, "sections")
        if isinstance(sections, int):
            return [size // sections + (part < size % sections) for part in range(sections)]
        bounds = [0, *(min(max(i, 0), size) for i in sections), size]
        return [b - a for a, b in itertools.pairwise(bounds)]
    step = math.ceil(size / node.arg(1, "chunks")) if node.op == "chunk" else node.arg(1, "split_size")
    if isinstance(step, (list, tuple)):  # split with a list of sizes
        return list(step)
    return [min(step, size - start) for start in range(0, size, step)]


def reshape_axes(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[int | None]:
    """For a reshape: the input axis each output axis is whole (same size, same elements before
    it), ``OPAQUE`` for an output axis made of parts of input axes, None for a new size-1 axis."""
    axes: list[int | None] = []
    for axis, size in enumerate(out_shape):
        before = math.prod(out_shape[:axis])
        match = [
            a for a in range(len(in_shape)) if in_shape[a] == size and math.prod(in_shape[:a]) == before and size != 1
        ]
        axes.append(match[0] if match else (None if size == 1 else OPAQUE))
    return axes
