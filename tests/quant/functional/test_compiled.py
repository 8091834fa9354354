"""The fake-quant ops under ``torch.compile``: custom operators in one graph, with the eager values."""

from __future__ import annotations

import pytest
import torch

from lightning_amct.quant.functional import arq_fake_quant, ulq_fake_quant

pytestmark = pytest.mark.usefixtures("kernel_path")


def test_compiled_ulq_equals_eager_and_stays_in_one_graph(compiled_quantizers) -> None:
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(graph_module: torch.fx.GraphModule, _inputs: list) -> object:
        graphs.append(graph_module)
        return graph_module.forward

    def step(x: torch.Tensor, clip_max: torch.Tensor, clip_min: torch.Tensor) -> torch.Tensor:
        return ulq_fake_quant(torch.relu(x) * 2, clip_max, clip_min, 8) + arq_fake_quant(x, 8, None)

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    results = []
    for run in (step, torch.compile(step, backend=recording_backend, fullgraph=True)):
        inputs = [x.clone().requires_grad_(True), torch.tensor([1.5], requires_grad=True), torch.tensor([-0.5])]
        inputs[2].requires_grad_(True)
        y = run(*inputs)
        y.backward(grad)
        results.append([y.detach(), *(t.grad for t in inputs)])
    eager, compiled = results
    assert len(graphs) == 1
    # each quantizer one call of its operator
    assert compiled_quantizers(graphs[0]) == {"ulq_fake_quant": 1, "arq_fake_quant": 1}
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])
    for compiled_clip, eager_clip in zip(compiled[2:], eager[2:]):
        torch.testing.assert_close(compiled_clip, eager_clip, rtol=1e-5, atol=1e-6)
