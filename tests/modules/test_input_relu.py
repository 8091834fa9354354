"""A ReLU that only one quantized layer reads is applied by that layer in training, with the same values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_amct import compress_model, resolve_plan
from lightning_amct.export.freeze import float_copy, freeze_model
from lightning_amct.modules.apply import compression_state
from lightning_amct.modules.input_norm import restore_norms
from lightning_amct.modules.input_relu import InputReLU, restore_relus
from lightning_amct.plan.specs import CompressionPlan

INT8 = "retrain_data_quant_config { ulq_quantize {} }"


class Block(nn.Module):
    """conv → BN → ReLU → conv, a ReLU module used twice, ReLU → max-pool, F.relu, ReLU → flatten → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        self.conv2, self.twice = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.conv3, self.conv4 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.relu4, self.pooled = nn.ReLU(), nn.Conv2d(4, 4, 1)
        self.relu5, self.flatten, self.fc = nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.relu1(self.bn1(self.conv1(x))))
        x = self.conv4(self.twice(self.conv3(self.twice(x))))
        x = self.pooled(F.max_pool2d(self.relu4(x), 2))
        return self.fc(self.flatten(self.relu5(F.relu(x))[:, :, :3, :3].contiguous()))


class Simple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.relu(self.bn(self.conv(x)))))


def test_the_plan_names_relus_read_by_one_quantized_layer_only() -> None:
    plan = resolve_plan(Block(), INT8, torch.zeros(2, 1, 6, 6))
    # relu1 → conv2 only; "twice" runs twice; relu4 → max-pool; relu5 → a slice, not a reshape
    assert plan.input_relus == {"conv2": "relu1"}
    assert "1 ReLU(s) that the layer reading them applies in training (input_relus):\n  relu1 -> conv2" in str(plan)
    assert CompressionPlan.from_dict(plan.to_dict()).input_relus == plan.input_relus
    pinned = resolve_plan(Block(), INT8 + ' override_layer_configs { layer_name: "conv2" '
                          "retrain_data_quant_config { ulq_quantize { fixed_min: false } } }", torch.zeros(2, 1, 6, 6))
    assert pinned.input_relus == {}  # a clip_min below 0 would quantize x < 0 otherwise than ReLU does


def _trained_copies(x: torch.Tensor) -> list[tuple]:
    """One training step of a compressed ``Simple`` with its ReLU applied by ``fc``, and of a copy with a plain ReLU."""
    torch.manual_seed(0)
    model = compress_model(Simple(), INT8, x[:1]).train()
    assert isinstance(model.relu, InputReLU) and compression_state(model).plan.input_relus == {"fc": "relu"}
    assert restore_norms(model) == {"bn": "fc"}  # the ReLU alone here (tests/modules/test_input_norm.py: the BatchNorm)
    model(x)  # calibration
    plain = copy.deepcopy(model)
    assert restore_relus(plain) == {"relu": "fc"} and type(plain.relu) is nn.ReLU
    results = []
    for variant in (model, plain):
        out = variant(x)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        grads = [p.grad.clone() for p in variant.parameters() if p.grad is not None]
        results.append((out.detach(), *grads))
    return results


def test_applied_by_the_layer_equals_a_plain_relu_bit_for_bit() -> None:
    x = torch.randn(8, 1, 4, 4)
    applied, plain = _trained_copies(x)
    # the output; the weights and biases of conv, bn and fc; conv's two clips, fc's clip_max (fixed_min)
    assert len(applied) == len(plain) == 10
    for a, b in zip(applied, plain):
        assert torch.equal(a, b)


def test_zeros_and_special_values_before_the_relu() -> None:
    """ReLU's gradient is 0 at 0 and at NaN; the quantizer then sees 0 and NaN."""
    torch.manual_seed(1)
    model = compress_model(Simple(), INT8, torch.zeros(1, 1, 4, 4)).train()
    model(torch.randn(8, 1, 4, 4))  # calibration
    model.bn.eval()  # BN as the identity, so that the chosen values reach the ReLU
    with torch.no_grad():
        model.bn.running_mean.zero_()
        model.bn.running_var.fill_(1 - model.bn.eps)
        model.bn.weight.fill_(1.0)
        model.bn.bias.zero_()
        model.conv.weight.zero_()
        model.conv.bias.copy_(torch.tensor([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 0.5]))
    plain = copy.deepcopy(model)
    restore_relus(plain)
    results = []
    for variant in (model, plain):
        out = variant(torch.ones(2, 1, 4, 4))
        out.backward(torch.ones_like(out))
        results.append((out.detach(), *(p.grad for p in variant.parameters() if p.grad is not None)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    relu_input = model.bn(model.conv(torch.ones(1, 1, 4, 4)))[0, :, 0, 0]
    assert relu_input[0] == 0 and torch.isnan(relu_input[2]) and torch.isinf(relu_input[3:5]).all()


def test_a_plain_relu_outside_training_and_in_exported_copies() -> None:
    torch.manual_seed(2)
    x = torch.randn(4, 1, 4, 4)
    model = compress_model(Simple(), INT8, x[:1]).train()
    model(x)
    expected = model.fc(model.flatten(torch.relu(model.bn(model.conv(x)))))
    assert torch.equal(model(x), expected)  # the layer applied it (training, its own node)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model.fc(model.flatten(torch.relu(model.bn(model.conv(x))))))
    for exported in (float_copy(model), freeze_model(model, x[:1]).module):
        assert type(exported.relu) is nn.ReLU
    assert isinstance(model.relu, InputReLU)  # the model itself keeps it


@pytest.mark.parametrize("hooked", [False, True])
def test_a_layer_that_cannot_apply_it_leaves_the_relu_to_run(hooked: bool) -> None:
    torch.manual_seed(3)
    x = torch.randn(4, 1, 4, 4)
    model = compress_model(Simple(), INT8, x[:1]).train()
    model(x)
    answers = []
    defer = model.fc.defer_relu
    model.fc.defer_relu = lambda t: answers.append(defer(t)) or answers[-1]
    if hooked:  # the quantizer's own call must run: the layer quantizes in two nodes
        model.fc.act_quant.register_forward_hook(lambda *args: None)
    model(x)
    assert answers == [not hooked]


def test_hooks_and_calls_from_outside_its_scope_see_relu_values() -> None:
    torch.manual_seed(4)
    x = torch.randn(4, 1, 6, 6)
    model = compress_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)), INT8, x[:1]).train()
    model(x)  # calibration
    assert isinstance(model[1], InputReLU)
    features = model[:2](x)  # a slice ending at the ReLU, as a feature extractor would take it
    assert torch.equal(features, torch.relu(model[0](x)))
    t = torch.randn(8)
    assert torch.equal(model[1](t), torch.relu(t))
    seen = []
    model[1].register_forward_hook(lambda module, args, out: seen.append(bool((out >= 0).all())))
    model(x)
    assert seen == [True]
