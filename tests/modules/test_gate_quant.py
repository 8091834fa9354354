"""Gate quantizers on modules: what each kind of gate computes, its gradient, and its place before
an output quantizer of the same module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_amct import compress_model
from lightning_amct.modules.apply import apply_plan
from lightning_amct.modules.gate_quant import attach_gate_quantizer, detach_gate_quantizers
from lightning_amct.modules.output_quant import attach_output_quantizer
from lightning_amct.plan import resolve_plan
from lightning_amct.quant import ActivationQuantizer, GateQuantizer

Q = GateQuantizer()


def _onnx_hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    """ONNX's HardSigmoid, ``max(0, min(1, alpha * x + beta))``, alpha 1/6, beta 0.5."""
    return torch.clamp(x * (1 / 6) + 0.5, 0, 1)


@pytest.mark.parametrize(
    ("module", "gate", "multiplies"),
    [(nn.Sigmoid(), torch.sigmoid, False), (nn.Hardsigmoid(), _onnx_hardsigmoid, False), (nn.SiLU(), torch.sigmoid, True)],
)  # fmt: skip
def test_each_gate_puts_its_gate_value_on_the_grid_with_a_straight_through_gradient(module, gate, multiplies) -> None:
    attach_gate_quantizer(module, GateQuantizer())
    assert module.state_dict() == {}  # nothing to train, nothing to save
    x = (torch.randn(200, generator=torch.Generator().manual_seed(0)) * 4).requires_grad_(True)
    y = module(x)
    y.sum().backward()
    reference = x.detach().requires_grad_(True)
    with torch.enable_grad():
        value = gate(reference)
        quantized = value + (Q(value.detach()) - value).detach()  # straight through: gate values lie in [0, 1]
        expected = reference * quantized if multiplies else quantized
    expected.sum().backward()
    assert torch.equal(y, expected.detach()) and torch.allclose(x.grad, reference.grad, atol=1e-6)
    assert list(detach_gate_quantizers(nn.Sequential(module))) == ["0"]
    assert torch.equal(module(x), type(module)()(x))  # detached: the plain module again


def test_the_gate_runs_before_the_output_quantizer_of_its_module() -> None:
    silu = nn.SiLU()
    attach_gate_quantizer(silu, GateQuantizer())
    output_quant = ActivationQuantizer(8, fixed_min=False, init_clip=(2.0, -1.0))
    attach_output_quantizer(silu, output_quant)
    x = torch.linspace(-3, 3, 50)
    assert torch.equal(silu(x), output_quant(x * Q(torch.sigmoid(x))))
    with pytest.raises(ValueError, match="ReLU is no gate"):
        attach_gate_quantizer(nn.ReLU(), GateQuantizer())


def test_a_plan_whose_gate_is_no_longer_a_gate_is_refused() -> None:
    def model() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 1), nn.SiLU(), nn.Conv2d(4, 2, 1))

    plan = resolve_plan(model(), "retrain_data_quant_config { ulq_quantize {} }", torch.zeros(1, 1, 2, 2),
                        quantize_outputs=True)  # fmt: skip
    assert plan.gates == {"1": "silu"}
    other = model()
    other[1] = nn.SiLU(inplace=True)
    with pytest.raises(ValueError, match="the plan expects '1' to be a silu gate, the model has a SiLU"):
        apply_plan(other, plan, torch.zeros(1, 1, 2, 2))
    assert isinstance(compress_model(model(), "retrain_data_quant_config { ulq_quantize {} }", torch.zeros(1, 1, 2, 2),
                                     quantize_outputs=True)[1].gate_quant, GateQuantizer)  # fmt: skip
