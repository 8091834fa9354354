"""A max-pool that only one quantized layer reads is applied by that layer in training, with torch's
values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_amct import compress_model, resolve_plan
from lightning_amct.export.freeze import float_copy, freeze_model
from lightning_amct.modules.apply import compression_state
from lightning_amct.modules.input_pool import InputMaxPool2d, restore_pools
from lightning_amct.modules.input_relu import InputReLU, restore_relus
from lightning_amct.plan.specs import CompressionPlan

INT8 = "retrain_data_quant_config { ulq_quantize {} } retrain_weight_quant_config { arq_retrain {} }"


class PoolNet(nn.Module):
    """conv → ReLU → max-pool → conv (the pool the layer applies); then a pool read by two layers,
    a functional pool and a pool before a flatten, which stay torch's. ``checkpointed``: the second
    conv runs under activation checkpointing, alone (``"layer"``) or with the pool (``"block"``)."""

    def __init__(self, checkpointed: str | None = None) -> None:
        super().__init__()
        self.conv1, self.relu1, self.pool = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2, self.relu2, self.shared = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        self.left, self.right = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)
        self.last, self.flatten, self.fc = nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 3)
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        if self.checkpointed == "block":
            x = checkpoint(lambda t: self.conv2(self.pool(t)), x, use_reentrant=True)
        elif self.checkpointed == "layer":
            x = checkpoint(self.conv2, self.pool(x), use_reentrant=True)
        else:
            x = self.conv2(self.pool(x))
        x = self.shared(self.relu2(x))
        x = torch.cat([self.left(x), self.right(x)], 1)
        return self.fc(self.flatten(self.last(F.max_pool2d(x, 1))))


def _compressed(seed: int, checkpointed: str | None = None) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(8, 1, 8, 8)
    model = compress_model(PoolNet(checkpointed), INT8, x[:1]).train()
    model(x)  # calibration
    return model, x


def _step(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = model(x.requires_grad_(True))
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    results = {"out": out.detach(), "x.grad": x.grad}
    results.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    x.grad = None
    return results


def test_the_plan_names_pools_read_by_one_quantized_layer_only() -> None:
    plan = resolve_plan(PoolNet(), INT8, torch.zeros(2, 1, 8, 8))
    # "shared" feeds two layers, "last" a flatten, F.max_pool2d is no module
    assert plan.input_pools == {"conv2": "pool"}
    assert plan.input_relus == {"conv2": "relu1"}  # through the pool it applies ("relu2" feeds a pool of two readers)
    assert "1 max-pool(s) that the layer reading them applies in training (input_pools):\n  pool -> conv2" in str(plan)
    assert CompressionPlan.from_dict(plan.to_dict()).input_pools == plan.input_pools
    older = {key: value for key, value in plan.to_dict().items() if key != "input_pools"}  # a plan saved before pools
    assert CompressionPlan.from_dict(older).input_pools == {}
    skipped = resolve_plan(PoolNet(), INT8 + ' skip_layers: "conv2"', torch.zeros(2, 1, 8, 8))
    assert skipped.input_pools == {}


def test_applied_by_the_layer_equals_torchs_pool_bit_for_bit() -> None:
    model, x = _compressed(0)
    assert isinstance(model.pool, InputMaxPool2d) and type(model.shared) is nn.MaxPool2d
    assert isinstance(model.relu1, InputReLU)  # the ReLU before the pool: applied by the layer too
    plain = copy.deepcopy(model)
    assert restore_pools(plain) == {"pool": "conv2"} and type(plain.pool) is nn.MaxPool2d
    assert restore_relus(plain) == {"relu1": "conv2"}
    applied, expected = _step(model, x), _step(plain, x)
    assert applied.keys() == expected.keys() and len(applied) == 18  # out, x, 4 layers' w, b, 2 clips
    for name, value in expected.items():
        assert torch.equal(applied[name], value), name  # the clips' gradients too: sums over the same maxima


def test_the_layer_pools_in_its_node_and_keeps_the_maxima_not_the_pools_input() -> None:
    model, x = _compressed(1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        model(x)
    assert ((8, 4, 4, 4), torch.int32) in saved and ((8, 4, 4, 4), torch.float32) in saved  # maxima, places
    assert ((8, 4, 8, 8), torch.float32) not in saved  # the pool's input: 2x the maxima and places together
    pooled = []
    model.conv2.register_forward_hook(lambda module, args, out: pooled.append(args[0].shape))
    model(x)  # a hook on the layer sees the layer's input: the pool runs
    assert pooled == [(8, 4, 4, 4)]
    model.conv2._forward_hooks.clear()
    seen = []
    model.pool.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    model(x)  # a hook on the pool sees the pooled values
    assert seen == [(8, 4, 4, 4)]
    model.pool._forward_hooks.clear()
    assert model.pool(x.expand(8, 4, 8, 8).contiguous()).shape == (8, 4, 4, 4)  # called from outside its scope
    answers = []
    defer = model.conv2.defer_pool
    model.conv2.defer_pool = lambda *args, **kwargs: answers.append(defer(*args, **kwargs)) or answers[-1]
    model(x)
    assert answers == [True]


def test_plain_pools_outside_training_and_in_exported_copies() -> None:
    model, x = _compressed(2)
    model.eval()
    with torch.no_grad():
        expected = model.conv2(F.max_pool2d(model.relu1(model.conv1(x)), 2))
        assert torch.equal(model.conv2(model.pool(model.relu1(model.conv1(x)))), expected)
    for exported in (float_copy(model), freeze_model(model, x[:1]).module):
        assert type(exported.pool) is nn.MaxPool2d
    assert isinstance(model.pool, InputMaxPool2d)  # the model itself keeps it
    assert compression_state(model).plan.input_pools == {"conv2": "pool"}


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("checkpointed", ["block", "layer"])
def test_activation_checkpointing_pools_again_in_the_second_run(checkpointed: str) -> None:
    """Reentrant checkpointing runs the region again in the backward pass: a region holding the
    pool and the layer, and a region of the layer alone, which then reads the pool's input again."""
    model, x = _compressed(3, checkpointed)
    plain = copy.deepcopy(model)
    plain.checkpointed = None
    restore_pools(plain)
    restore_relus(plain)
    applied, expected = _step(model, x), _step(plain, x)
    for name, value in expected.items():
        assert torch.equal(applied[name], value), name


