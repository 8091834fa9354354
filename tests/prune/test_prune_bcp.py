"""BCP math: scores, keep counts, selection and the plan rule, against direct computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_amct import resolve_plan
from lightning_amct.plan.specs import PruneSpec
from lightning_amct.prune import (
    ChannelGroup,
    ChannelMember,
    group_scores,
    group_settings,
    keep_count,
    producer_scores,
    select_channels,
)


def test_producer_scores_are_normalised_l2_norms_per_element() -> None:
    weight = torch.randn(6, 4, 3, 3)
    norms = torch.tensor([weight[c].pow(2).sum().sqrt().item() / 36 for c in range(6)])
    expected = (norms - norms.min()) / (norms.max() - norms.min())
    torch.testing.assert_close(producer_scores(weight), expected)


def test_equal_channels_score_zero_not_nan() -> None:
    assert torch.equal(producer_scores(torch.ones(5, 3)), torch.zeros(5))


def test_group_score_is_the_mean_over_producers() -> None:
    model = nn.ModuleDict({"a": nn.Conv2d(3, 4, 3), "b": nn.Linear(7, 4)})
    group = ChannelGroup("a", ("a", "b"), 4, (ChannelMember("a", "weight", 0), ChannelMember("b", "weight", 0)))
    expected = (producer_scores(model["a"].weight) + producer_scores(model["b"].weight)) / 2
    torch.testing.assert_close(group_scores(model, group), expected)


@pytest.mark.parametrize(
    ("n", "ratio", "ascend", "blocks", "keep"),
    [
        (64, 0.3, False, 1, 45),  # 64 - round(19.2)
        (64, 0.3, True, 1, 48),  # up to a multiple of 16
        (10, 0.25, False, 1, 8),  # round(2.5) = 2: half to even
        (10, 0.35, False, 1, 6),  # round(3.5) = 4
        (10, 0.5, True, 1, 10),  # 16, capped at N
        (40, 0.9, True, 1, 16),  # keep 4 -> 16
        (3, 0.9, False, 1, 1),  # keep 0 -> at least one channel
        (64, 0.3, False, 4, 44),  # floor to a multiple of G
        (8, 0.9, False, 4, 4),  # at least G
        (64, 0.0, True, 1, 64),
    ],
)
def test_keep_count(n: int, ratio: float, ascend: bool, blocks: int, keep: int) -> None:
    assert keep_count(n, ratio, ascend, blocks) == keep


def test_select_prunes_the_lowest_scores_and_breaks_ties_by_index() -> None:
    scores = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.1, 0.7])
    assert select_channels(scores, keep=4) == [0, 2, 4, 5]  # of the three 0.1s, indices 1 and 3 go first
    assert select_channels(scores, keep=2, blocks=2) == [2, 5]  # the best of each block of 3


def test_select_matches_a_plain_sort() -> None:
    scores = torch.rand(50)
    expected = sorted(sorted(range(50), key=lambda c: (scores[c].item(), c))[50 - 17 :])
    assert select_channels(scores, keep=17) == expected


def test_group_settings_rule() -> None:
    group = ChannelGroup("a", ("a", "b"), 8, ())
    half, third = PruneSpec("filter", 0.5, False), PruneSpec("filter", 0.3, True)
    assert group_settings(group, {"a": half, "b": third}) == (0.3, True)
    assert group_settings(group, {"a": half}) is None
    assert group_settings(group, {"a": half, "b": PruneSpec("n_out_of_m", update_freq=0)}) is None
    with pytest.raises(ValueError, match="layer 'b': filter pruning needs prune_ratio in \\[0, 1\\)"):
        group_settings(group, {"a": half, "b": PruneSpec("filter", 1.0)})


def test_a_group_that_ascend_rounding_keeps_whole_says_so() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 40, 3), nn.ReLU(), nn.Conv2d(40, 4, 1))
    config = "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 } } }"
    plan = str(resolve_plan(model, config, torch.randn(1, 3, 8, 8)))
    assert (
        "not filter-pruned: group '0' keeps all 16 channels: ascend_optimized rounds the 11 it would keep at "
        "ratio 0.3 up to a multiple of 16 (ascend_optimized: false prunes it)"
    ) in plan
    assert "filter 0.3 ascend16" in plan  # 40 channels: 28 kept, rounded up to 32
