"""Balanced channel pruning (BCP): which channels of a group to keep.

The math of the reference BalancedL2NormFilterPruner, as pure functions of weights:

* per producer p, ``n_p[c] = ||W_p[c]||_2 / K_p`` (K_p = weight elements per output channel),
  min-max normalised to [0, 1] so that producers of different size weigh the same; a constant
  ``n_p`` normalises to all zeros (the reference divides by zero there);
* a group's score is the **mean** of its producers' normalised scores (the reference reads only
  the first producer);
* keep ``N - round(N*r)`` channels (round half to even), rounded up to a multiple of 16 under
  ``ascend_optimized`` (the NPU's channel tile), then down to a multiple of the grouped-conv
  block count G (at least G), and at least 1. A depthwise conv sets no G: it shrinks in step, its
  ``groups`` following the kept count;
* prune the lowest scores, per block of N/G channels. The sort is stable, so among equal scores the
  lower channel index is pruned first: every DDP rank, holding the same weights, keeps the same
  channels.

Which ratio a group gets (:func:`group_settings`): a group is pruned only if **every** producer is
planned for filter pruning, because slicing a producer the plan skipped would change a layer the
user excluded. It then takes the smallest ``prune_ratio`` among them, and rounds to 16 if any
producer asks for ``ascend_optimized``: both choices keep the most channels any producer asked for.

Example:
    >>> keep_count(64, 0.5, ascend_optimized=False)
    32
    >>> keep_count(40, 0.5, ascend_optimized=True)
    32
    >>> select_channels(torch.tensor([0.9, 0.1, 0.5, 0.1]), keep=2)
    [0, 2]
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from lightning_amct.plan.layers import weight_axes
from lightning_amct.plan.specs import PruneSpec
from lightning_amct.prune.dependency import ChannelGroup

ASCEND_CHANNEL_TILE = 16


def producer_scores(weight: torch.Tensor) -> torch.Tensor:
    """Normalised L2 score of each output channel (row) of ``weight``, in [0, 1].

    Args:
        weight: a conv or Linear weight, output channels on axis 0.

    Returns:
        A float32 vector with one score per row; all zeros when every row scores the same.
    """
    rows = weight.detach().float().flatten(1)
    norms = rows.norm(dim=1) / rows.shape[1]
    low, high = norms.min(), norms.max()
    if high <= low:
        return torch.zeros_like(norms)
    return (norms - low) / (high - low)


def group_scores(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Mean of :func:`producer_scores` over the group's producers (a ``Conv1D``'s output channels
    are the columns of its weight), each over the rows of its weight that hold the group's
    channels: all of them, or a run of them where a split of the channel axis divided a layer's
    output channels (two runs, each scored alone, where a gated unit joins its halves)."""
    channels = torch.arange(group.num_channels)
    scores = []
    for name in group.producers:
        module = model.get_submodule(name)
        axis = weight_axes(module)[0]
        rows = module.weight.movedim(axis, 0)
        for member in group.members:
            if (member.module, member.tensor, member.axis) == (name, "weight", axis):
                picked = rows.index_select(0, member.positions(channels).to(rows.device))
                scores.append(producer_scores(picked.reshape(group.num_channels, -1)))
    return torch.stack(scores).mean(dim=0)


def keep_count(num_channels: int, ratio: float, ascend_optimized: bool, blocks: int = 1) -> int:
    """How many of ``num_channels`` survive pruning at ``ratio``.

    Args:
        num_channels: N, the group's channel count.
        ratio: share of channels to remove, in [0, 1).
        ascend_optimized: round the kept count up to a multiple of 16 (capped at N).
        blocks: G when a grouped conv constrains the group; the result is a multiple of G.
    """
    keep = num_channels - round(num_channels * ratio)
    if ascend_optimized:
        keep = min(max(math.ceil(keep / ASCEND_CHANNEL_TILE), 1) * ASCEND_CHANNEL_TILE, num_channels)
    if blocks > 1:
        keep = max(keep // blocks * blocks, blocks)
    return max(keep, 1)


def select_channels(scores: torch.Tensor, keep: int, blocks: int = 1) -> list[int]:
    """Indices of the ``keep`` best channels, ascending; ``keep/blocks`` from each block.

    Ties: the stable ascending sort prunes the lower index first.
    """
    per_block = scores.numel() // blocks
    pruned_per_block = per_block - keep // blocks
    order = torch.argsort(scores.reshape(blocks, per_block), dim=1, stable=True)
    kept = order[:, pruned_per_block:] + torch.arange(blocks)[:, None] * per_block
    return sorted(kept.flatten().tolist())


def group_settings(group: ChannelGroup, specs: Mapping[str, PruneSpec]) -> tuple[float, bool] | None:
    """``(ratio, ascend_optimized)`` for ``group``, or None when the plan leaves it whole.

    Raises:
        ValueError: a filter spec without a ratio in [0, 1).
    """
    planned = [specs.get(name) for name in group.producers]
    if any(spec is None or spec.kind != "filter" for spec in planned):
        return None
    for name, spec in zip(group.producers, planned):
        if spec.prune_ratio is None or not 0.0 <= spec.prune_ratio < 1.0:
            raise ValueError(f"layer '{name}': filter pruning needs prune_ratio in [0, 1), got {spec.prune_ratio}")
    return min(spec.prune_ratio for spec in planned), any(spec.ascend_optimized for spec in planned)


def kept_counts(groups: list[ChannelGroup], specs: Mapping[str, PruneSpec]) -> dict[str, int]:
    """How many channels each group the plan prunes keeps, for the groups that lose channels.

    The structure alone decides it, before any weight is scored: a plan can show which layers
    really lose channels.
    """
    counts: dict[str, int] = {}
    for group in groups:
        settings = group_settings(group, specs) if group.prunable else None
        if settings is None:
            continue
        keep = keep_count(group.num_channels, *settings, blocks=group.blocks)
        if keep < group.num_channels:
            counts[group.key] = keep
    return counts


def choose_kept_channels(
    model: nn.Module, groups: list[ChannelGroup], specs: Mapping[str, PruneSpec]
) -> dict[str, list[int]]:
    """Kept channel indices of every group that the plan prunes and that loses channels."""
    counts = kept_counts(groups, specs)
    return {
        group.key: select_channels(group_scores(model, group), counts[group.key], group.blocks)
        for group in groups
        if group.key in counts
    }
