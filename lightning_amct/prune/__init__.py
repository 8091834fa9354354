"""Pruning core, usable without Lightning: channel pruning (BCP) and 4:2 structured sparsity.

Channel pruning runs once, before fine-tuning::

    result = prune_model(model, {"conv1": PruneSpec("filter", 0.5)}, example_inputs)
    print(format_report(result.report))
    checkpoint["kept_channels"] = result.kept   # plain ints

and a fresh copy of the model gets the same structure back with
``apply_kept_channels(fresh, checkpoint["kept_channels"], example_inputs)`` before its state_dict is
loaded. 4:2 sparsity computes masks with :func:`n_out_of_m_mask` and stores them with
:func:`pack_mask_bits`.
"""

from lightning_amct.prune.bcp import (
    choose_kept_channels,
    group_scores,
    group_settings,
    keep_count,
    producer_scores,
    select_channels,
)
from lightning_amct.prune.dependency import ChannelGroup, ChannelMember, find_channel_groups
from lightning_amct.prune.report import compare_stats, format_report, model_stats
from lightning_amct.prune.selective import input_channel_axis, n_out_of_m_mask, pack_mask_bits, unpack_mask_bits
from lightning_amct.prune.surgery import PruneResult, apply_kept_channels, prune_model

__all__ = [
    "ChannelGroup",
    "ChannelMember",
    "PruneResult",
    "apply_kept_channels",
    "choose_kept_channels",
    "compare_stats",
    "find_channel_groups",
    "format_report",
    "group_scores",
    "group_settings",
    "input_channel_axis",
    "keep_count",
    "model_stats",
    "n_out_of_m_mask",
    "pack_mask_bits",
    "prune_model",
    "producer_scores",
    "select_channels",
    "unpack_mask_bits",
]
