"""BatchNorm folding: same integers (up to sign), scale times |gamma/sqrt(var+eps)|, same function."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_amct import compress_model
from lightning_amct.export import freeze_model, load_compressed, save_compressed
from lightning_amct.modules.compressed_layers import COMPRESSED_CLASSES
from lightning_amct.quant import ActivationQuantizer, ArqWeightQuantizer


def _compressed(layer: nn.Module, bits: int = 8) -> nn.Module:
    cls = COMPRESSED_CLASSES[type(layer)]
    act = ActivationQuantizer(8, fixed_min=False, init_clip=(3.0, -3.0))
    return cls.from_float(layer, act, ArqWeightQuantizer(bits, channel_axis=cls.out_axis))


def _batchnorm(channels: int, gamma: torch.Tensor) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        bn.weight.copy_(gamma)
        bn.bias.copy_(torch.randn(channels, generator=generator))
        bn.running_mean.copy_(torch.randn(channels, generator=generator))
        bn.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    return bn


def _factor(bn: nn.BatchNorm2d) -> torch.Tensor:
    return (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).detach()


def _conv_without_negative_edge(out_channels: int, in_channels: int) -> nn.Conv2d:
    """A conv whose every channel has |max| >= |min|, so ARQ never produces -128."""
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.weight[:, 0, 0, 0] = conv.weight.abs().amax(dim=(1, 2, 3)) * 1.5
    return conv


def _assert_same_function(frozen, model: nn.Module, x: torch.Tensor) -> None:
    """The frozen model computes the model's function, up to float rounding and the int32 grid of
    its bias (half a step ``s_x * s_w``) in its one quantized layer."""
    bias_rounding = max(
        (
            data.activation.scale * float(data.weight_scale.max()) / 2
            for data in frozen.layers.values()
            if data.bias is not None and data.activation is not None
        ),
        default=0.0,
    )
    with torch.no_grad():
        torch.testing.assert_close(frozen.module(x), model(x), rtol=1e-5, atol=1e-5 + bias_rounding)


@pytest.mark.parametrize("bits", [8, 4])
def test_folding_keeps_integers_up_to_sign_and_the_function(bits: int) -> None:
    gamma = torch.tensor([1.5, -0.7, 0.2, -2.0, 1.0, 0.9])
    model = nn.Sequential(_compressed(_conv_without_negative_edge(6, 4), bits), _batchnorm(6, gamma), nn.ReLU()).eval()
    x = torch.randn(8, 4, 7, 7, generator=torch.Generator().manual_seed(2))
    unfolded = freeze_model(nn.Sequential(model[0]), x[:1])  # the same layer, no BatchNorm after it
    frozen = freeze_model(model, x[:1])

    folded = frozen.layers["0"]
    original = unfolded.layers["0"]
    factor = _factor(model[1])
    assert folded.folded_batchnorm == "1" and isinstance(frozen.module[1], nn.Identity)
    sign = torch.where(factor < 0, -1, 1).to(torch.int8).reshape(-1, 1, 1, 1)
    assert torch.equal(folded.weight_int, original.weight_int * sign)
    assert torch.equal(folded.weight_scale, (original.weight_scale.double() * factor.abs()).float())
    _assert_same_function(frozen, model, x)


def test_a_negative_gamma_on_a_channel_holding_the_grid_minimum_folds_with_that_integer_at_127() -> None:
    # -(-128) = 128 does not fit INT8: as in the reference, it becomes 127, and the export says so;
    # the frozen model computes with that weight.
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[-1.0, 0.5], [0.3, 0.2]]).reshape(2, 2, 1, 1))
    model = nn.Sequential(_compressed(conv), _batchnorm(2, torch.tensor([-1.0, 1.0]))).eval()
    x = torch.randn(4, 2, 3, 3)
    unfolded = freeze_model(nn.Sequential(model[0]), x[:1]).layers["0"]
    frozen = freeze_model(model, x[:1])
    folded = frozen.layers["0"]
    assert unfolded.weight_int[0].flatten().tolist()[0] == -128
    assert folded.folded_batchnorm == "1" and isinstance(frozen.module[1], nn.Identity)
    assert folded.weight_int[0].flatten().tolist() == [127, -unfolded.weight_int[0].flatten().tolist()[1]]
    assert torch.equal(folded.weight_int[1], unfolded.weight_int[1])
    assert any("1 weight integer(s) -128 in channels with gamma < 0 became 127" in note for note in frozen.notes)
    # one step of channel 0's first weight: that output moves by at most |x| times the step, and
    # by the int32 grid of its bias (half a step s_x * s_w)
    step = float(folded.weight_scale[0])
    bound = float(x[:, 0].abs().max()) * step + folded.activation.scale * step / 2
    with torch.no_grad():
        moved = (frozen.module(x) - model(x)).abs().amax(dim=(0, 2, 3))
    assert 0 < float(moved[0]) <= bound * (1 + 1e-4) + 1e-5


def test_conv_transpose_folds_on_its_output_axis() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_compressed(nn.ConvTranspose2d(3, 4, 3, stride=2)), _batchnorm(4, torch.rand(4) + 0.5)).eval()
    x = torch.randn(2, 3, 5, 5)
    frozen = freeze_model(model, x[:1])
    assert frozen.layers["0"].folded_batchnorm == "1"
    _assert_same_function(frozen, model, x)


class _TwoReaders(nn.Module):
    """The conv's output feeds the BatchNorm and a shortcut: folding would change the shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _compressed(nn.Conv2d(3, 3, 1))
        self.bn = _batchnorm(3, torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_a_conv_output_read_elsewhere_too_is_not_folded() -> None:
    model = _TwoReaders().eval()
    x = torch.randn(2, 3, 4, 4)
    frozen = freeze_model(model, x[:1])
    assert frozen.layers["conv"].folded_batchnorm is None
    _assert_same_function(frozen, model, x)


def test_without_example_inputs_nothing_is_folded_and_the_notes_say_why() -> None:
    model = nn.Sequential(_compressed(_conv_without_negative_edge(6, 4)), _batchnorm(6, torch.ones(6))).eval()
    frozen = freeze_model(model)
    assert frozen.layers["0"].folded_batchnorm is None and isinstance(frozen.module[1], nn.BatchNorm2d)
    assert "no example inputs to capture the graph with: no BatchNorm folded" in frozen.notes


def test_freezing_leaves_the_trained_model_untouched() -> None:
    model = nn.Sequential(_compressed(_conv_without_negative_edge(6, 4)), _batchnorm(6, torch.ones(6))).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert freeze_model(model, torch.zeros(1, 4, 7, 7)).layers["0"].folded_batchnorm == "1"
    assert isinstance(model[1], nn.BatchNorm2d)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class _BatchNormAct2d(nn.BatchNorm2d):
    """A model library's BatchNorm subclass: its own forward, ``F.batch_norm`` then an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return F.hardswish(x)


class _RenamedBatchNorm(nn.BatchNorm2d):
    """A subclass that keeps torch's forward."""


def _with_statistics(bn: nn.BatchNorm2d, gamma: torch.Tensor) -> nn.BatchNorm2d:
    bn.load_state_dict(_batchnorm(bn.num_features, gamma).state_dict())
    return bn.eval()


_CONFIG = """
retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 3.0 clip_min: -3.0 } fixed_min: false } }
retrain_weight_quant_config { arq_retrain { channel_wise: true } }
"""


def _conv_then(bn_class: type) -> nn.Sequential:
    gamma = torch.tensor([1.5, -0.7, 0.2, -2.0, 1.0, 0.9])
    return nn.Sequential(_conv_without_negative_edge(6, 4), _with_statistics(bn_class(6), gamma)).eval()


@pytest.mark.parametrize("subclass", [_BatchNormAct2d, _RenamedBatchNorm])
def test_batchnorm_subclasses_fold_like_batchnorm2d(subclass: type, tmp_path: Path) -> None:
    x = torch.randn(8, 4, 7, 7, generator=torch.Generator().manual_seed(2))
    model = compress_model(_conv_then(subclass), _CONFIG, x[:1]).eval()
    frozen = freeze_model(model, x[:1])
    assert frozen.layers["0"].folded_batchnorm == "1"
    # torch's forward: nothing left to run; a forward of its own: it stays, normalizing to identity
    assert isinstance(frozen.module[1], nn.Identity if subclass is _RenamedBatchNorm else _BatchNormAct2d)
    _assert_same_function(frozen, model, x)
    with torch.no_grad():
        expected = model(x)
        paths = save_compressed(model, tmp_path, x[:1])
        loaded = load_compressed(paths["checkpoint"], _conv_then(subclass))
        torch.testing.assert_close(loaded(x), frozen.module(x), rtol=0, atol=0)
    deploy = onnx.load(paths["deploy_onnx"])
    assert "BatchNormalization" not in {node.op_type for node in deploy.graph.node}
    session = ort.InferenceSession(str(paths["deploy_onnx"]), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    # one step of the input grid moves an output by at most the folded weights' L1 norm times it
    data = frozen.layers["0"]
    step = data.activation.scale * float(data.weight().abs().sum(dim=(1, 2, 3)).max())
    torch.testing.assert_close(got, expected, rtol=0, atol=step)
