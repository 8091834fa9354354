"""Where ``quantize_outputs`` puts output quantizers: chains, readers, sharing and the cases left alone."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_amct import ConfigWarning, compress_model, resolve_plan
from lightning_amct.export import freeze_model, save_compressed
from lightning_amct.plan import CompressionPlan, OutputSpec

INT8 = "retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }"
EXAMPLE = torch.zeros(1, 3, 8, 8)


class Blocks(nn.Module):
    """Every case of the rule, each on its own layer.

    * ``stem`` → ``stem_bn`` → ``stem_relu``, read by ``a`` and ``b`` (quantized, one quantizer)
      and by the residual add: the site reuses their quantizer;
    * ``a`` → ``a_bn`` → shared ``relu`` (a module called twice) → ``c`` only: no quantizer;
    * ``c`` → ``c_bn`` → residual add: a quantizer of its own, signed;
    * ``b`` → F.relu → max-pool: the site is ``b`` itself (the functional ReLU stays after it);
    * ``twice``, called twice: left alone;
    * ``head`` feeds the model output: left alone.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn, self.stem_relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.a, self.a_bn, self.relu = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.c, self.c_bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 1)
        self.twice = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_relu(self.stem_bn(self.stem(x)))
        y = self.relu(self.c_bn(self.c(self.relu(self.a_bn(self.a(x))))) + x)
        z = F.max_pool2d(F.relu(self.b(x)), 2)
        z = self.twice(self.twice(z))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1) + F.adaptive_avg_pool2d(z, 1), 1))


def test_sites_follow_the_rule_case_by_case() -> None:
    plan = resolve_plan(Blocks(), INT8, EXAMPLE, quantize_outputs=True)
    assert plan.outputs == {
        "stem_relu": OutputSpec(after="stem", bits=8, fixed_min=True, shared_with="a"),
        "c_bn": OutputSpec(after="c", bits=8, fixed_min=False),
        "b": OutputSpec(after="b", bits=8, fixed_min=False),
    }


def test_readers_with_different_settings_get_a_quantizer_of_their_own() -> None:
    config = INT8 + ' override_layer_configs { layer_name: "b" retrain_data_quant_config { ulq_quantize { dst_type: INT4 } } }'
    plan = resolve_plan(Blocks(), config, EXAMPLE, quantize_outputs=True)
    assert plan.outputs["stem_relu"] == OutputSpec(after="stem", bits=8, fixed_min=True, shared_with=None)


def test_layers_not_quantized_get_no_output_quantizer() -> None:
    plan = resolve_plan(Blocks(), INT8 + ' quant_skip_layers: "c"', EXAMPLE, quantize_outputs=True)
    assert "c_bn" not in plan.outputs and "stem_relu" in plan.outputs


def test_a_float_layer_output_read_by_a_quantized_layer_is_quantized_once_at_its_source() -> None:
    plan = resolve_plan(Blocks(), INT8 + ' quant_skip_layers: "stem"', EXAMPLE, quantize_outputs=True)
    # the residual add then reads the values conv a reads, not the float ones
    assert plan.outputs["stem_relu"] == OutputSpec(after="stem_relu", bits=8, fixed_min=True, shared_with="a")
    assert list(plan.outputs) == ["stem_relu", "c_bn", "b"]  # graph order


def test_off_by_default_and_recorded_in_the_plan_data() -> None:
    assert resolve_plan(Blocks(), INT8, EXAMPLE).outputs == {}
    plan = resolve_plan(Blocks(), INT8, EXAMPLE, quantize_outputs=True)
    again = CompressionPlan.from_dict(plan.to_dict())
    assert again == plan and again.outputs == plan.outputs
    assert again != resolve_plan(Blocks(), INT8, EXAMPLE)  # a checkpoint of one is refused by the other
    assert "c_bn (output of c): INT8 IFMR" in str(plan)
    assert "stem_relu (output of stem): the input quantizer of a" in str(plan)


def test_a_config_that_quantizes_nothing_says_that_quantize_outputs_does_nothing() -> None:
    prune_only = "prune_config { n_out_of_m_pruner { l1_selective_prune { n_out_of_m_type: M4N2 } } }"
    with pytest.warns(ConfigWarning, match="quantize_outputs has no effect: the config quantizes no layer"):
        plan = resolve_plan(Blocks(), prune_only, EXAMPLE, quantize_outputs=True)
    assert plan.outputs == {} and "quantize_outputs has no effect" in plan.warnings[-1]


