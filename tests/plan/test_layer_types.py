"""Layers by what they are: subclasses of torch layers, their names in configs, and forwards of their own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_amct import ConfigError, compress_model, resolve_plan
from lightning_amct.graph import GraphWarning
from lightning_amct.modules.compressed_layers import CompressedConv2d, CompressedLinear

INT8 = "retrain_data_quant_config { ulq_quantize {} } retrain_weight_quant_config { arq_retrain {} }"
EXAMPLE = torch.zeros(2, 3, 8, 8)


class Linear(nn.Linear):
    """A model library's own Linear, of the same class name, with a forward that changes nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


class DepthwiseConv2d(nn.Conv2d):
    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, padding=1, groups=channels)


class StdConv2d(nn.Conv2d):
    """Weight standardisation in forward: a compressed Conv2d in its place would drop it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.weight.mean((1, 2, 3), keepdim=True), self.weight.std((1, 2, 3), keepdim=True)
        weight = (self.weight - mean) / (std + 1e-5)
        return self._conv_forward(x, weight, self.bias)


class Library(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = StdConv2d(3, 8, 3, padding=1)
        self.dw = DepthwiseConv2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.dw(self.stem(x))).flatten(2).transpose(1, 2)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(x.mean(1))


def test_subclasses_are_planned_and_named_by_their_class_or_their_base() -> None:
    config = INT8 + """
override_layer_types { layer_type: "Linear" retrain_weight_quant_config { arq_retrain { dst_type: INT4 } } }
override_layer_types { layer_type: "Conv2d" retrain_weight_quant_config { arq_retrain { channel_wise: false } } }
override_layer_types { layer_type: "DepthwiseConv2d" retrain_data_quant_config { ulq_quantize { dst_type: INT4 } } }
"""
    plan = resolve_plan(Library(), config, EXAMPLE)
    assert plan["head"].layer_type == "Linear" and plan["head"].quant.weight_bits == 4
    assert plan["pw"].quant.decided_by == "override_layer_types[Conv2d]" and not plan["pw"].quant.channel_wise
    # its own class name is more specific than its base's
    assert plan["dw"].layer_type == "DepthwiseConv2d" and plan["dw"].quant.act_bits == 4
    assert plan["dw"].quant.decided_by == "override_layer_types[DepthwiseConv2d]"


def test_a_subclass_computing_more_than_its_base_is_not_swapped() -> None:
    plan = resolve_plan(Library(), INT8, EXAMPLE)
    assert plan["stem"].quant is None
    ((feature, why),) = plan["stem"].declined
    assert feature == "compressed" and why.startswith("its forward computes mean, std, sub, add, div, conv2d")
    assert why.endswith("not a plain Conv2d: swapping it for a compressed layer would change the model")
    # nn.MultiheadAttention reads out_proj's weight itself: a compressed out_proj would never run
    assert plan["attn.out_proj"].declined == (
        ("compressed", "the model does not call it on the example inputs (its weight may be read directly)"),
    )
    assert "planned but not possible: 2 not compressed (see notes)" in str(plan)

    with pytest.warns(UserWarning, match="^2 of 5 layers stay as they are although the config compresses them: 'stem'"):
        model = compress_model(Library(), INT8, EXAMPLE)
    assert type(model.stem) is StdConv2d
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(model.head, CompressedLinear) and isinstance(model.dw, CompressedConv2d)
    assert type(model.dw.to_float()) is DepthwiseConv2d and type(model.head.to_float()) is Linear
    model(torch.randn(2, 3, 8, 8)).sum().backward()


def test_without_a_graph_a_subclass_with_a_forward_of_its_own_is_left_alone() -> None:
    with pytest.warns(GraphWarning):
        plan = resolve_plan(Library(), INT8)
    assert plan["head"].declined == (("compressed", "its class overrides forward and there is no graph to check it"),)
    assert plan["dw"].quant is not None  # no forward of its own: the Conv2d's


def test_a_type_that_cannot_be_compressed_says_what_can() -> None:
    config = INT8 + ' override_layer_types { layer_type: "MultiheadAttention" retrain_data_quant_config { } }'
    with pytest.raises(ConfigError) as caught:
        resolve_plan(Library(), config, EXAMPLE)
    assert str(caught.value).endswith(
        'layer type "MultiheadAttention" cannot be compressed: compressible types: Linear, Conv1d, Conv2d, Conv3d, '
        "ConvTranspose1d, ConvTranspose2d and their subclasses, and GPT-2's Conv1D (weight (nx, nf), bias (nf,), "
        "attributes nx and nf)"
    )


class LayerDrop(nn.Module):
    """Drops the whole branch at random in training (as transformers' LayerDrop): no graph of that."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.rand(()) < 0.1:
            return torch.zeros_like(x)
        return x


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.drop = LayerDrop()
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        return self.head(torch.relu(x + self.drop(self.b(x))))


def test_the_plan_does_not_depend_on_the_mode_of_the_model() -> None:
    config = INT8 + " prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 "
    config += "ascend_optimized: false } } }"
    model = Residual().train()
    in_train = resolve_plan(model, config, EXAMPLE)
    assert model.training and model.drop.training
    in_eval = resolve_plan(Residual().eval(), config, EXAMPLE)
    assert in_train == in_eval and in_train.pruned("filter").keys() == {"a", "b"}
    assert in_train["head"].quant.fixed_min  # read from the graph


class ActivatedLibrary:
    """A model library whose own ``Conv1D`` has an activation in its forward: swapping it would drop it."""

    class Conv1D(nn.Module):
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.nf, self.nx = nf, nx
            self.weight, self.bias = nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.zeros(nf))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.gelu(torch.addmm(self.bias, x.view(-1, self.nx), self.weight)).view(*x.shape[:-1], self.nf)


