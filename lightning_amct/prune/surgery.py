"""Physical channel pruning: slice every member of the chosen groups, once, and check the result.

:func:`prune_model` is the one-shot BCP step that runs before fine-tuning: it finds the channel
groups, picks the kept channels (:mod:`lightning_amct.prune.bcp`), and replaces each touched
weight, bias and BatchNorm statistic with a smaller tensor in the **same** module object (so
module names, hooks and the plan stay valid; create the optimizer afterwards). The model then runs
once on ``example_inputs``; a group whose slicing breaks that forward is put back whole, with a
warning. A tensor that several modules hold (an output layer tied to the embedding table) is
sliced once, and every holder takes the new one: the tie holds.

The result's ``kept`` (group key to kept indices, plain ints) is the structure record: a
checkpoint stores it, and :func:`apply_kept_channels` rebuilds exactly that structure on a fresh,
unpruned copy of the model before its state_dict is loaded (on resume, or in a loader). Both
functions are deterministic, so every DDP rank holding the same weights gets the same result.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_amct.plan.specs import PruneSpec
    >>> model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 8, 1))
    >>> result = prune_model(model, {"0": PruneSpec("filter", 0.5, False)}, torch.zeros(1, 3, 8, 8))
    >>> len(result.kept["0"]), model[0].out_channels, model[1].num_features, model[3].in_channels
    (16, 16, 16, 16)
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_amct.graph import as_input_tuple
from lightning_amct.plan.layers import is_conv1d, supported_base, weight_axes
from lightning_amct.plan.specs import PruneSpec
from lightning_amct.prune.bcp import ASCEND_CHANNEL_TILE, choose_kept_channels, group_settings, keep_count, kept_counts
from lightning_amct.prune.dependency import ChannelGroup, find_channel_groups
from lightning_amct.prune.report import compare_stats, model_stats

_SHAPE_ATTRS = (
    "out_channels", "out_features", "num_features", "num_parameters", "num_channels", "in_channels", "in_features",
    "groups", "normalized_shape", "embedding_dim", "nf", "nx",
)  # fmt: skip


@dataclass
class PruneResult:
    """What channel pruning did.

    Attributes:
        kept: group key -> kept channel indices (ascending plain ints) of every pruned group: the
            structure record for :func:`apply_kept_channels`.
        groups: the channel groups of the model before pruning.
        report: per-layer rows of :func:`lightning_amct.prune.report.compare_stats`.
        skipped: layer planned for filter pruning -> why it kept all its channels.
    """

    kept: dict[str, list[int]]
    groups: list[ChannelGroup]
    report: list[dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)

    def kept_rows(self, model: nn.Module) -> dict[str, list[int]]:
        """Layer -> the output channels it kept, numbered as before pruning, for every conv and
        Linear whose output channels a pruned group holds (the record's per-layer lists).

        A layer whose output channels a split of the channel axis divided holds its groups from
        an offset, or one group twice (the two halves of a gated unit): its kept rows are those of
        each.
        """
        rows: dict[str, list[int]] = defaultdict(list)
        for group in self.groups:
            if group.key not in self.kept:
                continue
            channels = torch.tensor(self.kept[group.key], dtype=torch.long)
            for member in group.members:
                module = model.get_submodule(member.module)
                if supported_base(module) is None or member.tensor != "weight" or member.width != 1:
                    continue
                if member.axis == weight_axes(module)[0]:
                    rows[member.module] += member.positions(channels).tolist()
        return {layer: sorted(kept) for layer, kept in rows.items()}


def prune_model(model: nn.Module, specs: Mapping[str, PruneSpec], example_inputs: object) -> PruneResult:
    """Prune the output channels of the planned producers in place (BCP).

    Call it once, before training and before the optimizer is created.

    Args:
        model: the unpruned model.
        specs: layer name -> PruneSpec; only ``kind == "filter"`` entries matter. A group is pruned
            when all its producers are planned (see :func:`lightning_amct.prune.bcp.group_settings`).
        example_inputs: a tensor or tuple of tensors the model accepts.

    Returns:
        A :class:`PruneResult`; store ``result.kept`` to rebuild the structure later.
    """
    groups = find_channel_groups(model, example_inputs)
    before = model_stats(model, example_inputs)
    kept, broken = _slice_checked(model, groups, choose_kept_channels(model, groups, specs), example_inputs)
    report = compare_stats(before, model_stats(model, example_inputs))
    return PruneResult(kept, groups, report, _skipped(groups, specs, kept, broken, tied_weights(model)))


def apply_kept_channels(model: nn.Module, kept: Mapping[str, list[int]], example_inputs: object) -> PruneResult:
    """Rebuild the structure that ``kept`` records on a fresh, unpruned copy of the model.

    Use it where a checkpoint of a pruned model must be loaded: first this, then
    ``load_state_dict``. The kept channels are taken as given (weights are not scored again).

    Raises:
        ValueError: ``kept`` does not fit this model (unknown or unprunable group, bad indices).
        RuntimeError: the rebuilt model does not run on ``example_inputs``.
    """
    groups = find_channel_groups(model, example_inputs)
    by_key = {group.key: group for group in groups}
    record = {key: _validated(by_key, key, channels) for key, channels in kept.items()}
    before = model_stats(model, example_inputs)
    sliced = _slice_groups(model, by_key, record)
    error = _forward_error(model, example_inputs)
    if error is not None:
        sliced.restore()
        raise RuntimeError(f"the model does not run with the recorded channels: {error}")
    return PruneResult(record, groups, compare_stats(before, model_stats(model, example_inputs)))


def layers_kept_whole(
    groups: list[ChannelGroup], specs: Mapping[str, PruneSpec], tied: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The layers ``specs`` plan for filter pruning that will keep all their channels, and why.

    Decided from the model's channel groups (and its :func:`tied_weights`) alone, without slicing
    anything (a group whose slicing breaks the forward pass is found only by :func:`prune_model`):
    the plan uses it to show only the layers that really lose channels, e.g. not a classifier
    whose outputs are the model's outputs.
    """
    return _skipped(groups, specs, kept_counts(groups, specs), {}, tied or {})


def tied_weights(model: nn.Module) -> dict[str, str]:
    """Each layer whose ``weight`` Parameter an earlier module holds too (tied weights, as GPT-2's
    ``lm_head`` and its token embedding), and that module: the captured graph knows the
    Parameter by the earlier module's name alone.

    Example:
        >>> embedding, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        >>> head.weight = embedding.weight
        >>> tied_weights(nn.ModuleDict({"embed": embedding, "head": head}))
        {'head': 'embed'}
    """
    holders: dict[int, str] = {}
    tied = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            first = holders.setdefault(id(weight), name)
            if first != name:
                tied[name] = first
    return tied


def _validated(by_key: Mapping[str, ChannelGroup], key: str, channels: list[int]) -> list[int]:
    group = by_key.get(key)
    if group is None:
        raise ValueError(f"kept channels name group '{key}', which this model lacks; its groups: {sorted(by_key)}")
    if not group.prunable:
        raise ValueError(f"group '{key}' cannot be pruned in this model: {group.reason}")
    channels = [int(c) for c in channels]
    per_block = group.num_channels // group.blocks
    counts = [sum(c // per_block == b for c in channels) for b in range(group.blocks)]
    if channels != sorted(set(channels)) or not all(0 <= c < group.num_channels for c in channels):
        raise ValueError(f"group '{key}': kept channels must be unique, ascending, in [0, {group.num_channels})")
    if not channels or len(set(counts)) != 1:
        raise ValueError(f"group '{key}': each of its {group.blocks} blocks must keep the same, non-zero count")
    return channels


class _Saved:
    """The original tensors and shape attributes of sliced modules, to put a failed slicing back."""

    def __init__(self) -> None:
        self.entries: list[tuple[nn.Module, dict, dict, dict]] = []

    def save(self, module: nn.Module) -> None:
        attrs = {a: getattr(module, a) for a in _SHAPE_ATTRS if hasattr(module, a)}
        self.entries.append((module, dict(module._parameters), dict(module._buffers), attrs))

    def restore(self) -> None:
        # latest first: a module saved twice (it holds a tied tensor too) ends as first saved
        for module, params, buffers, attrs in reversed(self.entries):
            module._parameters.update(params)
            module._buffers.update(buffers)
            for name, value in attrs.items():
                setattr(module, name, value)


def _slice_groups(model: nn.Module, by_key: Mapping[str, ChannelGroup], kept: Mapping[str, list[int]]) -> _Saved:
    """Slice every member of the groups in ``kept``: all groups' cuts to one module in one go."""
    removed: dict[str, dict[tuple[str, int], set[int]]] = defaultdict(lambda: defaultdict(set))
    for key, channels in kept.items():
        group = by_key[key]
        pruned = torch.tensor(sorted(set(range(group.num_channels)) - set(channels)), dtype=torch.long)
        for member in group.members:
            removed[member.module][member.tensor, member.axis].update(member.positions(pruned).tolist())
    holders = _holders(model)
    saved = _Saved()
    for name, cuts in removed.items():
        module = model.get_submodule(name)
        saved.save(module)
        for tensor_name, (old, new) in _slice_module(module, cuts).items():
            # a tied tensor (an output layer sharing the embedding's table): the graph names it
            # once, and every module holding it takes the sliced one, so the tie holds
            for other, other_name in holders.get(id(old), ()):
                if (other, other_name) != (module, tensor_name):
                    saved.save(other)
                    _set_attributes(other, {other_name: new})
    return saved


def _holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every module's own parameters and buffers, by tensor object: ``id -> [(module, name)]``."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for registry in (module._parameters, module._buffers):
            for name, tensor in registry.items():
                if tensor is not None:
                    holders.setdefault(id(tensor), []).append((module, name))
    return holders


def _remaining(size: int, removed: set[int]) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[sorted(removed)] = False
    return keep.nonzero().flatten()


@torch.no_grad()
def _slice_module(module: nn.Module, cuts: Mapping[tuple[str, int], set[int]]) -> dict[str, tuple[object, object]]:
    """Remove positions ``cuts[(tensor, axis)]`` of the module's tensors; update its sizes.

    Returns each sliced attribute's name with its old and its new value.
    """
    originals: dict[str, object] = {}
    current: dict[str, object] = {}
    for (name, axis), positions in cuts.items():
        if not hasattr(module, name):  # a norm's size that its module does not hold
            continue
        tensor = current.get(name, getattr(module, name))
        originals.setdefault(name, tensor)
        if not isinstance(tensor, torch.Tensor):
            current[name] = _shrunk(tensor, axis, len(positions))
            continue
        if _is_grouped_input(module, name, axis):
            new = _input_columns(tensor, module.groups, _remaining(module.in_channels, positions))
        else:
            new = tensor.index_select(axis, _remaining(tensor.shape[axis], positions).to(tensor.device))
        current[name] = _like(tensor, new)
    _set_attributes(module, current)
    return {name: (originals[name], new) for name, new in current.items()}


def _shrunk(size: Any, axis: int, count: int) -> Any:
    """A size attribute (``normalized_shape``: an int, or a tuple of them) with ``count`` fewer at ``axis``;
    anything else as it is (the surgery's trial run then finds whether the module still fits)."""
    if isinstance(size, int):
        return size - count
    if isinstance(size, (tuple, list)) and axis < len(size) and isinstance(size[axis], int):
        return type(size)((*size[:axis], size[axis] - count, *size[axis + 1 :]))
    return size


def _set_attributes(module: nn.Module, values: Mapping[str, object]) -> None:
    """Put ``values`` (sliced tensors, a shrunk ``normalized_shape``) in the module by attribute name
    and update its sizes from them."""
    old = {attr: getattr(module, attr) for attr in _SHAPE_ATTRS if hasattr(module, attr)}
    conv1d = is_conv1d(module)  # decided before slicing: it reads the sizes against the weight
    for name, value in values.items():
        setattr(module, name, value)
    _refresh_sizes(module, old, conv1d)


def _is_grouped_input(module: nn.Module, name: str, axis: int) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and name == "weight" and axis == 1 and module.groups > 1


def _refresh_sizes(module: nn.Module, old: Mapping[str, Any], conv1d: bool) -> None:
    """Set the size attributes of a torch layer, or of a ``Conv1D`` (``conv1d``), from its sliced
    tensors (forward reads them)."""
    weight = getattr(module, "weight", None)
    if conv1d:
        module.nx, module.nf = weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        module.in_channels = weight.shape[0]
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = weight.shape[0]
        if 1 < old["groups"] == old["in_channels"]:  # depthwise: groups follow the channels
            module.in_channels = module.groups = weight.shape[0] // (old["out_channels"] // old["in_channels"])
        else:
            module.in_channels = weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        stats = weight if weight is not None else module.running_mean
        if stats is not None:
            module.num_features = stats.shape[0]
    elif isinstance(module, nn.LayerNorm) and weight is not None:
        module.normalized_shape = tuple(weight.shape)
    elif isinstance(module, nn.GroupNorm) and weight is not None:
        module.num_channels = weight.shape[0]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = weight.shape[0]
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = weight.shape[1]


def _like(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` as a Parameter when ``old`` was one (same requires_grad), else as a buffer tensor."""
    if isinstance(old, nn.Parameter):
        return nn.Parameter(new.detach().contiguous(), requires_grad=old.requires_grad)
    return new.contiguous()


def _input_columns(weight: torch.Tensor, groups: int, keep: torch.Tensor) -> torch.Tensor:
    """Keep input channels ``keep`` of a conv/Linear weight; per block for a grouped conv.

    A grouped conv's weight is ``(C_out, C_in/G, ...)``: the rows of block b read input channels
    ``b*C_in/G ...``, so block b keeps its own columns (each block the same count).
    """
    keep = keep.to(weight.device)
    if groups == 1:
        return weight[:, keep]
    per_block_in = weight.shape[1]
    local = (keep % per_block_in).reshape(groups, -1)
    rows_per_block = weight.shape[0] // groups
    index = local.repeat_interleave(rows_per_block, dim=0)
    index = index.reshape(*index.shape, *([1] * (weight.dim() - 2))).expand(-1, -1, *weight.shape[2:])
    return torch.gather(weight, 1, index)


def _forward_error(model: nn.Module, example_inputs: object) -> str | None:
    """Run the model once (eval mode, no gradients, BatchNorm statistics untouched)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*as_input_tuple(example_inputs))
    except Exception as exc:  # any failure means the sliced shapes do not fit
        return f"{type(exc).__name__}: {exc}"
    finally:
        model.train(was_training)
    return None


def _slice_checked(
    model: nn.Module, groups: list[ChannelGroup], chosen: dict[str, list[int]], example_inputs: object
) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Slice all chosen groups; if the forward breaks, find the groups that break it and keep them whole."""
    by_key = {group.key: group for group in groups}
    sliced = _slice_groups(model, by_key, chosen)
    if _forward_error(model, example_inputs) is None:
        return chosen, {}
    sliced.restore()
    broken = {}
    for key in chosen:
        trial = _slice_groups(model, by_key, {key: chosen[key]})
        error = _forward_error(model, example_inputs)
        trial.restore()
        if error is not None:
            broken[key] = error
    kept = {key: channels for key, channels in chosen.items() if key not in broken}
    sliced = _slice_groups(model, by_key, kept)
    error = _forward_error(model, example_inputs)
    if error is not None:
        sliced.restore()
        broken.update(dict.fromkeys(kept, f"the groups run alone but not together ({error})"))
        kept = {}
    for key, error in broken.items():
        warnings.warn(f"channel pruning left group '{key}' whole: slicing it breaks the forward pass: {error}")
    return kept, broken


def _skipped(
    groups: list[ChannelGroup],
    specs: Mapping[str, PruneSpec],
    kept: Mapping[str, object],
    broken: Mapping[str, str],
    tied: Mapping[str, str],
) -> dict[str, str]:
    """For each layer planned for filter pruning that kept all its channels: why."""
    planned = {name for name, spec in specs.items() if spec.kind == "filter"}
    reasons: dict[str, str] = {}
    for group in groups:
        if group.key in kept:
            continue
        for name in sorted(planned.intersection(group.producers)):
            reasons[name] = _why_whole(group, specs, planned, broken)
    producers = {name for group in groups for name in group.producers}
    for name in sorted(planned - producers):
        if name in tied:
            reasons[name] = (
                f"its weight is {tied[name]}'s too (tied weights), and channel pruning leaves a Parameter "
                "that two layers hold whole"
            )
            continue
        reasons[name] = (
            "not a channel producer in the captured graph: a depthwise conv, a layer whose weight is computed "
            "(weight_norm, spectral_norm) or one the model does not call"
        )
    return reasons


def _why_whole(
    group: ChannelGroup, specs: Mapping[str, PruneSpec], planned: set[str], broken: Mapping[str, str]
) -> str:
    if group.key in broken:
        return f"slicing group '{group.key}' breaks the forward pass: {broken[group.key]}"
    if not group.prunable:
        return f"group '{group.key}' cannot be pruned: {group.reason}"
    settings = group_settings(group, specs)
    if settings is None:
        return f"group '{group.key}' shares channels with {sorted(set(group.producers) - planned)}, not planned"
    ratio, ascend_optimized = settings
    unrounded = keep_count(group.num_channels, ratio, False, group.blocks)
    if ascend_optimized and unrounded < group.num_channels:
        return (
            f"group '{group.key}' keeps all {group.num_channels} channels: ascend_optimized rounds the {unrounded} "
            f"it would keep at ratio {ratio:g} up to a multiple of {ASCEND_CHANNEL_TILE} "
            "(ascend_optimized: false prunes it)"
        )
    return f"group '{group.key}' keeps all {group.num_channels} channels at ratio {ratio:g}"
