"""Channel groups found by the graph walk: members, offsets, merges, and what pins a group."""

from __future__ import annotations

import warnings

import pytest

import torch
from torch import nn

from lightning_amct.demo.model import DemoNet
from lightning_amct.prune import ChannelMember, find_channel_groups

from grouped_model import Grouped


def groups_of(model: nn.Module, example: torch.Tensor) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {g.key: g for g in find_channel_groups(model, example)}


def warnings_of(model: nn.Module, example: torch.Tensor) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        find_channel_groups(model, example)
    return [str(w.message) for w in record]


def test_demo_net_groups() -> None:
    groups = groups_of(DemoNet(), torch.zeros(1, 1, 8, 8))
    assert list(groups) == ["stem.conv", "block.conv1", "pointwise.conv", "fc"]
    stem = groups["stem.conv"]
    assert stem.producers == ("stem.conv", "block.conv2")  # merged through the residual add
    assert stem.num_channels == 64 and stem.prunable
    assert ChannelMember("depthwise.conv", "out") in stem.members  # shrinks in step
    assert ChannelMember("pointwise.conv", "in") in stem.members
    assert {m.module for m in stem.members} == {
        "stem.conv", "stem.bn", "block.conv1", "block.conv2", "block.bn2", "depthwise.conv", "depthwise.bn",
        "pointwise.conv",
    }  # fmt: skip
    assert groups["fc"].reason == "feeds the model output"
    assert ChannelMember("fc", "in") in groups["pointwise.conv"].members


class Concat(nn.Module):
    """cat([conv a (4), the input (3), conv b (6)]) -> conv c -> pool -> flatten -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(13, 8, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 2 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c(torch.cat([self.a(x), x, self.b(x)], dim=-3)))
        return self.fc(self.pool(x).flatten(1))


def test_concat_offsets_and_flatten_width() -> None:
    groups = groups_of(Concat(), torch.zeros(2, 3, 4, 6))
    assert ChannelMember("c", "in", offset=0) in groups["a"].members
    assert ChannelMember("c", "in", offset=7) in groups["b"].members  # behind 4 + 3 input channels
    assert ChannelMember("fc", "in", offset=0, width=6) in groups["c"].members  # 2x3 positions per channel
    assert all(groups[k].prunable for k in "abc")


def test_member_positions() -> None:
    member = ChannelMember("fc", "in", offset=3, width=2)
    assert member.positions(torch.tensor([0, 2])).tolist() == [3, 4, 7, 8]


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.c(self.a(x) * self.b(x)))


def test_product_of_two_tensors_warns_and_pins_both_groups() -> None:
    texts = warnings_of(Gated(), torch.zeros(1, 3, 4, 4))
    assert texts == [
        "channel pruning does not understand node 'mul' (mul): product or quotient of two tensors; "
        "channel groups ['a', 'b'] stay whole"
    ]
    groups = groups_of(Gated(), torch.zeros(1, 3, 4, 4))
    assert not groups["a"].prunable and not groups["b"].prunable and groups["c"].prunable
    assert "node 'mul'" in groups["a"].reason


class UnknownModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.norm = nn.GroupNorm(2, 8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(x)))


def test_unknown_module_warns_with_its_type() -> None:
    texts = warnings_of(UnknownModule(), torch.zeros(1, 3, 4, 4))
    assert texts == ["channel pruning does not understand node 'norm' (GroupNorm); channel groups ['a'] stay whole"]


class ChannelCountAsNumber(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        b, t, d = h.shape
        y = self.b(h).transpose(1, 2).reshape(b, t, d)  # d read from h, used on another tensor
        return self.c(h.reshape(b, t, -1) + y)


def test_reading_the_channel_count_pins_the_group() -> None:
    texts = warnings_of(ChannelCountAsNumber(), torch.zeros(2, 8, 4))
    assert "node 'getitem_2' (getitem): reads the channel count as a number; channel groups ['a']" in texts[0]


class SelfReshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.fc(h.view(h.size(0), h.size(1), -1).reshape(h.size(0), -1))


def test_reshaping_a_tensor_by_its_own_sizes_is_understood() -> None:
    assert warnings_of(SelfReshape(), torch.zeros(2, 3, 4, 4)) == []
    groups = groups_of(SelfReshape(), torch.zeros(2, 3, 4, 4))
    assert groups["a"].prunable and ChannelMember("fc", "in", width=16) in groups["a"].members


class FixedView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.a(x).mean((2, 3)).view(-1, 8))  # a literal channel count


def test_literal_channel_count_in_a_view_pins_the_group() -> None:
    texts = warnings_of(FixedView(), torch.zeros(2, 3, 4, 4))
    assert texts and "node 'view'" in texts[0] and "['a']" in texts[0]


class AddsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(x + self.a(x)))


def test_adding_the_model_input_pins_silently() -> None:
    assert warnings_of(AddsInput(), torch.zeros(1, 3, 4, 4)) == []
    groups = groups_of(AddsInput(), torch.zeros(1, 3, 4, 4))
    assert "cannot be pruned" in groups["a"].reason and groups["b"].prunable


class Shared(nn.Module):
    """One conv applied to two branches: both branches' channels must match."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.shared(self.a(x)), self.shared(self.b(x))], 1))


def test_a_module_called_twice_merges_its_inputs() -> None:
    groups = groups_of(Shared(), torch.zeros(1, 3, 4, 4))
    assert groups["a"].producers == ("a", "b")
    shared = groups["shared"]
    assert ChannelMember("head", "in", 0) in shared.members and ChannelMember("head", "in", 8) in shared.members


def test_grouped_and_multiplier_depthwise_convs() -> None:
    groups = groups_of(Grouped(), torch.zeros(1, 3, 4, 4))
    assert groups["a"].blocks == 4 and groups["g"].blocks == 4
    assert ChannelMember("dw", "out", width=2) in groups["g"].members
    assert ChannelMember("out", "in", width=2) in groups["g"].members
    assert "dw" not in groups


def test_layer_norm_over_channels_is_a_member() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
    groups = groups_of(model, torch.zeros(2, 5, 4))
    assert ChannelMember("1", "out") in groups["0"].members and groups["0"].prunable


class Op(nn.Module):
    """conv ``a`` -> ``op`` -> conv ``b`` (a 1x1 conv reading whatever ``op`` returns)."""

    def __init__(self, op, channels_out: int = 8) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.op = op
        self.b = nn.Conv2d(channels_out, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.op(self.a(x)))


@pytest.mark.parametrize(
    ("op", "channels_out", "node"),
    [
        (lambda h: torch.chunk(h, 2, dim=1)[0], 4, "chunk"),
        (lambda h: h[:, :4], 4, "getitem"),
        (lambda h: torch.softmax(h, dim=1), 8, "softmax"),
        (lambda h: h.mT.mT, 8, "getattr_1"),
        (lambda h: h * h.size(1), 8, "size"),
    ],
)
def test_ops_that_are_not_understood_pin_the_group(op, channels_out: int, node: str) -> None:
    texts = warnings_of(Op(op, channels_out), torch.zeros(1, 3, 4, 4))
    assert texts and f"node '{node}'" in texts[0] and texts[0].endswith("channel groups ['a'] stay whole")
