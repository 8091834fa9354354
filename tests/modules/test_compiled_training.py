"""A compressed model trains under ``torch.compile`` (inductor) as it does eagerly, in one graph."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightning_amct import compress_model

INT8 = """
retrain_data_quant_config: { ulq_quantize: { dst_type: INT8 } }
retrain_weight_quant_config: { arq_retrain: { channel_wise: true dst_type: INT8 } }
"""


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    ).train()


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.rand(8, 1, 12, 12, generator=generator), torch.randint(0, 10, (8,), generator=generator))
            for _ in range(count)]  # fmt: skip


def _train(model: nn.Module, run: nn.Module, batches: list) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """``model``'s outputs and gradients at each step of ``run`` (it or its compiled form), SGD in between.

    The first batch calibrates the clips.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    for x, y in batches:
        optimizer.zero_grad()
        out = run(x)
        nn.functional.cross_entropy(out, y).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        steps.append((out.detach(), grads))
        optimizer.step()
    return steps


def test_inductor_training_equals_eager_within_rounding() -> None:
    eager_model = compress_model(_model(), INT8, torch.zeros(1, 1, 12, 12))
    compiled_model = copy.deepcopy(eager_model)
    batches = _batches(3)
    eager = _train(eager_model, eager_model, batches)
    compiled = _train(compiled_model, torch.compile(compiled_model, backend="inductor"), batches)
    assert eager_model[2].act_quant.calibrated and compiled_model[2].act_quant.calibrated
    for (eager_out, eager_grads), (compiled_out, compiled_grads) in zip(eager, compiled):
        torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)
        assert compiled_grads.keys() == eager_grads.keys()
        assert any("clip_max" in name for name in eager_grads)
        for name, grad in eager_grads.items():
            # float rounding of sums taken in another order, relative to the gradient's size; a
            # clip's gradient is one sum over the whole activation whose terms largely cancel,
            # so its last digits move further
            rtol = 1e-3 if "clip" in name else 1e-4
            atol = 1e-5 * float(grad.abs().max())
            torch.testing.assert_close(compiled_grads[name], grad, rtol=rtol, atol=atol, msg=name)


def test_calibrated_training_forward_is_one_graph_with_every_quantizer(traced_functions) -> None:
    model = compress_model(_model(), INT8, torch.zeros(1, 1, 12, 12))
    x, _ = _batches(1)[0]
    model(x)  # calibrates
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(graph_module: torch.fx.GraphModule, _inputs: list) -> object:
        graphs.append(graph_module)
        return graph_module.forward

    torch.compile(model, backend=recording_backend, fullgraph=True)(x).sum().backward()
    assert len(graphs) == 1
    # three activation and three weight quantizers, and the first conv's clip gradients by the
    # adjoint (its input has one channel and needs no gradient)
    assert traced_functions(graphs[0]) == 7