class Decoder(nn.Module):
    """GPT-2's MLP: Conv1D layers (transformers.pytorch_utils), a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
        self.c_fc, self.c_proj, self.gelu_fc = conv1d(32, 8), conv1d(8, 32), ActivatedLibrary.Conv1D(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.c_proj(F.gelu(self.c_fc(x)))
        return self.head(self.gelu_fc(x).mean(1))


def test_gpt2_conv1d_layers_are_planned_as_conv1d_where_the_graph_shows_what_they_compute() -> None:
    config = INT8 + """
override_layer_types { layer_type: "Conv1D" retrain_weight_quant_config { arq_retrain { dst_type: INT4 } } }
"""
    plan = resolve_plan(Decoder(), config, torch.zeros(2, 5, 8))
    assert [plan[name].layer_type for name in ("c_fc", "c_proj", "gelu_fc")] == ["Conv1D"] * 3
    assert plan["c_fc"].quant.weight_bits == 4 and plan["c_fc"].quant.decided_by == "override_layer_types[Conv1D]"
    assert plan["head"].quant.weight_bits == 8
    ((feature, why),) = plan["gelu_fc"].declined
    assert feature == "compressed"
    assert why.startswith("its forward computes addmm, gelu, not addmm(bias, input, weight) as a Conv1D does")
    with pytest.raises(ConfigError, match=r"no layer type \"Conv1d\" in Decoder; did you mean 'Conv1D'"):
        resolve_plan(Decoder(), INT8 + ' skip_layer_types: "Conv1d"', torch.zeros(2, 5, 8))
    with pytest.warns(GraphWarning):
        plan = resolve_plan(Decoder(), INT8)  # no graph: transformers' own Conv1D is trusted, another is not
    assert plan["c_fc"].quant is not None and plan["c_proj"].quant is not None
    no_graph = f"a Conv1D of {__name__} is swapped only where the graph shows what it computes, and there is no graph"
    assert plan["gelu_fc"].declined == (("compressed", no_graph),)


class WrittenOutLinear(nn.Linear):
    """Falcon's ``FalconLinear``: ``x @ W.T + b`` with a matrix product instead of ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class ScaledLinear(nn.Linear):
    """More than a Linear: ``2 (x @ W.T) + b``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T * 2 + self.bias


class WrittenOutMlp(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.up = WrittenOutLinear(6, 16, bias=bias)
        self.down = WrittenOutLinear(16, 6, bias=bias)
        self.head = ScaledLinear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(x))))


@pytest.mark.parametrize("bias", [True, False])
def test_a_linear_written_out_as_a_matrix_product_is_compressed_and_channel_pruned(bias: bool) -> None:
    model, x = WrittenOutMlp(bias), torch.randn(4, 5, 6)
    ratio = "prune_ratio: 0.5 ascend_optimized: false"
    config = INT8 + f"prune_config {{ filter_pruner {{ balanced_l2_norm_filter_prune {{ {ratio} }} }} }}"
    plan = resolve_plan(model, config, x)
    assert plan["up"].quant is not None and plan["down"].quant is not None and plan["head"].quant is None
    assert plan["head"].declined[0][1].startswith("its forward computes numpy_T, matmul, mul, add, not a plain Linear")
    assert set(plan.pruned("filter")) == {"up", "down"}
    with pytest.warns(UserWarning, match="^1 of 3 layers stay as they are"):
        compress_model(model, config, x)
    assert isinstance(model.up, CompressedLinear) and model.up.out_features == 8 and model.down.in_features == 8
    assert model.down.out_features == 3 and model.head.in_features == 3  # 6 - round(3.0)
    model(x).sum().backward()


class Recurrent(nn.Module):
    """Most weights in a recurrent layer, which no config compresses; a weight-normalised Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 32, batch_first=True)
        self.head = nn.utils.parametrizations.weight_norm(nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def test_the_plan_names_the_weights_that_stay_float_in_types_no_config_compresses() -> None:
    plan = resolve_plan(Recurrent(), "retrain_data_quant_config { ulq_quantize {} }", torch.zeros(1, 3, 8))
    lstm = sum(p.numel() for p in Recurrent().rnn.parameters())
    assert plan.uncovered == {"": lstm + 32 * 2 + 2 + 2, "LSTM": lstm}  # the parametrization's are the head's
    assert f"left float (types no config compresses): LSTM {lstm:,} parameters (99%)" in str(plan)
