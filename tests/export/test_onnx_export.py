"""Exporter choice: TorchScript where it takes the model, the dynamo-based exporter where it refuses
it or writes a model that ONNX Runtime cannot load or run; an average pool over the whole input
exported as a global one.

``torch.diff`` stands for the model code the TorchScript-based exporter refuses (GPT-2's position
ids use it); the frozen quantized layer after it must come out as QuantizeLinear/DequantizeLinear
with a batch axis that stays dynamic, whichever exporter wrote the model.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lightning_amct.export import FakeQuantLayer
from lightning_amct.export.integer import ActivationGrid, IntegerLayer
from lightning_amct.export.onnx_export import OnnxExportError, export_onnx, opset_of


class _DiffThenQuantizedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        weight = torch.randint(-128, 128, (3, 5), dtype=torch.int8)
        data = IntegerLayer(
            "fc", "Linear", 0, 1, 8, weight, torch.full((3,), 0.01), None, torch.zeros(3),
            ActivationGrid(8, 0.05, 0, 6.35, -6.4), None,
        )  # fmt: skip
        self.fc = FakeQuantLayer(nn.Linear(5, 3), data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.diff(x, dim=1))


def _run(model, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def test_auto_falls_back_to_dynamo_where_torchscript_refuses(capfd: pytest.CaptureFixture) -> None:
    module = _DiffThenQuantizedLinear().eval()
    with pytest.raises(OnnxExportError, match=r"torchscript exporter: .*diff"):
        export_onnx(module, torch.zeros(1, 6), exporter="torchscript")
    model = export_onnx(module, torch.zeros(1, 6))  # a batch of one is not baked in
    # the refusal is one line of the error above, not torch's dump of the whole graph
    assert "graph(" not in capfd.readouterr().out
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 2
    assert opset_of(model) == 18  # the dynamo-based exporter writes 18 at least
    assert not any(node.metadata_props for node in model.graph.node)  # no stack traces or module paths
    x = torch.randn(4, 6) * 3
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(_run(model, x), expected, rtol=0, atol=1e-5)


class _Inputs(nn.Module):
    """A wrapper whose forward takes its inputs as ``*inputs`` (as wrappers of model libraries do)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.inner(inputs[0]) + inputs[1].sum(1, keepdim=True)


def test_the_dynamo_based_exporter_takes_a_forward_of_star_args() -> None:
    module = _Inputs(_DiffThenQuantizedLinear()).eval()
    x, z = torch.randn(4, 6) * 3, torch.randn(4, 2)
    model = export_onnx(module, (x[:1], z[:1]))
    assert opset_of(model) == 18 and [i.name for i in model.graph.input] == ["input_0", "input_1"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = module(x, z).numpy()
    np.testing.assert_allclose(session.run(None, {"input_0": x.numpy(), "input_1": z.numpy()})[0], expected, atol=1e-5)


class _Transformer(nn.Module):
    """A ``transformers`` model from a small config (random weights), called with one keyword
    input and giving one output field."""

    def __init__(
        self, model_class: str, config_class: str, input_name: str, output_name: str, **config: object
    ) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        self.model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
        self.input_name, self.output_name = input_name, output_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(**{self.input_name: x}), self.output_name)


def _patchtst() -> tuple[nn.Module, torch.Tensor]:
    """PatchTST with a class token: its positional encoding, as TorchScript writes it, fails ONNX
    Runtime's shape inference when the model loads."""
    module = _Transformer(
        "PatchTSTForClassification", "PatchTSTConfig", "past_values", "prediction_logits",
        num_input_channels=3, context_length=32, patch_length=8, patch_stride=8, d_model=16,
        num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, num_targets=4, use_cls_token=True,
    )  # fmt: skip
    return module, torch.randn(2, 32, 3)


def _mamba() -> tuple[nn.Module, torch.Tensor]:
    """Mamba (its PyTorch scan): a ``Tile`` that TorchScript writes with a 2-D ``repeats`` input,
    which loads and fails when it runs."""
    module = _Transformer(
        "MambaModel", "MambaConfig", "input_ids", "last_hidden_state",
        vocab_size=50, hidden_size=8, state_size=2, num_hidden_layers=1, expand=2, conv_kernel=2, use_mambapy=False,
    )  # fmt: skip
    return module, torch.randint(0, 50, (2, 3))


@pytest.mark.parametrize(
    ("model", "failure"), [(_patchtst, "ShapeInferenceError"), (_mamba, "'repeat' input tensor must be 1 dimensional")]
)
def test_auto_takes_dynamo_where_torchscripts_model_does_not_load_or_run_in_onnx_runtime(model, failure: str) -> None:
    module, x = model()
    module.eval()
    with pytest.raises(Exception, match=failure):
        _run(export_onnx(module, x, exporter="torchscript"), x)
    exported = export_onnx(module, x)
    assert opset_of(exported) == 18  # the dynamo-based exporter's
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(_run(exported, x), expected, rtol=0, atol=1e-5)


@torch.library.custom_op("lightning_amct_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    """An operator of a model library's own, with no ONNX function."""
    return x * 2


@_twice.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _OwnOperator(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _twice(x)


def test_a_refusal_names_the_innermost_reason_without_colour_codes() -> None:
    with pytest.raises(OnnxExportError) as caught:
        export_onnx(_OwnOperator(), torch.zeros(2, 3), exporter="dynamo")
    assert str(caught.value).startswith(  # not the exporter's page of advice, in colour, around it
        "cannot export _OwnOperator to ONNX (dynamo exporter: DispatchError: No ONNX function found for "
        "<OpOverload(op='lightning_amct_test.twice', overload='default')>"
    )


def test_torchscript_exports_what_it_takes() -> None:
    module = nn.Sequential(nn.Linear(4, 2)).eval()
    assert opset_of(export_onnx(module, torch.zeros(1, 4), exporter="torchscript")) == 17


class _Talking(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("traced once")
        return torch.diff(x, dim=1)


def test_what_the_model_prints_while_exported_still_shows(capfd: pytest.CaptureFixture) -> None:
    export_onnx(_Talking().eval(), torch.zeros(1, 6))
    out = capfd.readouterr().out
    assert "traced once" in out and "graph(" not in out


def test_unknown_exporter_is_refused() -> None:
    with pytest.raises(ValueError, match="exporter must be one of auto, torchscript, dynamo, got 'jit'"):
        export_onnx(nn.Linear(2, 2), torch.zeros(1, 2), exporter="jit")


@pytest.mark.parametrize(("pool", "size", "expected"), [
    (nn.AvgPool2d(8, ceil_mode=True), 3, "GlobalAveragePool"),  # EfficientNet's pooler: one window over all
    (nn.AvgPool2d(3), 3, "GlobalAveragePool"),
    (nn.AvgPool2d(2), 4, "AveragePool"),
])  # fmt: skip
def test_an_average_pool_over_the_whole_input_is_a_global_one(pool: nn.Module, size: int, expected: str) -> None:
    module = nn.Sequential(nn.Conv2d(2, 4, 1), pool).eval()
    model = export_onnx(module, torch.zeros(1, 2, size, size))
    assert expected in [node.op_type for node in model.graph.node]
    x = torch.randn(5, 2, size, size)
    with torch.no_grad():
        np.testing.assert_allclose(_run(model, x), module(x).numpy(), rtol=1e-5, atol=1e-6)
