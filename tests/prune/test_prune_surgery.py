"""Slicing: the demo model, grouped convs, the forward check, the structure record and its errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_amct.demo.model import DemoNet
from lightning_amct.plan.specs import PruneSpec
from lightning_amct.prune import ChannelMember, apply_kept_channels, find_channel_groups, format_report, prune_model

from gated_model import ConvGlu, GatedMlp
from grouped_model import Grouped
from stream_model import RmsResidual, StreamWithoutNormWeights, TiedLanguageModel, TiedWithFixedWidth


def all_filter(model: nn.Module, ratio: float = 0.5, ascend: bool = False) -> dict[str, PruneSpec]:
    layers = (nn.Conv2d, nn.Linear)
    return {n: PruneSpec("filter", ratio, ascend) for n, m in model.named_modules() if isinstance(m, layers)}


@pytest.mark.parametrize(("ratio", "ascend", "keep"), [(0.3, False, 45), (0.3, True, 48), (0.5, True, 32)])
def test_demo_net(ratio: float, ascend: bool, keep: int) -> None:
    torch.manual_seed(0)
    model = DemoNet()
    original = copy.deepcopy(model)
    result = prune_model(model, all_filter(model, ratio, ascend), torch.zeros(2, 1, 8, 8))

    stem = result.kept["stem.conv"]
    assert len(stem) == keep
    assert model.stem.conv.out_channels == model.block.conv2.out_channels == model.block.conv1.in_channels == keep
    assert model.depthwise.conv.groups == model.depthwise.conv.in_channels == keep
    assert torch.equal(model.depthwise.conv.weight, original.depthwise.conv.weight[stem])
    assert torch.equal(model.block.conv2.weight, original.block.conv2.weight[stem][:, result.kept["block.conv1"]])
    assert model.fc.out_features == 10 and "fc" not in result.kept
    assert result.skipped == {
        "fc": "group 'fc' cannot be pruned: feeds the model output",
        "depthwise.conv": "not a channel producer in the captured graph: a depthwise conv, a layer whose weight "
        "is computed (weight_norm, spectral_norm) or one the model does not call",
    }
    assert isinstance(stem[0], int) and stem == sorted(stem)
    model(torch.randn(4, 1, 8, 8)).sum().backward()


def test_a_group_is_pruned_only_when_all_its_producers_are_planned() -> None:
    model = DemoNet()
    specs = {"stem.conv": PruneSpec("filter", 0.5, False), "block.conv1": PruneSpec("filter", 0.25, False)}
    result = prune_model(model, specs, torch.zeros(1, 1, 8, 8))
    assert {k: len(v) for k, v in result.kept.items()} == {"block.conv1": 48}
    assert result.skipped["stem.conv"] == "group 'stem.conv' shares channels with ['block.conv2'], not planned"


def test_a_group_takes_the_smallest_ratio_of_its_producers() -> None:
    model = DemoNet()
    specs = {"stem.conv": PruneSpec("filter", 0.5, False), "block.conv2": PruneSpec("filter", 0.25, False)}
    assert len(prune_model(model, specs, torch.zeros(1, 1, 8, 8)).kept["stem.conv"]) == 48


def test_grouped_conv_is_pruned_per_block() -> None:
    torch.manual_seed(0)
    model = Grouped()
    original = copy.deepcopy(model)
    result = prune_model(model, all_filter(model, 0.3), torch.zeros(1, 3, 6, 6))
    kept_a, kept_g = result.kept["a"], result.kept["g"]
    assert len(kept_a) == 8 and [sum(c // 4 == b for c in kept_a) for b in range(4)] == [2, 2, 2, 2]
    assert len(kept_g) == 20 and [sum(c // 8 == b for c in kept_g) for b in range(4)] == [5] * 4
    expected = torch.stack([original.g.weight[o, [c % 4 for c in kept_a if c // 4 == o // 8]] for o in kept_g])
    assert torch.equal(model.g.weight, expected)
    assert (model.g.in_channels, model.g.out_channels, model.g.groups) == (8, 20, 4)
    rows = [r for c in kept_g for r in (2 * c, 2 * c + 1)]
    assert torch.equal(model.dw.weight, original.dw.weight[rows]) and model.dw.groups == 20
    assert torch.equal(model.out.weight, original.out.weight[:, rows])
    model(torch.randn(2, 3, 6, 6)).sum().backward()


class Decoder(nn.Module):
    """conv -> transposed conv (upsampling) -> BatchNorm -> conv: the transposed conv reads the pruned channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.bn(self.up(torch.relu(self.a(x)))))


