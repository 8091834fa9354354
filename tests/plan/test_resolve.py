"""Precedence, unions and model-dependent defaults of resolve_plan on a model of many layer types."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_amct import ConfigError, ConfigWarning, resolve_plan
from lightning_amct.demo import DemoNet
from lightning_amct.graph import GraphError, GraphWarning

GLOBAL_INT8 = """
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
retrain_weight_quant_config { arq_retrain { dst_type: INT8 } }
"""


class Zoo(nn.Module):
    """Several layers of each quantizable type, some reading ReLU outputs, some not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.seq = nn.Conv1d(4, 4, 1)
        self.fc1 = nn.Linear(4, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_b(self.relu(self.conv_a(x)))
        x = self.bn(self.up(self.conv_dw(x)))
        x = self.seq(torch.flatten(self.pool(x), 2))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


EXAMPLE = torch.zeros(2, 3, 8, 8)
LAYERS = ["conv_a", "conv_b", "conv_dw", "up", "seq", "fc1", "fc2"]


def test_global_settings_and_model_defaults() -> None:
    plan = resolve_plan(Zoo(), GLOBAL_INT8, EXAMPLE)
    assert list(plan) == LAYERS
    assert all(plan[n].quant.act_bits == 8 and plan[n].quant.weight_bits == 8 for n in LAYERS)
    assert all(plan[n].quant.decided_by == "global" for n in LAYERS)
    # fixed_min: from a ReLU module (conv_b), a torch.relu call (fc2); not after conv/bn/pool.
    assert {n for n in LAYERS if plan[n].quant.fixed_min} == {"conv_b", "fc2"}
    # channel_wise: convolutions yes, Linear no.
    assert {n for n in LAYERS if plan[n].quant.channel_wise} == {"conv_a", "conv_b", "conv_dw", "up", "seq"}
    assert plan["conv_a"].quant.act_clip is None and plan["conv_a"].quant.weight_algo == "arq"


def test_type_override_is_atomic_and_name_override_wins() -> None:
    config = """
retrain_data_quant_config { ulq_quantize { dst_type: INT4 clip_max_min { clip_max: 2 clip_min: -1 } fixed_min: false } }
retrain_weight_quant_config { ulq_retrain { dst_type: INT4 channel_wise: false } }
override_layer_types { layer_type: "Linear" retrain_weight_quant_config { arq_retrain { channel_wise: true } } }
override_layer_configs { layer_name: "fc2" retrain_data_quant_config { ulq_quantize { dst_type: INT4 } } }
"""
    plan = resolve_plan(Zoo(), config, EXAMPLE)
    conv = plan["conv_a"].quant
    assert (conv.act_bits, conv.act_clip, conv.fixed_min, conv.weight_algo, conv.weight_bits, conv.channel_wise) == (
        4, (2.0, -1.0), False, "ulq", 4, False,
    )  # fmt: skip
    fc1 = plan["fc1"].quant  # the type override replaces everything: schema defaults fill the rest
    assert (fc1.act_bits, fc1.act_clip, fc1.fixed_min, fc1.weight_algo, fc1.weight_bits, fc1.channel_wise) == (
        8, None, False, "arq", 8, True,
    )  # fmt: skip
    assert fc1.decided_by == "override_layer_types[Linear]"
    fc2 = plan["fc2"].quant  # name beats type; atomic again: weights take the Linear defaults
    assert (fc2.act_bits, fc2.fixed_min, fc2.weight_algo, fc2.weight_bits, fc2.channel_wise) == (4, True, "arq", 8, False)
    assert fc2.decided_by == "override_layer_configs[fc2]"


def test_skip_lists_are_unions_per_feature() -> None:
    config = GLOBAL_INT8 + """
prune_config { n_out_of_m_pruner { l1_selective_prune { update_freq: 3 } } }
skip_layers: "conv_a"
quant_skip_layers: "conv_b"
quant_skip_types: "Linear"
regular_prune_skip_layers: "up"
skip_layer_types: "Conv1d"
"""
    plan = resolve_plan(Zoo(), config, EXAMPLE)
    quantized = {n for n in LAYERS if plan[n].quant is not None}
    pruned = {n for n in LAYERS if plan[n].prune is not None}
    assert quantized == {"conv_dw", "up"}
    assert pruned == {"conv_b", "fc1", "fc2"}
    # a depthwise conv has 1 input channel per group: 4:2 would keep every weight, and says so
    assert plan["conv_dw"].declined == (
        ("4:2-pruned", "4:2 keeps every weight of a layer with 1 input channel(s) per group (it needs more than 2)"),
    )
    assert "not 4:2-pruned: 4:2 keeps every weight" in str(plan)
    assert "planned but not possible: 1 not 4:2-pruned (see notes)" in str(plan)
    assert plan["fc1"].prune.kind == "n_out_of_m" and plan["fc1"].prune.update_freq == 3
    assert "quant skipped by quant_skip_types" in plan["fc1"].skip_reason
    assert "skip_layers" in plan["conv_a"].skip_reason


def test_quant_override_beats_skip_but_prune_skip_beats_override() -> None:
    config = GLOBAL_INT8 + """
prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.25 } } }
skip_layers: "conv_b"
override_layer_configs {
  layer_name: "conv_b"
  retrain_data_quant_config { ulq_quantize { dst_type: INT4 } }
  prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 } } }
}
"""
    with pytest.warns(ConfigWarning) as caught:
        plan = resolve_plan(Zoo(), config, EXAMPLE)
    messages = [str(w.message) for w in caught]
    assert any("the override wins" in m for m in messages)
    assert any("the skip list wins" in m for m in messages)
    assert plan["conv_b"].quant.act_bits == 4
    assert plan["conv_b"].prune is None
    assert "despite skip_layers" in plan["conv_b"].skip_reason
    assert len(plan.warnings) == 2


def test_filter_pruning_applies_to_producers_only() -> None:
    config = "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 ascend_optimized: false } } }"
    plan = resolve_plan(Zoo(), config, EXAMPLE)
    # only the layers that really lose channels: not the classifier, whose outputs are the model's
    # (conv_b's channels go through a depthwise conv into a transposed conv, which reads fewer)
    assert set(plan.pruned("filter")) == {"conv_a", "conv_b", "seq", "fc1"}  # a Conv1d too
    assert plan["fc2"].declined == (("filter-pruned", "group 'fc2' cannot be pruned: feeds the model output"),)
    assert "not filter-pruned: group 'fc2' cannot be pruned: feeds the model output" in str(plan)
    assert plan["conv_a"].prune.prune_ratio == pytest.approx(0.3) and not plan["conv_a"].prune.ascend_optimized
    assert "depthwise" in plan["conv_dw"].skip_reason
    assert plan["up"].declined == (("filter-pruned", "filter pruning removes output channels of Conv1d, Conv2d, Conv3d, Linear and transformers' Conv1D (GPT-2) only, not of ConvTranspose2d"),)
    assert "planned but not possible: 2 not filter-pruned (see notes)" in str(plan)  # up and fc2
    assert not plan.quantized


@pytest.mark.parametrize(
    ("config", "field", "expected"),
    [
        ('skip_layers: "conv_x"\n' + GLOBAL_INT8, "skip_layers[0]", "'conv_a'"),
        (GLOBAL_INT8 + 'quant_skip_types: "Linaer"', "quant_skip_types[0]", "did you mean 'Linear'"),
        (
            GLOBAL_INT8 + 'override_layer_configs { layer_name: "fc3" retrain_data_quant_config { ulq_quantize {} } }',
            "override_layer_configs[0].layer_name",
            "did you mean 'fc",
        ),
        (
            GLOBAL_INT8 + 'override_layer_types { layer_type: "BatchNorm2d" retrain_data_quant_config { ulq_quantize {} } }',
            "override_layer_types[0].layer_type",
            "cannot be compressed",
        ),
        (
            GLOBAL_INT8 + 'override_layer_types { layer_type: "Conv3d" retrain_data_quant_config { ulq_quantize {} } }',
            "override_layer_types[0].layer_type",
            'no layer type "Conv3d"',
        ),
        ('skip_layers: "FC1"\n' + GLOBAL_INT8, "skip_layers[0]", "did you mean 'fc1'"),
        ('skip_layers: "bn"\n' + GLOBAL_INT8, "skip_layers[0]", 'layer "bn" (BatchNorm2d) is no layer the config compresses'),
        (GLOBAL_INT8 + 'skip_layer_types: "ReLU"', "skip_layer_types[0]", 'layer type "ReLU" is no layer the config'),
        (
            'override_layer_configs { layer_name: "up" prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 } } } }',
            "override_layer_configs[0].layer_name",
            "cannot be filter-pruned",
        ),
        (
            'override_layer_types { layer_type: "ConvTranspose2d" prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 } } } }',
            "override_layer_types[0].layer_type",
            "cannot be filter-pruned",
        ),
    ],
)
def test_names_and_types_the_model_lacks(config: str, field: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_plan(Zoo(), config, EXAMPLE)
    err = info.value
    assert expected in str(err)
    assert err.field == field
    assert err.line is not None and err.column is not None
    assert str(err).startswith(f"<text>:{err.line}:{err.column}: ")


def test_reference_position_points_at_the_offending_line(tmp_path) -> None:
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(GLOBAL_INT8 + '# comment\nskip_layers: "conv_a"\nskip_layers: "fc9"\n')
    with pytest.raises(ConfigError) as info:
        resolve_plan(Zoo(), cfg, EXAMPLE)
    assert info.value.line == 6
    assert info.value.field == "skip_layers[1]"
    assert str(info.value).startswith(f"{cfg}:6:")


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        if x.sum() > 0:  # a branch on tensor values: no graph can be captured
            x = x * 2
        return self.head(self.fc(x))


def test_a_model_without_a_graph_is_quantized_with_one_notice() -> None:
    with pytest.warns(GraphWarning) as record:
        plan = resolve_plan(DataDependent(), GLOBAL_INT8, torch.ones(2, 4))
    (notice,) = [str(w.message) for w in record if w.category is GraphWarning]
    assert "\n" not in notice
    assert notice.startswith("cannot capture the graph of DataDependent: DataDependentError: the model reads a tensor")
    assert "test_resolve.py:" in notice and "if x.sum() > 0:" in notice  # the line that stops it
    assert notice.endswith("every layer has an activation quantizer of its own")
    assert plan["fc"].quant.fixed_min is False and plan.shared_inputs == {}
    assert plan.warnings == (notice,)
    with pytest.warns(GraphWarning):
        plan = resolve_plan(DataDependent(), "retrain_data_quant_config { ulq_quantize { fixed_min: true } }")
    assert plan["fc"].quant.fixed_min is True  # the config decides


def test_without_example_inputs_the_notice_says_how_to_give_them() -> None:
    with pytest.warns(GraphWarning, match="no example inputs to capture the graph of Zoo with: set the"):
        plan = resolve_plan(Zoo(), GLOBAL_INT8)
    assert not any(lp.quant.fixed_min for lp in plan.values())


def test_example_inputs_the_model_cannot_run_are_named_as_the_cause() -> None:
    config = "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 } } }"
    with pytest.raises(GraphError, match=r"cannot capture the graph of Zoo: RuntimeError: .*give example inputs that "
                       r"forward runs on \(their number, shape and dtype\)"):  # fmt: skip
        resolve_plan(Zoo(), config, torch.zeros(1, 16))  # not an image


def test_a_quantization_plan_on_inputs_the_model_cannot_run_asks_about_them() -> None:
    with pytest.warns(GraphWarning, match=r"RuntimeError: .* \(are these the inputs forward takes\?\); quantizing"):
        resolve_plan(Zoo(), GLOBAL_INT8, torch.zeros(1, 16))


def test_a_pruning_plan_without_example_inputs_says_what_it_cannot_know() -> None:
    config = "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 } } }"
    with pytest.warns(GraphWarning, match="this plan lists what the config asks for .* pass example_inputs"):
        plan = resolve_plan(Zoo(), config)
    assert plan["fc2"].prune is not None  # the classifier's outputs: not traced without inputs


@pytest.mark.parametrize(
    "config",
    [GLOBAL_INT8, "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 } } }"],
)
def test_features_that_need_the_graph_fail_in_one_line_naming_the_obstacle(config: str) -> None:
    outputs = "filter_pruner" not in config
    with pytest.raises(GraphError) as caught:
        resolve_plan(DataDependent(), config, torch.ones(2, 4), quantize_outputs=outputs)
    message = str(caught.value)
    assert "\n" not in message and "if x.sum() > 0:" in message
    assert message.startswith("quantize_outputs needs the model's graph" if outputs else "channel pruning needs")
    assert message.endswith("or leave it out")


def test_file_wide_settings() -> None:
    plan = resolve_plan(Zoo(), GLOBAL_INT8 + "batch_num: 4\nfakequant_precision_mode: FORCE_FP16_QUANT", EXAMPLE)
    assert plan.batch_num == 4 and plan.force_fp16_quant


def test_skipping_a_block_names_the_layers_in_it() -> None:
    with pytest.raises(ConfigError, match=r'skip_layers\[0\]: layer "block" \(ResidualBlock\) is no layer the config '
                       r"compresses, .*: the layers in it are block.conv1, block.conv2"):  # fmt: skip
        resolve_plan(DemoNet(), 'skip_layers: "block"\n' + GLOBAL_INT8, torch.zeros(2, 1, 8, 8))