def test_a_batchnorm_before_the_relu_and_the_pool_stays_torchs() -> None:
    """conv → BN → ReLU → max-pool → conv (a VGG block with BatchNorm): the layer applies the ReLU
    and the pool, the BatchNorm runs as torch's."""
    torch.manual_seed(5)
    block = [nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)]
    model = nn.Sequential(*block, nn.Conv2d(4, 2, 1))
    x = torch.randn(8, 1, 8, 8)
    plan = resolve_plan(model, INT8, x[:1])
    assert (plan.input_pools, plan.input_relus, plan.input_norms) == ({"4": "3"}, {"4": "2"}, {})
    model = compress_model(model, INT8, x[:1]).train()
    model(x)  # calibration
    plain = copy.deepcopy(model)
    restore_pools(plain)
    restore_relus(plain)
    applied, expected = _step(model, x), _step(plain, x)
    for name, value in expected.items():
        assert torch.equal(applied[name], value), name


class Features(nn.Module):
    """conv → ReLU → max-pool → conv, whose forward may return the pooled features instead: by an
    argument, or by an attribute (a path the plan's trace cannot tell apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu, self.pool = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 2, 1)
        self.features_only = False

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor:
        pooled = self.pool(self.relu(self.conv1(x)))
        return pooled if features or self.features_only else self.conv2(pooled)


def test_a_forward_that_takes_another_path_than_the_traced_one_is_never_wrong_silently() -> None:
    torch.manual_seed(6)
    x = torch.randn(4, 1, 8, 8)
    model = compress_model(Features(), INT8, x[:1]).train()
    model(x)  # calibration
    expected = model.pool(torch.relu(model.conv1(x)))  # the pool called from outside its scope: torch's
    assert torch.equal(model(x, features=True), expected)  # a flag: the modules run as they are
    assert torch.equal(model(x, True), expected)
    model.features_only = True  # the same path without a flag: the layer never applies what was left to it
    with pytest.raises(RuntimeError, match="'relu' to 'conv2', 'pool' to 'conv2' and ended without applying them"):
        model(x)
    model.features_only = False
    assert model(x).shape == (4, 2, 4, 4)  # the next forward is as usual


def test_a_pool_called_again_before_its_reader_applied_it_raises() -> None:
    """A hook that calls the pool in the middle of the forward would get its input back."""
    torch.manual_seed(7)
    x = torch.randn(4, 1, 8, 8)
    layers = [nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 2, 1)]
    model = compress_model(nn.Sequential(*layers), INT8, x[:1]).train()
    model(x)  # calibration
    handle = model[0].register_forward_hook(lambda module, args, out: model[2](torch.relu(out)))
    with pytest.raises(RuntimeError, match="InputMaxPool2d was called again in this training forward before"):
        model(x)
    handle.remove()
    assert model(x).shape == (4, 2, 4, 4)
