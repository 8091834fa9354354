"""Output quantizers on a model: where they sit, what the readers see, what training moves."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from lightning_amct import compress_model
from lightning_amct.demo import DemoNet
from lightning_amct.modules.output_quant import (
    attach_output_quantizer,
    detach_output_quantizer,
    output_quantizers,
    restore_output_hooks,
)
from lightning_amct.quant import ActivationQuantizer

INT8 = """
batch_num: 2
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
retrain_weight_quant_config { arq_retrain { dst_type: INT8 } }
"""


def _compressed() -> DemoNet:
    torch.manual_seed(0)
    return compress_model(DemoNet(width=16), INT8, torch.zeros(1, 1, 8, 8), quantize_outputs=True)


def _on_grid(values: torch.Tensor, quantizer: ActivationQuantizer) -> bool:
    scale, offset = quantizer.scale_offset()
    levels = values / scale + offset
    return bool(torch.allclose(levels, levels.round(), atol=1e-3))


def test_quantizers_sit_on_the_chain_ends_and_checkpoint_under_them() -> None:
    model = _compressed()
    assert set(output_quantizers(model)) == {"stem.relu", "block.bn2", "block.relu2", "pointwise.relu", "gap"}
    assert model.stem.relu.output_quant is model.block.conv1.act_quant  # one tensor, one quantizer
    # the residual add's output, read by the depthwise conv through the max-pool, and the global
    # average pool's output, read by the head through the flatten, are quantized where they are made
    assert model.block.relu2.output_quant is model.depthwise.conv.act_quant
    assert model.gap.output_quant is model.fc.act_quant
    assert model.block.bn2.output_quant.fixed_min is False and model.pointwise.relu.output_quant.fixed_min
    keys = model.state_dict().keys()
    assert {"block.bn2.output_quant.clip_max", "pointwise.relu.output_quant.calibrated_batches"} <= keys


def test_every_reader_sees_the_quantized_tensor_once() -> None:
    model = _compressed().train()
    seen: dict[str, torch.Tensor] = {}
    model.stem.relu.register_forward_hook(lambda m, i, o: seen.setdefault("stem", o))
    model.block.bn2.register_forward_hook(lambda m, i, o: seen.setdefault("bn2", o))
    model.block.conv1.register_forward_pre_hook(lambda m, i: seen.setdefault("conv1", i[0]))
    model.pool.register_forward_pre_hook(lambda m, i: seen.setdefault("pool", i[0]))
    model(torch.rand(32, 1, 8, 8)).sum().backward()
    shared = model.block.conv1.act_quant
    # the hook's output (what the residual add reads too) is what conv1 reads, on the grid
    assert seen["conv1"] is seen["stem"] and _on_grid(seen["stem"], shared)
    assert int(shared.calibrated_batches) == 1  # the second reader did not count another batch
    # the residual add reads both quantized tensors: the block output is Q(relu(Q(bn2) + Q(stem))),
    # on the grid of the depthwise conv that reads it after the max-pool
    assert _on_grid(seen["bn2"], model.block.bn2.output_quant)
    assert _on_grid(seen["pool"], model.depthwise.conv.act_quant)
    step = float(model.depthwise.conv.act_quant.scale_offset()[0])
    assert float((seen["pool"] - torch.relu(seen["bn2"] + seen["stem"])).detach().abs().max()) <= step / 2 + 1e-6
    for module in (model.block.bn2, model.pointwise.relu):
        assert module.output_quant.clip_max.grad is not None and module.output_quant.clip_max.grad.abs() > 0


def test_copies_and_pickles_keep_the_hooks() -> None:
    model = _compressed().train()
    with torch.no_grad():
        model(torch.rand(32, 1, 8, 8))
        model(torch.rand(32, 1, 8, 8))
    model.eval()
    x = torch.rand(4, 1, 8, 8)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert set(output_quantizers(other)) == set(output_quantizers(model))
        assert torch.equal(other(x), model(x))


def test_attach_and_detach() -> None:
    relu = nn.ReLU()
    quantizer = ActivationQuantizer(8, fixed_min=True, init_clip=(1.0, 0.0))
    attach_output_quantizer(relu, quantizer)
    assert torch.equal(relu(torch.tensor([0.3, 5.0])), quantizer(torch.tensor([0.3, 5.0])))
    with pytest.raises(ValueError, match="already has an attribute 'output_quant'"):
        attach_output_quantizer(relu, quantizer)
    assert detach_output_quantizer(relu) is quantizer
    assert torch.equal(relu(torch.tensor([5.0])), torch.tensor([5.0])) and not output_quantizers(relu)
    assert detach_output_quantizer(relu) is None


def test_a_batchnorm_converted_to_sync_batchnorm_gets_its_output_hook_back() -> None:
    """Lightning's ``sync_batchnorm=True`` converts the modules after the callback compressed them."""
    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8)
    model = compress_model(DemoNet(), "retrain_data_quant_config { ulq_quantize {} }", x[:1], quantize_outputs=True)
    model.train()(x)  # calibration
    model.eval()
    with torch.no_grad():
        expected = model(x)
    sites = set(output_quantizers(model))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # its children in place
    lost = sites - set(output_quantizers(converted))
    assert any("bn" in site for site in lost), "the conversion kept the hooks: nothing to restore"
    assert set(restore_output_hooks(converted)) == lost and set(output_quantizers(converted)) == sites
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected)
