"""Channel groups found by the walk over the captured graph: members, offsets, merges, and what pins a group."""

from __future__ import annotations

import warnings

import pytest

import torch
import torch.nn.functional as F
from torch import nn

from lightning_amct.demo.model import DemoNet
from lightning_amct.prune import ChannelMember, find_channel_groups

from gated_model import ConvGlu, GatedMlp
from grouped_model import Grouped
from patches_model import Patches


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
    assert ChannelMember("depthwise.conv", "weight", 0) in stem.members  # shrinks in step
    assert ChannelMember("depthwise.bn", "running_var", 0) in stem.members
    assert ChannelMember("pointwise.conv", "weight", 1) in stem.members
    assert {m.module for m in stem.members} == {
        "stem.conv", "stem.bn", "block.conv1", "block.conv2", "block.bn2", "depthwise.conv", "depthwise.bn",
        "pointwise.conv",
    }  # fmt: skip
    assert groups["fc"].reason == "feeds the model output"
    assert ChannelMember("fc", "weight", 1) in groups["pointwise.conv"].members


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
    assert ChannelMember("c", "weight", 1, offset=0) in groups["a"].members
    assert ChannelMember("c", "weight", 1, offset=7) in groups["b"].members  # behind 4 + 3 input channels
    assert ChannelMember("fc", "weight", 1, offset=0, width=6) in groups["c"].members  # 2x3 positions per channel
    assert all(groups[k].prunable for k in "abc")


def test_member_positions() -> None:
    member = ChannelMember("fc", "weight", 1, offset=3, width=2)
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


def test_product_of_two_feature_maps_couples_their_groups() -> None:
    # a squeeze-excite gate multiplies a feature map by per-channel weights: the same channels
    assert warnings_of(Gated(), torch.zeros(1, 3, 4, 4)) == []
    groups = groups_of(Gated(), torch.zeros(1, 3, 4, 4))
    assert groups["a"].producers == ("a", "b") and groups["a"].prunable and "b" not in groups
    assert ChannelMember("c", "weight", 1) in groups["a"].members


class SqueezeExcite(nn.Module):
    """conv -> x * sigmoid(expand(relu(reduce(mean(x))))) -> layer scale -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.reduce = nn.Conv2d(16, 4, 1)
        self.expand = nn.Conv2d(4, 16, 1)
        self.gamma = nn.Parameter(torch.full((16,), 0.1))
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return self.head(x * gate * self.gamma.view(1, -1, 1, 1))


def test_squeeze_excite_gate_and_layer_scale_join_the_group() -> None:
    groups = groups_of(SqueezeExcite(), torch.zeros(1, 3, 6, 6))
    group = groups["conv"]
    assert group.producers == ("conv", "expand") and group.prunable
    assert {ChannelMember("reduce", "weight", 1), ChannelMember("", "gamma", 0)} <= set(group.members)
    assert groups["reduce"].prunable and ChannelMember("expand", "weight", 1) in groups["reduce"].members


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.norm = nn.GroupNorm(2, 8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(x)))


def test_group_norm_prunes_per_norm_group() -> None:
    group = groups_of(Normed(), torch.zeros(1, 3, 4, 4))["a"]
    assert group.prunable and group.blocks == 2
    assert {ChannelMember("norm", "weight", 0), ChannelMember("norm", "bias", 0)} <= set(group.members)


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm subclass whose forward calls the function and an activation (as timm writes it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return F.silu(x)


def test_functional_batch_norm_in_a_subclass_is_a_member() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), BatchNormAct(8), nn.Conv2d(8, 2, 1))
    group = groups_of(model, torch.zeros(1, 3, 4, 4))["0"]
    assert group.prunable
    assert {m.tensor for m in group.members if m.module == "1"} == {"weight", "bias", "running_mean", "running_var"}


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.up = nn.PixelShuffle(2)
        self.b = nn.Conv2d(2, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.up(self.a(x)))


def test_unknown_operator_warns_naming_it_and_its_module() -> None:
    texts = warnings_of(Unknown(), torch.zeros(1, 3, 4, 4))
    assert texts == [
        "channel pruning does not understand node 'pixel_shuffle' (pixel_shuffle in up): an operator it has no rule "
        "for; channel groups ['a'] stay whole"
    ]


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


def test_channels_meeting_on_different_axes_pin_both_groups() -> None:
    # the captured graph holds sizes as numbers: what it sees is b's channels on axis 1 added to a's on axis 2
    texts = warnings_of(ChannelCountAsNumber(), torch.zeros(2, 8, 4))
    assert texts == [
        "channel pruning does not understand node 'add' (add): channels on different axes of one elementwise "
        "operation; channel groups ['a', 'b'] stay whole"
    ]


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
    assert groups["a"].prunable and ChannelMember("fc", "weight", 1, width=16) in groups["a"].members


class HookedGain(nn.Module):
    """A forward hook multiplies conv ``a``'s output by a per-channel buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 1)
        self.b = nn.Conv2d(32, 2, 1)
        self.register_buffer("gain", torch.ones(1, 32, 1, 1))
        self.a.register_forward_hook(lambda module, args, out: out * self.gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_forward_hooks_are_part_of_the_graph() -> None:
    group = groups_of(HookedGain(), torch.zeros(1, 3, 4, 4))["a"]
    assert group.prunable and ChannelMember("", "gain", 1) in group.members


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
    assert ChannelMember("head", "weight", 1, 0) in shared.members
    assert ChannelMember("head", "weight", 1, 8) in shared.members


def test_grouped_and_multiplier_depthwise_convs() -> None:
    groups = groups_of(Grouped(), torch.zeros(1, 3, 4, 4))
    assert groups["a"].blocks == 4 and groups["g"].blocks == 4
    assert ChannelMember("dw", "weight", 0, width=2) in groups["g"].members
    assert ChannelMember("out", "weight", 1, width=2) in groups["g"].members
    assert "dw" not in groups


def test_layer_norm_over_channels_is_a_member() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
    groups = groups_of(model, torch.zeros(2, 5, 4))
    assert ChannelMember("1", "weight", 0) in groups["0"].members and groups["0"].prunable


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
    ("op", "channels_out", "node", "why"),
    [
        (lambda h: torch.unbind(h, dim=1)[0].unsqueeze(1).expand(-1, 8, -1, -1), 8, "unbind",
         "it splits the channel axis into single channels"),
        (lambda h: h[:, :4], 4, "slice", "it splits, merges or picks from the channel axis"),
        (lambda h: torch.softmax(h, dim=1), 8, "softmax", "it mixes the channels (an operation along the channel axis)"),
        (lambda h: torch.max(h, 1, keepdim=True)[1].float().expand(-1, 8, -1, -1), 8, "max",
         "it gives the positions of an extremum over the channel axis"),
        (lambda h: F.pad(h.permute(0, 2, 3, 1), (1, 1)).permute(0, 3, 1, 2), 10, "pad", "it changes the channel axis"),
        (lambda h: h[:, torch.tensor([0, 2])], 2, "index", "it splits, merges or picks from the channel axis"),
        (lambda h: h[h > 0].reshape(1, -1, 1, 1)[:, :8], 8, "index", "it splits, merges or picks from the channel axis"),
        (lambda h: torch.ones(8, 1, 1).expand_as(h), 8, "expand_as", "its shape or indices come from the channels"),
        (lambda h: torch.arange(8.0)[(h > 0).long()], 8, "index", "its shape or indices come from the channels"),
    ],
)
def test_ops_that_are_not_understood_pin_the_group(op, channels_out: int, node: str, why: str) -> None:
    texts = warnings_of(Op(op, channels_out), torch.zeros(1, 3, 4, 4))
    assert texts and f"node '{node}'" in texts[0] and texts[0].endswith(f"{why}; channel groups ['a'] stay whole")


