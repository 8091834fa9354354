"""compress_model / apply_plan without Lightning: swaps, shared inputs, structure records."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_amct import CompressionState, compress_model, compression_state, resolve_plan
from lightning_amct.demo import DemoNet
from lightning_amct.modules.apply import apply_plan
from lightning_amct.modules.compressed_layers import CompressedLayer
from lightning_amct.quant import ActivationQuantizer

INT8 = """
batch_num: 2
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
retrain_weight_quant_config { arq_retrain { dst_type: INT8 } }
"""


class TwoHeads(nn.Module):
    """Two convolutions read the same tensor; a third reads another one."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 4, 1)
        self.right = nn.Conv2d(8, 4, 1)
        self.tail = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.left(y) + self.right(y) + self.tail(y * 2)


def test_layers_reading_one_tensor_share_one_activation_quantizer() -> None:
    model = compress_model(TwoHeads(), INT8, torch.zeros(1, 3, 6, 6))
    assert model.left.act_quant is model.right.act_quant
    assert model.tail.act_quant is not model.left.act_quant
    assert model.left.input_shared and model.right.input_shared and not model.tail.input_shared
    quantizer = model.left.act_quant
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 6, 6))
    assert int(quantizer.calibrated_batches) == 2  # one count a batch, not one a reader
    assert len([p for p in model.parameters() if p is quantizer.clip_max]) == 1


def test_different_settings_on_one_tensor_do_not_share() -> None:
    config = INT8 + 'override_layer_configs { layer_name: "right" retrain_data_quant_config { ulq_quantize { dst_type: INT4 } } }'
    model = compress_model(TwoHeads(), config, torch.zeros(1, 3, 6, 6))
    assert model.left.act_quant is not model.right.act_quant
    assert model.right.act_quant.num_bits == 4


def test_compress_model_swaps_only_planned_layers_and_keeps_parameters() -> None:
    model = DemoNet()
    weights = {name: p for name, p in model.named_parameters()}
    compress_model(model, INT8 + 'skip_layers: "stem.conv"', torch.zeros(1, 1, 8, 8))
    assert not isinstance(model.stem.conv, CompressedLayer)
    assert all(isinstance(m, CompressedLayer) for m in (model.block.conv1, model.pointwise.conv, model.fc))
    for name, param in model.named_parameters():
        if name in weights:
            assert param is weights[name]
    with pytest.raises(RuntimeError, match="already compressed"):
        apply_plan(model, compression_state(model).plan)


def test_plan_naming_a_layer_the_model_lacks() -> None:
    plan = resolve_plan(DemoNet(), INT8, torch.zeros(1, 1, 8, 8))
    other = nn.Sequential(nn.Conv2d(1, 4, 3))
    with pytest.raises(ValueError, match="the plan names layer 'stem.conv' but the model has no such layer"):
        apply_plan(other, plan)


def test_channel_pruning_needs_example_inputs() -> None:
    config = "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 } } }"
    with pytest.raises(ValueError, match="example_input_array"):
        compress_model(DemoNet(), config)


def test_structure_record_rebuilds_the_same_model() -> None:
    config = INT8 + "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 } } }"
    example = torch.zeros(1, 1, 8, 8)
    torch.manual_seed(0)
    trained = compress_model(DemoNet(), config, example)
    record = compression_state(trained).to_record()
    assert record["kept_channels"]
    torch.manual_seed(1)
    fresh = DemoNet()
    state = CompressionState.from_record(record)
    apply_plan(fresh, state.plan, example, state.kept_channels, state.config_text)
    fresh.load_state_dict(trained.state_dict())  # strict: same keys and shapes
    trained.eval()
    fresh.eval()
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)
    assert compression_state(fresh).kept_channels == compression_state(trained).kept_channels


class SharedAcrossDepth(nn.Module):
    """ALBERT's pattern: one Linear run at two depths, its second input about ten times the first."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.block, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.inp(x) * 0.1)
        return self.head(self.block(torch.tanh(h) * 10.0))


def test_a_layer_run_twice_a_forward_calibrates_its_one_grid_on_both_calls() -> None:
    torch.manual_seed(0)
    model, x = SharedAcrossDepth(), torch.randn(4, 8)
    config = "retrain_data_quant_config { ulq_quantize {} } retrain_weight_quant_config { arq_retrain {} }"
    plan = resolve_plan(model, config, x)
    assert plan["block"].quant.calls == 2 and plan["head"].quant.calls == 1
    assert "INT8 IFMR (2 calls)" in str(plan)
    compress_model(model, config, x)
    inputs: list[torch.Tensor] = []
    model.block.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    model.train()(x)  # the calibration batch (batch_num 1): both calls
    quantizer = model.block.act_quant
    assert quantizer.calibrated and int(quantizer.calibrated_batches) == 2
    expected = ActivationQuantizer(8, fixed_min=False).train()
    expected(torch.cat([t.flatten() for t in inputs]))  # IFMR over both calls' values at once
    assert inputs[1].abs().max() > 5 * inputs[0].abs().max()
    assert torch.equal(quantizer.clip_max, expected.clip_max) and torch.equal(quantizer.clip_min, expected.clip_min)