class _Residual(nn.Module):
    """Conv, BatchNorm, then the shortcut add: the block's output is the add's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.conv(x))


class _SqueezeExcite(nn.Module):
    """``x * sigmoid(fc(pool(x)))``: the block's output is the multiply's."""

    def __init__(self) -> None:
        super().__init__()
        self.pool, self.fc, self.gate = nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc(self.pool(x)))


class _AddUsedInside(nn.Module):
    """An add whose output the forward goes on with: no module returns it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) + x) * 0.5


class IntegerOps(nn.Module):
    """Stem (conv, BatchNorm, hard-swish), a residual block, squeeze-excite, then a head conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish()
        self.res, self.se, self.inside = _Residual(), _SqueezeExcite(), _AddUsedInside()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inside(self.se(self.res(self.act(self.stem_bn(self.stem(x)))))))


def test_adds_multiplies_pools_and_sigmoids_get_quantized_inputs_and_output() -> None:
    plan = resolve_plan(IntegerOps(), INT8, EXAMPLE, quantize_outputs=True)
    assert plan.outputs == {
        # the stem conv's output, before the hard-swish that ONNX Runtime runs in float
        "stem_bn": OutputSpec(after="stem", bits=8, fixed_min=False),
        # read by the residual conv and by the add: quantized once, with the conv's quantizer
        "act": OutputSpec(after="act", bits=8, fixed_min=False, shared_with="res.conv"),
        "res.bn": OutputSpec(after="res.conv", bits=8, fixed_min=False),
        # the add's output, read by the pool and the multiply
        "res": OutputSpec(after="res", bits=8, fixed_min=False),
        # the pool's output, read by the squeeze conv: its quantizer
        "se.pool": OutputSpec(after="se.pool", bits=8, fixed_min=False, shared_with="se.fc"),
        "se.fc": OutputSpec(after="se.fc", bits=8, fixed_min=False),
        # (no quantizer for the sigmoid's output: it is a gate, on the fixed gate grid)
        # the multiply's output, read by inside.conv and by the add inside
        "se": OutputSpec(after="se", bits=8, fixed_min=False, shared_with="inside.conv"),
        # a conv's output read by anything but quantized layers: rule 1, whatever reads it
        "inside.conv": OutputSpec(after="inside.conv", bits=8, fixed_min=False),
    }
    # the add inside has no module returning its output: it stays float, so no quantizer for it
    assert "inside" not in plan.outputs
    assert plan.gates == {"se.gate": "sigmoid"}


def test_onnx_runtime_runs_those_operations_in_integers(tmp_path: Path) -> None:
    """What the rules are for: in the deploy model every one of them is an integer kernel, and
    ONNX Runtime agrees with the PyTorch model within one step of the head's input grid."""
    torch.manual_seed(0)
    model = compress_model(IntegerOps(), INT8, torch.zeros(1, 3, 8, 8), quantize_outputs=True)
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 8, 8))  # calibrates every quantizer (and the BatchNorm statistics)
    model.eval()
    paths = save_compressed(model, tmp_path, torch.zeros(1, 3, 8, 8))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(paths["deploy_onnx"]), options, providers=["CPUExecutionProvider"])
    ops = Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    assert ops["QLinearAdd"] == ops["QLinearMul"] == ops["QLinearGlobalAveragePool"] == ops["QLinearSigmoid"] == 1
    # every conv but the head, whose output is the model's (float) output
    assert ops["QLinearConv"] == 4
    report = json.loads(paths["report_json"].read_text())
    assert [row["layer"] for row in report["float_in_deployment"]] == ["head"]

    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    head = freeze_model(model).layers["head"]
    step = head.activation.scale * float(head.weight().abs().sum(dim=(1, 2, 3)).max())
    torch.testing.assert_close(got, expected, rtol=0, atol=step)


class _PaddedConv(nn.Module):
    """A conv block that pads its input with zeros itself (TF-style "same"), as model libraries do."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, stride=2)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), value=self.value))


def test_a_zero_pad_before_a_quantized_conv_keeps_the_grid_of_its_input() -> None:
    # the first conv's ReLU output is read by the block's pad alone: the second conv's own input
    # quantizer does it (two grids in a row would be merged into a third by ONNX Runtime)
    def model(value: float) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), _PaddedConv(value), nn.ReLU())

    plan = resolve_plan(model(0.0), INT8, EXAMPLE, quantize_outputs=True)
    assert "2" not in plan.outputs and "1" not in plan.outputs
    # a pad with another value does not keep the grid: the ReLU output gets a quantizer of its own
    plan = resolve_plan(model(1.0), INT8, EXAMPLE, quantize_outputs=True)
    assert plan.outputs["2"].after == "0"
