"""A BatchNorm whose ReLU only one quantized layer reads is applied by that layer in training:
torch's values where the statistics are exact, torch's BatchNorm wherever the layer cannot."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_amct import compress_model, resolve_plan
from lightning_amct.export.freeze import float_copy
from lightning_amct.modules.apply import compression_state
from lightning_amct.modules.compressed_layers import IN_NODE
from lightning_amct.modules.input_norm import restore_norms
from lightning_amct.modules.input_relu import restore_relus
from lightning_amct.plan.specs import CompressionPlan

INT8 = "retrain_data_quant_config { ulq_quantize {} }"


class Blocks(nn.Module):
    """conv → BN → ReLU → conv (the BN fusable), BN read twice, a BatchNorm subclass,
    BN → ReLU → flatten → Linear (fusable)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(4, 4, 3, padding=1), Subclassed(4), nn.ReLU()
        self.conv4, self.bn4, self.relu4 = nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2), nn.ReLU()
        self.fc = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.relu1(self.bn1(self.conv1(x))))
        normalised = self.bn2(x)
        x = self.conv3(self.relu2(normalised)) + normalised  # bn2's output read twice
        x = self.conv4(self.relu3(self.bn3(x)))
        return self.fc(self.relu4(self.bn4(x)).flatten(1))


class Subclassed(nn.BatchNorm2d):
    """A BatchNorm of a model library's own: its forward may compute something else."""


def test_the_plan_names_batchnorms_that_only_an_input_relu_reads() -> None:
    plan = resolve_plan(Blocks(), INT8, torch.zeros(2, 1, 6, 6))
    assert plan.input_relus == {"conv2": "relu1", "conv3": "relu2", "conv4": "relu3", "fc": "relu4"}
    assert plan.input_norms == {"conv2": "bn1", "fc": "bn4"}
    assert "2 BatchNorm(s) that the layer reading their ReLU applies in training (input_norms):" in str(plan)
    assert "  bn1 -> conv2\n  bn4 -> fc" in str(plan)
    assert CompressionPlan.from_dict(plan.to_dict()).input_norms == plan.input_norms


#: A sample's plane of 32 values in one, two and three dimensions.
PLANES = {1: (32,), 2: (4, 8), 3: (2, 4, 4)}


def _exact_batch(requires_grad: bool = True, dims: int = 2) -> torch.Tensor:
    """``(4, 3, *PLANES[dims])``: channel ``c`` holds ``c - 1 + d``, ``d`` 62 times 2, 62 times -2,
    4 times 0: mean ``c - 1``, variance 3.875, which ``eps`` 0.125 makes 4; every sum and the
    deviation exact."""
    offsets = torch.tensor([2.0] * 62 + [-2.0] * 62 + [0.0] * 4)
    generator = torch.Generator().manual_seed(0)
    channels = [(c - 1.0) + offsets[torch.randperm(128, generator=generator)] for c in range(3)]
    batch = torch.stack(channels).view(3, 4, *PLANES[dims]).transpose(0, 1)
    return batch.contiguous().requires_grad_(requires_grad)


def _normalised_model(dims: int = 2, **norm_options: object) -> nn.Module:
    """BN (the inverse deviation 1/2 exactly) → ReLU → conv, compressed and calibrated."""
    torch.manual_seed(0)
    norm = getattr(nn, f"BatchNorm{dims}d")(3, eps=0.125, **norm_options)
    model = nn.Sequential(norm, nn.ReLU(), getattr(nn, f"Conv{dims}d")(3, 4, 3, padding=1))
    if model[0].weight is not None:
        with torch.no_grad():  # dyadic: z * a + b stays exact
            model[0].weight.copy_(torch.tensor([1.0, 0.5, 2.0]))
            model[0].bias.copy_(torch.tensor([0.25, -0.5, 0.125]))
    model = compress_model(model, INT8, _exact_batch(False, dims)).train()
    model(_exact_batch(False, dims))  # calibration
    return model


