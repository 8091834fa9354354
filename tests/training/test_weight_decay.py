"""The clips' group without weight decay, and the learning-rate schedulers that must learn about it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.optim import lr_scheduler as schedulers

from lightning_amct.training.weight_decay import exclude_from_weight_decay

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], object]] = {
    "step": lambda opt: schedulers.StepLR(opt, 2, 0.5),
    "lambda": lambda opt: schedulers.LambdaLR(opt, lambda step: 1 / (1 + step)),
    "multiplicative": lambda opt: schedulers.MultiplicativeLR(opt, lambda step: 0.9),
    "one-cycle": lambda opt: schedulers.OneCycleLR(opt, 0.1, total_steps=20),
    "cyclic": lambda opt: schedulers.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=3),
    "sequential": lambda opt: schedulers.SequentialLR(
        opt, [schedulers.LinearLR(opt, 0.1, total_iters=3), schedulers.ExponentialLR(opt, 0.5)], milestones=[3]
    ),
    "chained": lambda opt: schedulers.ChainedScheduler([schedulers.ExponentialLR(opt, 0.9), schedulers.StepLR(opt, 2)]),
    "plateau-list": lambda opt: schedulers.ReduceLROnPlateau(opt, factor=0.5, patience=0, min_lr=[0.02]),
}


@pytest.mark.parametrize("before_source", [False, True])
@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_the_clips_group_follows_the_schedule_of_the_group_it_left(kind: str, before_source: bool) -> None:
    weight, clip = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(()))
    optimizer = torch.optim.SGD([weight, clip], lr=0.1, momentum=0.9, weight_decay=0.01)
    scheduler = SCHEDULERS[kind](optimizer)
    assert exclude_from_weight_decay(optimizer, [clip], [scheduler], before_source) == 1
    weights, clips = optimizer.param_groups[::-1] if before_source else optimizer.param_groups
    assert (weights["weight_decay"], clips["weight_decay"]) == (0.01, 0.0) and clips["params"] == [clip]
    seen = set()
    for step in range(8):
        (weight.sum() + clip).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step(1.0) if kind.startswith("plateau") else scheduler.step()
        assert clips["lr"] == weights["lr"], f"step {step}"
        seen.add(weights["lr"])
    assert len(seen) > 1, "the schedule changed the rate"