@pytest.mark.parametrize(
    "op",
    [
        lambda h: h.mT.mT,
        lambda h: h * h.size(1),
        lambda h: F.interpolate(F.pad(h, (1, 1, 1, 1)), scale_factor=2.0),
        lambda h: torch.softmax(h, dim=-1).flatten(2).unflatten(2, (4, 4)),
        lambda h: torch.where(h > 0, h, 0.1 * h),
        lambda h: h.flatten(2).reshape_as(h),  # LeViT's BatchNorm over flattened tokens
        lambda h: h.flatten(2).view_as(h),
        lambda h: F.pad(h.permute(0, 2, 3, 1), (0, 0, 1, 1, 0, 2)).permute(0, 3, 1, 2),  # Swin, channels last
        lambda h: h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + 1e-6),  # an RMSNorm's statistic
        lambda h: h.amax(1, keepdim=True).expand(-1, 8, -1, -1),
        lambda h: h / torch.linalg.vector_norm(h, dim=(2, 3), keepdim=True).mean(1, keepdim=True),  # ConvNeXt-V2's GRN
        lambda h: h * torch.norm(h, 2, 3, keepdim=True),  # the norm's dim is its third argument
        lambda h: torch.max(h, dim=3, keepdim=True)[0].expand(-1, -1, -1, 4),  # pooling over an axis
        lambda h: torch.min(h, dim=2)[0].unsqueeze(2),
    ],
)
def test_ops_that_keep_the_channel_axis_are_understood(op) -> None:
    assert warnings_of(Op(op), torch.zeros(1, 3, 4, 4)) == []
    assert groups_of(Op(op), torch.zeros(1, 3, 4, 4))["a"].prunable


def test_groups_do_not_depend_on_the_train_or_eval_mode() -> None:
    model = DemoNet()
    model.train()
    model.block.eval()
    in_train = groups_of(model, torch.zeros(1, 1, 8, 8))
    assert model.training and not model.block.training  # every module's mode is put back
    assert groups_of(model.eval(), torch.zeros(1, 1, 8, 8)) == in_train