def _runs_torch_batch_norm(output: torch.Tensor) -> bool:
    """Whether ``output``'s autograd graph holds a BatchNorm node (torch's BatchNorm ran)."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "BatchNorm" in type(node).__name__:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _step(model: nn.Module, dims: int) -> dict[str, torch.Tensor]:
    """One forward and backward on :func:`_exact_batch`: the output, the gradients, BatchNorm's buffers."""
    x = _exact_batch(dims=dims)
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
    results = {"output": out, "input gradient": x.grad}
    results.update({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    results.update(dict(model[0].named_buffers()))
    return results


#: Sums that the fused passes add in another order than torch's BatchNorm and ULQ's kernel (plane by
#: plane): equal within float32 rounding.
REORDERED_SUMS = {"input gradient", "0.weight", "0.bias", "running_var", "2.act_quant.clip_max"}


@pytest.mark.parametrize(
    "dims, options",
    [(2, {}), (2, {"momentum": None}), (2, {"affine": False}), (2, {"track_running_stats": False}), (1, {}), (3, {})],
)
def test_applied_by_the_layer_equals_torchs_batch_norm_where_the_statistics_are_exact(dims: int, options: dict) -> None:
    model = _normalised_model(dims, **options)
    plain = copy.deepcopy(model)
    assert type(model[0]).__name__ == f"InputBatchNorm{dims}d" and restore_norms(plain) == {"0": "2"}
    assert type(plain[0]) is getattr(nn, f"BatchNorm{dims}d")
    fused, reference = _step(model, dims), _step(plain, dims)
    assert not _runs_torch_batch_norm(fused["output"]) and _runs_torch_batch_norm(reference["output"])
    assert fused.keys() == reference.keys() and {"output", "2.weight", "2.act_quant.clip_max"} <= fused.keys()
    for name, value in fused.items():
        if name in REORDERED_SUMS:
            torch.testing.assert_close(value, reference[name], rtol=1e-6, atol=1e-7, msg=name)
        else:  # the output, the conv's weight and bias gradients, the running mean, the batch count
            assert torch.equal(value, reference[name]), name
    if "num_batches_tracked" in fused:
        assert fused["num_batches_tracked"].item() == 2  # calibration's batch and this one


def test_in_evaluation_with_frozen_statistics_hooks_or_short_planes_torchs_batch_norm_runs() -> None:
    model = _normalised_model()
    assert not _runs_torch_batch_norm(model(_exact_batch()))
    model[0].eval()  # frozen statistics inside a training model
    assert _runs_torch_batch_norm(model(_exact_batch()))
    model[0].train()
    for module in (model[0], model[1]):
        handle = module.register_forward_hook(lambda *args: None)
        assert _runs_torch_batch_norm(model(_exact_batch()))
        handle.remove()
    short_planes = _exact_batch()[:, :, :, :4].contiguous()  # 16 values a plane: below MIN_PLANE_SIZE
    assert _runs_torch_batch_norm(model(short_planes))
    plain = copy.deepcopy(model)
    restore_norms(plain)
    with torch.no_grad():
        assert torch.equal(model.eval()(_exact_batch(False)), plain.eval()(_exact_batch(False)))


def test_a_layer_that_cannot_quantize_in_its_node_after_all_applies_torchs_batch_norm() -> None:
    model = _normalised_model()
    plain = copy.deepcopy(model)
    restore_norms(plain)
    x = _exact_batch()
    assert model[2].defer_norm(model[0]._batch_norm_input(x), x) and model[2].defer_relu(x)
    with torch.no_grad():  # recording no gradients, the layer quantizes through its quantizer module
        assert torch.equal(model[2](x), plain(x))
    for name, buffer in model[0].named_buffers():
        assert torch.equal(buffer, plain[0].get_buffer(name)), name


class FailingBetween(nn.Module):
    """BN → ReLU → conv, with a failure between the ReLU and the conv on demand."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bn, self.relu, self.conv = nn.BatchNorm2d(3, eps=0.125), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(x))
        if self.fail:
            raise RuntimeError("stopped before the layer")
        return self.conv(x)


def test_a_forward_that_stops_before_the_reader_counts_nothing_and_leaves_no_record_applied() -> None:
    """The BatchNorm left itself to the layer, which never ran: no batch counted, no statistics
    updated (torch's would have done both); the record it left is not applied later."""
    model = compress_model(FailingBetween(), INT8, _exact_batch(False)).train()
    model(_exact_batch(False))  # calibration
    plain = copy.deepcopy(model)
    restore_norms(plain)
    before = {name: buffer.clone() for name, buffer in model.bn.named_buffers()}
    model.fail = True
    with pytest.raises(RuntimeError, match="stopped before the layer"):
        model(_exact_batch())
    model.fail = False
    assert IN_NODE not in vars(model.conv)  # nor the layer's note that it would quantize that input in its node
    for name, buffer in model.bn.named_buffers():
        assert torch.equal(buffer, before[name]), name
    with torch.no_grad():
        assert torch.equal(model.eval()(_exact_batch(False)), plain.eval()(_exact_batch(False)))


def test_the_exported_model_has_the_plain_batch_norm() -> None:
    model = _normalised_model()
    assert type(float_copy(model)[0]) is nn.BatchNorm2d
    restore_norms(model)
    restore_relus(model)
    assert type(model[0]) is nn.BatchNorm2d and type(model[1]) is nn.ReLU


class CheckpointedReader(nn.Module):
    """conv → BN → ReLU, then a conv (the BN's reader) and a head: the reader may run checkpointed."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv, self.head = nn.Conv2d(4, 2, 3, padding=1), nn.Linear(2 * 4 * 8, 3)
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = checkpoint(self.conv, x, use_reentrant=True) if self.checkpointed else self.conv(x)
        return self.head(x.flatten(1))


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_a_reader_run_again_by_reentrant_checkpointing_applies_the_batch_norm_again() -> None:
    """Reentrant checkpointing runs the reader without gradients first (it applies the BatchNorm
    it was left as torch's), then again in the backward pass, alone: it applies it again there."""
    trained = []
    for checkpointed in (False, True):
        model = compress_model(CheckpointedReader(checkpointed), INT8, _exact_batch(False)).train()
        model(_exact_batch(False))  # calibration
        assert compression_state(model).plan.input_norms == {"conv": "stem.1"}
        out = model(_exact_batch())
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        trained.append({name: p.grad for name, p in model.named_parameters()} | dict(model.stem[1].named_buffers()))
    plain, checkpointed = trained
    assert checkpointed["stem.1.weight"] is not None
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_forward_pre_hook_on_the_reader_sees_the_batch_norm_and_relu_output() -> None:
    model = _normalised_model()
    plain = copy.deepcopy(model)
    restore_norms(plain)
    for variant in (model, plain):
        variant[2].register_forward_pre_hook(lambda module, args: (args[0] + 0.3,))
    fused, reference = _step(model, 2), _step(plain, 2)
    assert _runs_torch_batch_norm(fused["output"])  # the layer no longer applies it
    for name, value in fused.items():
        assert torch.equal(value, reference[name]), name


def test_no_momentum_and_no_batch_count_update_nothing_as_torchs() -> None:
    """A state dict without ``num_batches_tracked`` leaves it None: with ``momentum=None`` torch's
    BatchNorm then updates no running statistics."""
    model = _normalised_model(momentum=None)
    model[0].num_batches_tracked = None
    plain = copy.deepcopy(model)
    restore_norms(plain)
    fused, reference = _step(model, 2), _step(plain, 2)
    assert not _runs_torch_batch_norm(fused["output"])
    for name in ("running_mean", "running_var"):
        assert torch.equal(fused[name], reference[name]) and torch.equal(fused[name], model[0].get_buffer(name))


class SharedReLU(nn.Module):
    """BN → ReLU → conv, then the same ReLU module after a residual add (torchvision's BasicBlock)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bn, self.relu = nn.BatchNorm2d(3, eps=0.125), nn.ReLU(inplace=True)
        self.conv, self.head = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(self.relu(self.bn(x)))
        return self.head(self.relu(out + x))


def test_a_relu_module_called_twice_leaves_the_call_after_the_batch_norm_to_the_layer() -> None:
    plan = resolve_plan(SharedReLU(), INT8, _exact_batch(False))
    assert plan.input_relus == {"conv": "relu@0"} and plan.input_norms == {"conv": "bn"}
    model = compress_model(SharedReLU(), INT8, _exact_batch(False)).train()
    model(_exact_batch(False))  # calibration
    plain = copy.deepcopy(model)
    restore_norms(plain)
    fused, reference = [], []
    for variant, results in ((model, fused), (plain, reference)):
        x = _exact_batch()
        out = variant(x)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        results += [out, x.grad, *(p.grad for p in variant.parameters()), *variant.bn.buffers()]
    assert not _runs_torch_batch_norm(fused[0]) and _runs_torch_batch_norm(reference[0])
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-6)
    assert torch.equal(fused[0], reference[0])  # exact statistics: the same output, the second ReLU applied


class OneReLUEverywhere(nn.Module):
    """One ReLU module after each of two BatchNorms, each call read by a conv of its own."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bn1, self.bn2, self.relu = nn.BatchNorm2d(3, eps=0.125), nn.BatchNorm2d(3), nn.ReLU()
        self.conv1, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.bn2(self.conv1(self.relu(self.bn1(x))))))


def test_each_call_of_one_relu_module_after_a_batch_norm_goes_to_its_own_layer() -> None:
    model = compress_model(OneReLUEverywhere(), INT8, _exact_batch(False)).train()
    plan = compression_state(model).plan
    assert plan.input_relus == {"conv1": "relu@0", "conv2": "relu@1"}
    assert plan.input_norms == {"conv1": "bn1", "conv2": "bn2"}
    model(_exact_batch(False))  # calibration
    plain = copy.deepcopy(model)
    restore_norms(plain)
    outputs = [variant(_exact_batch()) for variant in (model, plain)]
    assert not _runs_torch_batch_norm(outputs[0]) and _runs_torch_batch_norm(outputs[1])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
