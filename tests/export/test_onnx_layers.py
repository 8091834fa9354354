"""Layer kinds beyond the demo in both ONNX models: Conv1d, ConvTranspose2d, INT4 activations,
learned (WtsULQ) scales, per-tensor Linear; ONNX Runtime agrees with the frozen model."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import nn

from lightning_amct import compress_model
from lightning_amct.export import freeze_model, load_compressed, save_compressed

CONFIG = """
retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 3.0 clip_min: -2.0 } } }
retrain_weight_quant_config { ulq_retrain { channel_wise: true } }
override_layer_types {
    layer_type: "ConvTranspose2d"
    retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 2.0 clip_min: -1.0 } dst_type: INT4 } }
    retrain_weight_quant_config { arq_retrain { channel_wise: true dst_type: INT4 } }
}
override_layer_types {
    layer_type: "Linear"
    retrain_weight_quant_config { arq_retrain { channel_wise: false } }
}
"""


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(4, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 9 * 9, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1d(x)).reshape(x.shape[0], 8, 4, 4)
        y = torch.relu(self.bn(self.up(y)))
        return self.head(y.flatten(1))


def _run(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def test_mixed_layers_export_and_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Mixed()
    x = torch.randn(32, 4, 16)
    compress_model(model, CONFIG, x[:1])
    model.train()
    model(x)  # initialises the learned weight scales and the BatchNorm statistics
    with torch.no_grad():
        model.conv1d.weight_quant.scale.mul_(1.1)  # a trained scale, not the ARQ one
    model.eval()

    paths = save_compressed(model, tmp_path, x[:1])
    frozen = freeze_model(model, x[:1])
    assert frozen.layers["up"].folded_batchnorm == "bn" and frozen.layers["up"].activation.bits == 4
    with torch.no_grad():
        expected = model(x)
    head = frozen.layers["head"]
    step = head.activation.scale * float(head.weight().abs().sum(dim=1).max()) + 1e-4  # see test_recipes.py
    loaded = load_compressed(paths["checkpoint"], _Mixed())
    with torch.no_grad():
        outputs = {"frozen": frozen.module(x), "loaded": loaded(x)}
    outputs.update(fake_quant=_run(paths["fake_quant_onnx"], x), deploy=_run(paths["deploy_onnx"], x))
    for name, got in outputs.items():
        torch.testing.assert_close(got, expected, rtol=0, atol=step, msg=name)

    deploy = onnx.load(paths["deploy_onnx"])
    types = {init.name: init.data_type for init in deploy.graph.initializer}
    assert types["up.layer.weight_quantized"] == onnx.TensorProto.INT4
    # conv1d's output is reshaped before it is quantized: ONNX Runtime runs it in float, on its
    # integer weight dequantized
    assert types["conv1d.layer.weight_quantized"] == onnx.TensorProto.INT8
    assert types["head.layer.weight_quantized"] == onnx.TensorProto.INT8  # QGemm, float output
    assert types["head.layer.bias_quantized"] == onnx.TensorProto.INT32


class _Repeated(nn.Module):
    """A Linear with a bias called twice in one forward (a weight-shared block)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 12)
        self.mid = nn.Linear(12, 12)
        self.out = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = torch.relu(self.mid(torch.relu(self.mid(h))))
        return self.out(h)


