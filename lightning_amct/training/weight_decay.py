"""Keeping weight decay off the clip and scale parameters.

The clips (``clip_max``/``clip_min``) and learned weight scales are ranges, not weights: decaying
them towards 0 shrinks the quantization range for no reason (the reference toolkit lets it
happen). The user's ``configure_optimizers`` puts every parameter in its groups, so at fit start,
before any step and before an optimizer state is restored from a checkpoint, the callback moves
these parameters into a group of their own with ``weight_decay=0`` and otherwise the same
hyper-parameters. A learning-rate scheduler already attached to the optimizer learns about the
new group too (its ``base_lrs`` and its other lists of one entry per group are extended: ``LambdaLR``'s
functions, ``CyclicLR``'s bounds, ``ReduceLROnPlateau``'s floors; ``SequentialLR``'s and
``ChainedScheduler``'s schedulers too), and so does anything else that holds such lists without an
optimizer of its own (``StochasticWeightAveraging``'s ``swa_lrs``).

Example:
    >>> import torch
    >>> w, clip = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(()))
    >>> opt = torch.optim.AdamW([w, clip], lr=0.1, weight_decay=0.01)
    >>> exclude_from_weight_decay(opt, [clip])
    1
    >>> [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups]
    [(1, 0.01), (1, 0.0)]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn
from torch.optim import Optimizer


def exclude_from_weight_decay(
    optimizer: Optimizer, params: Iterable[nn.Parameter], schedulers: Sequence[object] = (), before_source: bool = False
) -> int:
    """Move ``params`` out of decaying groups of ``optimizer``; returns how many moved.

    ``schedulers``: the schedulers (of this optimizer or another) and other holders of per-group
    lists whose lists gain an entry for each new group.

    Each new group goes last, so the user's groups keep their indices; with ``before_source``,
    just before the group it came from instead, which stays last where it was: a group that a
    callback added in training and goes on addressing as the last one (``BackboneFinetuning``
    raises the backbone's learning rate in ``param_groups[-1]`` every epoch).
    """
    wanted = {id(p) for p in params}
    moved = 0
    for group in list(optimizer.param_groups):
        if not group.get("weight_decay"):
            continue
        taken = [p for p in group["params"] if id(p) in wanted]
        if not taken:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in wanted]
        new_group = {k: v for k, v in group.items() if k != "params"}
        new_group.update(params=taken, weight_decay=0.0)
        optimizer.add_param_group(new_group)
        source = next(index for index, g in enumerate(optimizer.param_groups) if g is group)
        position = source if before_source else len(optimizer.param_groups) - 1
        optimizer.param_groups.insert(position, optimizer.param_groups.pop())
        for scheduler in schedulers:
            if getattr(scheduler, "optimizer", optimizer) is optimizer:
                _extend_scheduler(scheduler, source, position, new_group, len(optimizer.param_groups))
        moved += len(taken)
    return moved


#: What a scheduler of ``torch.optim.lr_scheduler`` holds one entry of per parameter group, beside
#: ``base_lrs`` and ``_last_lr``: ``LambdaLR``'s and ``MultiplicativeLR``'s functions, ``CyclicLR``'s
#: bounds, ``ReduceLROnPlateau``'s floors given as a list; and Lightning's
#: ``StochasticWeightAveraging``'s learning rates given as a list.
_PER_GROUP = ("lr_lambdas", "max_lrs", "base_momentums", "max_momentums", "min_lrs", "_swa_lrs")


def _extend_scheduler(scheduler: object, source: int, position: int, new_group: dict, groups: int) -> None:
    """Give ``scheduler`` (and the schedulers it runs: ``SequentialLR``, ``ChainedScheduler``) an
    entry for the group put at ``position``, copied from that of the group it came from (``source``,
    its index before); ``groups`` counts the optimizer's groups with the new one.

    A list is extended once, where it is one entry short (``SequentialLR`` shares its first
    scheduler's ``_last_lr``).
    """
    first_values = {"base_lrs": new_group.get("initial_lr", new_group["lr"]), "_last_lr": new_group["lr"]}
    for name in (*first_values, *_PER_GROUP):
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and len(values) == groups - 1:
            values.insert(position, first_values.get(name, values[source]))
    for child in getattr(scheduler, "_schedulers", ()):
        _extend_scheduler(child, source, position, new_group, groups)
