"""Where ``quantize_outputs`` puts output quantizers: chains, readers, sharing and the cases left alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_amct import resolve_plan
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