def test_a_transposed_conv_loses_input_channels_and_keeps_its_outputs() -> None:
    model = Decoder()
    original = copy.deepcopy(model)
    result = prune_model(model, all_filter(model), torch.zeros(1, 3, 4, 4))
    kept = result.kept["a"]
    assert list(result.kept) == ["a"] and len(kept) == 8
    assert model.up.in_channels == 8 and model.up.out_channels == 8
    assert torch.equal(model.up.weight, original.up.weight[kept])
    assert "transposed convolution" in next(g for g in result.groups if g.key == "up").reason
    model(torch.randn(2, 3, 4, 4)).sum().backward()


class FixedWidth(nn.Module):
    """A view that writes conv ``a``'s 32 channels as a number: the graph holds only the number."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 1)
        self.b = nn.Conv2d(32, 32, 1)
        self.c = nn.Conv2d(32, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x).view(-1, 32, 4, 4)))


def test_a_group_that_breaks_the_forward_is_restored_with_a_warning() -> None:
    model = FixedWidth()
    weight = model.a.weight
    with pytest.warns(UserWarning, match="left group 'a' whole: slicing it breaks the forward pass"):
        result = prune_model(model, all_filter(model), torch.zeros(1, 3, 4, 4))
    assert model.a.weight is weight and model.a.out_channels == 32 and model.b.in_channels == 32
    assert list(result.kept) == ["b"] and model.b.out_channels == 16
    assert result.skipped["a"].startswith("slicing group 'a' breaks the forward pass: RuntimeError")


def test_apply_kept_channels_rejects_a_record_that_does_not_fit() -> None:
    example = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="name group 'nope', which this model lacks"):
        apply_kept_channels(DemoNet(), {"nope": [0]}, example)
    with pytest.raises(ValueError, match="group 'fc' cannot be pruned in this model: feeds the model output"):
        apply_kept_channels(DemoNet(), {"fc": [0, 1]}, example)
    with pytest.raises(ValueError, match="unique, ascending, in \\[0, 64\\)"):
        apply_kept_channels(DemoNet(), {"stem.conv": [3, 1]}, example)
    with pytest.raises(ValueError, match="same, non-zero count"):
        apply_kept_channels(DemoNet(), {"stem.conv": []}, example)


def test_apply_kept_channels_on_the_demo_gives_identical_outputs() -> None:
    torch.manual_seed(0)
    model, example = DemoNet(), torch.randn(3, 1, 8, 8)
    fresh = copy.deepcopy(model)
    result = prune_model(model, all_filter(model, 0.5, True), example)
    rebuilt = apply_kept_channels(fresh, result.kept, example)
    assert rebuilt.kept == result.kept and rebuilt.report == result.report
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    assert torch.equal(fresh(example), model(example))


def test_parameters_are_new_objects_with_the_same_settings() -> None:
    model = DemoNet()
    model.stem.bn.weight.requires_grad_(False)
    old = model.block.conv1.weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the demo needs no warning
        prune_model(model, all_filter(model), torch.zeros(1, 1, 8, 8))
    assert model.block.conv1.weight is not old and isinstance(model.block.conv1.weight, nn.Parameter)
    assert not model.stem.bn.weight.requires_grad and model.stem.bn.bias.requires_grad
    assert model.stem.bn.running_mean.shape == (32,) and "running_mean" in dict(model.stem.bn.named_buffers())


def test_report_table_lists_every_layer_and_the_totals() -> None:
    model = DemoNet()
    result = prune_model(model, all_filter(model), torch.zeros(1, 1, 8, 8))
    table = format_report(result.report)
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "type", "out", "in", "params", "FLOPs", "params", "kept", "sparsity"]
    assert lines[2].startswith("stem.conv") and "64 -> 32" in lines[2]
    assert lines[-1].startswith("total")
    total = result.report[-1]
    assert total["params_before"] == sum(p.numel() for p in DemoNet().parameters())
    assert total["params_after"] == sum(p.numel() for p in model.parameters())
    assert total["flops_after"] < total["flops_before"] / 3


def test_conv1d_batchnorm1d_and_per_channel_prelu_are_sliced() -> None:
    model = nn.Sequential(nn.Conv1d(3, 16, 3), nn.BatchNorm1d(16), nn.PReLU(16), nn.Conv1d(16, 4, 1))
    original = copy.deepcopy(model)
    result = prune_model(model, {"0": PruneSpec("filter", 0.5, False)}, torch.randn(2, 3, 10))
    kept = result.kept["0"]
    assert len(kept) == 8 and model[2].num_parameters == 8
    assert torch.equal(model[2].weight, original[2].weight[kept])
    assert torch.equal(model[3].weight, original[3].weight[:, kept])
    model(torch.randn(2, 3, 10)).sum().backward()


@pytest.mark.parametrize(("model", "example"), [(GatedMlp(), torch.randn(2, 5, 6)), (ConvGlu(), torch.randn(2, 3, 9))])
def test_a_gated_unit_loses_the_same_channels_in_both_halves(model: nn.Module, example: torch.Tensor) -> None:
    torch.manual_seed(0)
    producer, consumer = ("gate_up", "down") if isinstance(model, GatedMlp) else ("a", "b")
    original = copy.deepcopy(model)
    specs = {producer: PruneSpec("filter", 0.5, False)}
    kept = prune_model(model, specs, example).kept[producer]
    half = original.get_submodule(producer).weight.shape[0] // 2
    assert len(kept) == half // 2
    rows = torch.tensor([*kept, *(c + half for c in kept)])
    expected = copy.deepcopy(original)
    for name, tensor in original.get_submodule(producer).named_parameters():
        setattr(expected.get_submodule(producer), name, nn.Parameter(tensor[rows]))
    layer = expected.get_submodule(consumer)
    layer.weight = nn.Parameter(layer.weight[:, kept])
    assert model.get_submodule(producer).weight.shape[0] == len(rows)
    torch.testing.assert_close(model(example), expected(example), rtol=0, atol=0)


def test_a_gated_layer_records_the_rows_it_kept_in_both_halves() -> None:
    model = GatedMlp()
    result = prune_model(model, {"gate_up": PruneSpec("filter", 0.5, False)}, torch.randn(2, 5, 6))
    kept = result.kept["gate_up"]
    assert result.kept_rows(model) == {"gate_up": [*kept, *(c + 8 for c in kept)]}


def test_a_residual_stream_that_rms_norms_read_is_pruned_with_their_weights() -> None:
    torch.manual_seed(0)
    model, example = RmsResidual(), torch.randn(2, 5, 6)
    original = copy.deepcopy(model)
    kept = prune_model(model, all_filter(model), example).kept
    stream = kept["embed"]
    assert set(kept) == {"embed"} and len(stream) == 4  # the residual add makes the mlp's output the stream
    expected = copy.deepcopy(original)
    for name in ("embed", "mlp"):  # the rows of the stream's producers, the columns of its readers
        layer = expected.get_submodule(name)
        layer.weight = nn.Parameter(layer.weight[stream] if name == "embed" else layer.weight[stream][:, stream])
        layer.bias = nn.Parameter(layer.bias[stream])
    expected.head.weight = nn.Parameter(expected.head.weight[:, stream])
    for norm in (expected.norm, expected.final_norm):
        norm.weight = nn.Parameter(norm.weight[stream])
    assert model.final_norm.weight.shape == (4,)
    torch.testing.assert_close(model(example), expected(example), rtol=0, atol=0)


def test_a_stream_that_starts_at_an_embedding_table_tied_to_the_output_layer_keeps_the_tie() -> None:
    torch.manual_seed(0)
    model, ids = TiedLanguageModel(), torch.randint(0, 12, (2, 5))
    original = copy.deepcopy(model)
    groups = {g.key: g for g in find_channel_groups(model, ids)}
    assert {ChannelMember("norm", "weight", 0), ChannelMember("mlp", "weight", 1)} <= set(groups["mlp"].members)
    kept = prune_model(model, all_filter(model), ids).kept["mlp"]
    assert model.head.weight is model.embed.weight and model.embed.weight.shape == (12, 4)
    assert (model.head.in_features, model.embed.embedding_dim) == (4, 4)
    expected = copy.deepcopy(original)
    expected.embed.weight = nn.Parameter(original.embed.weight[:, kept])
    expected.head.weight = expected.embed.weight
    expected.mlp.weight = nn.Parameter(original.mlp.weight[kept][:, kept])
    expected.mlp.bias = nn.Parameter(original.mlp.bias[kept])
    for norm in (expected.norm, expected.final_norm):
        norm.weight = nn.Parameter(norm.weight[kept])
    torch.testing.assert_close(model(ids), expected(ids), rtol=0, atol=0)
    fresh = TiedLanguageModel()  # rebuilt from the record, as a checkpoint load does
    apply_kept_channels(fresh, {"mlp": kept}, ids)
    assert fresh.head.weight is fresh.embed.weight and fresh.embed.weight.shape == (12, 4)


def test_a_head_tied_to_the_embedding_says_why_it_keeps_its_channels() -> None:
    model, ids = TiedLanguageModel(), torch.randint(0, 12, (2, 5))
    result = prune_model(model, all_filter(model), ids)
    assert result.skipped == {
        "head": "its weight is embed's too (tied weights), and channel pruning leaves a Parameter that two "
        "layers hold whole"
    }


def test_a_tied_tensor_is_put_back_with_its_tie_where_slicing_breaks_the_forward_pass() -> None:
    model, ids = TiedWithFixedWidth(), torch.randint(0, 12, (2, 5))
    original = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"left group 'mlp' whole: slicing it breaks the forward pass"):
        result = prune_model(model, all_filter(model), ids)
    assert "mlp" not in result.kept
    assert model.head.weight is model.embed.weight and model.embed.weight.shape == (12, 8)
    assert model.head.in_features == model.embed.embedding_dim == 8
    torch.testing.assert_close(model(ids), original(ids), rtol=0, atol=0)


def test_the_sizes_of_norms_without_weights_follow_the_stream_they_read() -> None:
    torch.manual_seed(0)
    model, ids = StreamWithoutNormWeights(), torch.randint(0, 12, (2, 5))
    original = copy.deepcopy(model)
    kept = prune_model(model, all_filter(model), ids).kept["mlp"]
    assert model.norm.normalized_shape == model.final_norm.normalized_shape == (4,)
    expected = copy.deepcopy(original)
    expected.embed.weight = nn.Parameter(original.embed.weight[:, kept])
    expected.mlp.weight = nn.Parameter(original.mlp.weight[kept][:, kept])
    expected.mlp.bias = nn.Parameter(original.mlp.bias[kept])
    expected.head.weight = nn.Parameter(original.head.weight[:, kept])
    expected.norm.normalized_shape = expected.final_norm.normalized_shape = (4,)
    torch.testing.assert_close(model(ids), expected(ids), rtol=0, atol=0)


class ConvBnStack(nn.Module):
    """Two conv/BN/ReLU blocks of ``dims`` spatial dimensions and a Linear head."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv, norm = {1: (nn.Conv1d, nn.BatchNorm1d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
        self.c1, self.b1 = conv(2, 16, 3, padding=1), norm(16)
        self.c2, self.b2 = conv(16, 16, 3, padding=1), norm(16)
        self.fc = nn.Linear(16, 5)
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        return self.fc(x.mean(tuple(range(2, 2 + self.dims))))


@pytest.mark.parametrize(("dims", "shape"), [(1, (3, 2, 12)), (3, (3, 2, 4, 5, 5))], ids=["Conv1d", "Conv3d"])
def test_conv1d_and_conv3d_lose_channels_as_conv2d_does(dims: int, shape: tuple[int, ...]) -> None:
    """The pruned model computes what the whole one does with the removed channels' BatchNorm
    outputs set to zero (eval mode, statistics away from their defaults)."""
    torch.manual_seed(0)
    model, x = ConvBnStack(dims).eval(), torch.randn(shape)
    for norm in (model.b1, model.b2):
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.bias.data.uniform_(-0.2, 0.2)
    whole = copy.deepcopy(model)
    result = prune_model(model, {name: PruneSpec("filter", 0.5, False) for name in ("c1", "c2")}, x)
    assert (model.c1.out_channels, model.c2.in_channels, model.c2.out_channels, model.fc.in_features) == (8, 8, 8, 8)
    for conv, norm in (("c1", whole.b1), ("c2", whole.b2)):
        removed = sorted(set(range(16)) - set(result.kept[conv]))
        norm.weight.data[removed] = 0.0
        norm.bias.data[removed] = 0.0
    torch.testing.assert_close(model(x), whole(x))