class Scores(nn.Module):
    """Linear ``a``, ReLU, Linear ``score`` (the output layer), then ``head(scores, x)`` as the model's output."""

    def __init__(self, head) -> None:
        super().__init__()
        self.a, self.score = nn.Linear(4, 8), nn.Linear(8, 3)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.score(torch.relu(self.a(x))), x)


def last_tokens(scores: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A sequence classifier's head: the score of each sequence's last token, by advanced indexing."""
    return scores[torch.arange(x.shape[0]), torch.full((x.shape[0],), x.shape[1] - 1)]


def test_advanced_indexing_beside_the_channel_axis_keeps_it() -> None:
    assert warnings_of(Scores(last_tokens), torch.zeros(2, 5, 4)) == []
    groups = groups_of(Scores(last_tokens), torch.zeros(2, 5, 4))
    assert groups["a"].prunable and groups["score"].reason == "feeds the model output"


def test_an_operator_not_understood_does_not_warn_for_a_group_that_feeds_the_model_output() -> None:
    def flipped(scores: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return scores + scores.flip(-1)

    assert warnings_of(Scores(flipped), torch.zeros(2, 4)) == []
    groups = groups_of(Scores(flipped), torch.zeros(2, 4))
    assert groups["a"].prunable and "feeds the model output" in groups["score"].reason
    assert "node 'flip'" in groups["score"].reason


@pytest.mark.parametrize(("model", "example"), [(GatedMlp(), torch.zeros(2, 5, 6)), (ConvGlu(), torch.zeros(2, 3, 9))])
def test_a_gated_unit_joins_the_halves_of_its_input_channels(model: nn.Module, example: torch.Tensor) -> None:
    assert warnings_of(model, example) == []
    producer = "gate_up" if isinstance(model, GatedMlp) else "a"
    consumer = "down" if isinstance(model, GatedMlp) else "b"
    group = groups_of(model, example)[producer]
    half = group.num_channels
    assert group.prunable and group.producers == (producer,)
    assert half * 2 == model.get_submodule(producer).weight.shape[0]
    assert {ChannelMember(producer, "weight", 0, 0), ChannelMember(producer, "weight", 0, half)} <= set(group.members)
    assert {ChannelMember(producer, "bias", 0, 0), ChannelMember(producer, "bias", 0, half)} <= set(group.members)
    assert ChannelMember(consumer, "weight", 1) in group.members


def test_the_parts_of_a_split_channel_axis_are_groups_of_their_own() -> None:
    op = Op(lambda h: torch.split(h, [3, 5], dim=1)[1], channels_out=5)
    groups = groups_of(op, torch.zeros(1, 3, 4, 4))
    assert set(groups) == {"a:0", "a:1", "b"} and warnings_of(op, torch.zeros(1, 3, 4, 4)) == []
    assert groups["a:1"].members == (
        ChannelMember("a", "bias", 0, 3), ChannelMember("a", "weight", 0, 3), ChannelMember("b", "weight", 1),
    )  # fmt: skip
    assert groups["a:0"].num_channels == 3 and groups["a:0"].prunable  # channels nothing reads


def test_a_split_inside_a_flattened_channel_pins_the_group() -> None:
    op = Op(lambda h: h.flatten(1).split([24, 104], dim=1)[0].reshape(1, 8, 3, 1))
    texts = warnings_of(op, torch.zeros(1, 3, 4, 4))
    assert texts and "it splits the channel axis inside a channel or a block" in texts[0]


def test_channels_unfolded_into_patches_and_folded_back_stay_one_prunable_group() -> None:
    example = torch.zeros(2, 3, 4, 4)  # a batch of 2: the channels are folded with it
    assert warnings_of(Patches(), example) == []
    group = groups_of(Patches(), example)["a"]
    assert group.prunable and group.producers == ("a", "mix")
    assert set(group.members) == {
        ChannelMember("a", "weight", 0), ChannelMember("a", "bias", 0), ChannelMember("mix", "weight", 1),
        ChannelMember("mix", "weight", 0), ChannelMember("mix", "bias", 0), ChannelMember("b", "weight", 1),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("op", "node"),
    [
        (lambda h: torch.softmax(h.reshape(-1, 2, 2), dim=0).reshape(h.shape), "softmax"),  # over batch and channels
        (lambda h: h.reshape(-1, 2, 2).mean(0, keepdim=True).expand(64, -1, -1).reshape(h.shape), "mean"),
        (lambda h: (h.reshape(-1, 2, 2) + torch.ones(2)).reshape(h.shape), "add"),
    ],
)
def test_folded_channels_read_by_anything_but_a_reshape_or_a_transpose_pin_the_group(op, node: str) -> None:
    texts = warnings_of(Op(op), torch.zeros(2, 3, 4, 4))
    assert texts and f"node '{node}'" in texts[0]
    why = "it reads channels folded together with the axes before them"
    assert texts[0].endswith(f"{why}; channel groups ['a'] stay whole")
