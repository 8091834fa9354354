"""IFMR's statistics in a checkpoint saved while calibration runs, so that a resumed run finishes it.

The clips of a quantizer without ``clip_max_min`` come from IFMR over its first ``batch_num``
training batches (:class:`~lightning_amct.quant.functional.ifmr.IfmrObserver`). The observer is
host state, not a buffer: a checkpoint saved before the last of those batches (``batch_num``
beyond the first epoch, a checkpoint every few steps) would resume with the counter but not
the values, and IFMR would run on the remaining batches alone. :func:`calibration_record` puts
every observer still collecting into the checkpoint's record, one set per rank (each rank
collects its own until calibration gathers them), and :func:`restore_calibration` gives them
back, to the same rank of the same number of ranks: the resumed run then ends calibration with
the clips of an uninterrupted one, bit for bit.

Example:
    >>> import torch
    >>> from lightning_amct.quant import ActivationQuantizer
    >>> quantizer = ActivationQuantizer(8, fixed_min=False, batch_num=3).train()
    >>> _ = quantizer(torch.randn(64))  # the first of 3 calibration batches
    >>> record = calibration_record(torch.nn.Sequential(quantizer))
    >>> sorted(record["ranks"][0]), record["world_size"]
    (['0'], 1)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_amct.quant import ActivationQuantizer
from lightning_amct.training.collectives import several_ranks


def calibration_record(model: nn.Module) -> dict[str, Any] | None:
    """The observers of ``model``'s quantizers that are still collecting, on every rank; None
    when none is (calibration over, or not begun). A collective where there are several ranks:
    every rank calls it (every rank takes part in a checkpoint's save)."""
    quantizers = {name: m for name, m in model.named_modules() if isinstance(m, ActivationQuantizer)}
    collected = {name: quantizer.calibration_statistics() for name, quantizer in quantizers.items()}
    states = {name: statistics for name, statistics in collected.items() if statistics is not None}
    if several_ranks():
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, states)
    else:
        ranks = [states]
    return {"world_size": len(ranks), "ranks": ranks} if any(ranks) else None


def restore_calibration(model: nn.Module, record: dict[str, Any], rank: int, world_size: int) -> None:
    """Give ``model``'s quantizers the observers :func:`calibration_record` saved for ``rank``.

    Saved by another number of ranks, the statistics cannot be split or joined as the run would
    have collected them: the quantizers then collect the remaining batches afresh, with a warning.
    """
    if record["world_size"] != world_size:
        rank_zero_warn(
            f"lightning-amct: the checkpoint holds the calibration statistics of {record['world_size']} "
            f"rank(s), this run has {world_size}: IFMR runs on the remaining calibration batches alone"
        )
        return
    for name, statistics in record["ranks"][rank].items():
        model.get_submodule(name).resume_calibration(statistics)