def test_a_layer_called_twice_exports_one_integer_bias_for_both_calls(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Repeated()
    x = torch.randn(32, 16)
    compress_model(model, "retrain_data_quant_config { ulq_quantize {} }", x[:1])
    model.train()(x)  # calibration
    model.eval()
    paths = save_compressed(model, tmp_path, x[:1])
    deploy = onnx.load(paths["deploy_onnx"])
    biases = [init.name for init in deploy.graph.initializer if init.name.startswith("mid.") and "bias" in init.name]
    assert sorted(biases) == ["mid.layer.bias_quantized", "mid.layer.bias_scale"]
    frozen = freeze_model(model, x[:1])
    with torch.no_grad():
        expected = frozen.module(x)
    step = frozen.layers["out"].activation.scale * float(frozen.layers["out"].weight().abs().sum(dim=1).max()) + 1e-4
    torch.testing.assert_close(_run(paths["deploy_onnx"], x), expected, rtol=0, atol=step)


def test_a_grouped_transposed_convolution_exports_its_bias_per_output_channel(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2))
    x = torch.randn(16, 3, 6, 6)
    compress_model(model, "retrain_data_quant_config { ulq_quantize {} }", x[:1])
    model.train()(x)  # calibration
    model.eval()
    assert model[2].weight_quant.channel_axis == 1  # 4 scales, on the weight's (8, 4, 2, 2)
    paths = save_compressed(model, tmp_path, x[:1])
    frozen = freeze_model(model, x[:1])
    up = frozen.layers["2"]
    steps = up.activation.scale * up.weight_scale.repeat(2)  # output channel 4g + j: weight scale j
    on_grid = up.deployed_bias() / steps
    torch.testing.assert_close(on_grid, on_grid.round(), rtol=0, atol=1e-3)
    torch.testing.assert_close(up.deployed_bias(), up.bias, rtol=0, atol=float(steps.max()) / 2 + 1e-7)
    with torch.no_grad():
        expected = frozen.module(x)
    step = up.activation.scale * float(up.weight().abs().sum(dim=(0, 2, 3)).max()) + 1e-4
    for name in ("fake_quant_onnx", "deploy_onnx"):
        torch.testing.assert_close(_run(paths[name], x), expected, rtol=0, atol=step, msg=name)


class _OddUp(nn.Module):
    """A U-Net step back up to an odd size: the transposed convolution told its ``output_size`` by name."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 3, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x)), output_size=x.shape[-2:])


def test_a_transposed_convolution_takes_output_size_by_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = _OddUp(), torch.randn(8, 3, 9, 9)
    compress_model(model, "retrain_data_quant_config { ulq_quantize {} }", x[:1])
    model.train()(x).sum().backward()
    paths = save_compressed(model.eval(), tmp_path, x[:1])
    loaded, frozen = load_compressed(paths["checkpoint"], _OddUp()), freeze_model(model, x[:1])
    with torch.no_grad():
        expected = model(x)
        assert expected.shape == x.shape
        torch.testing.assert_close(loaded(x), frozen.module(x))
    up = frozen.layers["up"]
    step = up.activation.scale * float(up.weight().abs().sum(dim=(0, 2, 3)).max()) + 1e-4
    torch.testing.assert_close(_run(paths["deploy_onnx"], x), expected, rtol=0, atol=step)


class _EvalBranch(nn.Module):
    """A Linear over tokens that only eval forwards call: its input quantizer never calibrates."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.refine, self.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        if not self.training:
            h = h + self.refine(h)
        return self.head(h).mean(1)


def test_a_layer_that_never_calibrated_deploys_as_the_model_runs_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = _EvalBranch(), torch.randn(8, 16, 64)
    config = "retrain_data_quant_config { ulq_quantize {} }\n"
    config += "retrain_weight_quant_config { arq_retrain { channel_wise: true } }"
    compress_model(model, config, x[:1])
    model.train()(x)  # calibrates inp and head only
    paths = save_compressed(model.eval(), tmp_path, x[:1])
    frozen = freeze_model(model, x[:1])
    refine = frozen.layers["refine"]
    assert refine.weight_int is None and refine.activation is None and "never calibrated" in refine.notes[0]
    loaded = load_compressed(paths["checkpoint"], _EvalBranch())
    with torch.no_grad():
        expected = loaded(x)
        torch.testing.assert_close(expected, frozen.module(x))
    for name in ("fake_quant_onnx", "deploy_onnx"):  # ONNX Runtime's default optimisations
        # integer weights under a float input became MatMulNBits, which quantized that input: 1e-3 off
        torch.testing.assert_close(_run(paths[name], x), expected, rtol=0, atol=1e-6, msg=name)
