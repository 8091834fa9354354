"""The fake-quant ops as ``torch.library`` custom operators: registrations that hold, and inductor
fuses them rather than calling them."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch._inductor.utils import run_and_get_code

from lightning_amct.quant.functional import arq_fake_quant, ulq_fake_quant, wts_ulq_fake_quant
from lightning_amct.quant.functional.fixed_grid import fixed_grid_fake_quant

OPS = torch.ops.lightning_amct


def _clip(value: float) -> Tensor:
    return torch.tensor([value], requires_grad=True)


def _x(*shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)


CASES = {
    "ulq": (OPS.ulq_fake_quant, lambda: (_x(4, 6), _clip(1.5), _clip(-0.5), 8, False)),
    "ulq 4-bit, float16 scale": (OPS.ulq_fake_quant, lambda: (_x(3, 5), _clip(0.7), _clip(-0.9), 4, True)),
    "arq per channel": (OPS.arq_fake_quant, lambda: (_x(4, 3, 2, 2), 8, 0)),
    "arq per tensor": (OPS.arq_fake_quant, lambda: (_x(5, 6), 4, None)),
    "wts_ulq": (OPS.wts_ulq_fake_quant, lambda: (_x(4, 6), torch.full((4,), 0.05, requires_grad=True), 4, 0)),
    "fixed grid": (
        OPS.fixed_grid_fake_quant,
        lambda: (_x(4, 6), torch.tensor(0.02), torch.tensor(-3, dtype=torch.int32), -128, 127),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_the_operator_passes_opcheck(name: str) -> None:
    """Schema, fake kernel, autograd registration and AOTAutograd tracing agree with the kernel."""
    operator, make_args = CASES[name]
    torch.library.opcheck(operator, make_args())


def _quantize_all(x: Tensor, clip_max: Tensor, clip_min: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    """A Linear layer over ULQ-quantized input times a quantized gate, its weight quantized twice."""
    y = ulq_fake_quant(torch.relu(x), clip_max, clip_min, 8)
    weights = arq_fake_quant(w, 8, 0) + wts_ulq_fake_quant(w, scale, 4, 0)
    zero_point = torch.tensor(-128, dtype=torch.int32)
    gate = fixed_grid_fake_quant(torch.sigmoid(x), torch.tensor(1 / 255), zero_point, -128, 127)
    return (y * gate) @ weights.t()


def test_inductor_fuses_the_operators_and_calls_none() -> None:
    """Inductor replaces each operator by its tensor operations, forward and backward: its generated
    code calls none of them (an opaque operator would stay an external call there), and gives the
    eager values."""
    inputs = (_x(8, 16), _clip(1.5), _clip(-0.5), _x(4, 16), torch.full((4,), 0.05, requires_grad=True))
    grad = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(_quantize_all, backend="inductor", fullgraph=True)
    results = []
    for run in (_quantize_all, compiled):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]

        def step(run=run, leaves=leaves) -> Tensor:
            out = run(*leaves)
            out.backward(grad)
            return out

        # compiled afresh, not read from the compiler's caches
        no_cache = torch._functorch.config.patch(enable_autograd_cache=False)
        with torch._inductor.config.patch(fx_graph_cache=False), no_cache:
            out, codes = run_and_get_code(step)
        results.append((out.detach(), [t.grad for t in leaves], codes))
    (eager_out, eager_grads, _), (compiled_out, compiled_grads, codes) = results
    assert len(codes) == 2  # the forward and the backward kernels
    assert not any("torch.ops.lightning_amct" in code for code in codes)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-4)
