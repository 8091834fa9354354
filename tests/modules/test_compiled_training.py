"""A compressed model trains under ``torch.compile`` (inductor) as it does eagerly, in one graph,
where a checkpointed quantizer keeps no quantized copy."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition

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


def test_calibrated_training_forward_is_one_graph_with_every_quantizer(compiled_quantizers) -> None:
    model = compress_model(_model(), INT8, torch.zeros(1, 1, 12, 12))
    x, _ = _batches(1)[0]
    model(x)  # calibrates
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(graph_module: torch.fx.GraphModule, _inputs: list) -> object:
        graphs.append(graph_module)
        return graph_module.forward

    torch.compile(model, backend=recording_backend, fullgraph=True)(x).sum().backward()
    assert len(graphs) == 1
    # three activation and three weight quantizers, and the Function that gives the first conv's
    # input quantizer its clip gradients by the adjoint (its input has one channel and needs no gradient)
    assert compiled_quantizers(graphs[0]) == {"ulq_fake_quant": 3, "arq_fake_quant": 3, "autograd Function": 1}


def _saved_feature_maps(model: nn.Module, x: torch.Tensor) -> int:
    """How many feature maps (4-D tensors of the batch) a compiled training step of ``model`` keeps for its backward.

    The forward graph that the compiler's partitioner (inductor's min-cut) splits off returns the
    model's output and its buffer writes, then the tensors kept for the backward: the feature maps
    among them are counted.
    """
    kept: list[int] = []

    def forward_compiler(graph_module: torch.fx.GraphModule, _inputs: list) -> object:
        outputs = next(node for node in graph_module.graph.nodes if node.op == "output").args[0]
        values = [node.meta.get("val") for node in outputs if isinstance(node, torch.fx.Node)]
        kept.append(sum(isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[0] == x.shape[0] for v in values))
        return make_boxed_func(graph_module.forward)

    backend = aot_autograd(
        fw_compiler=forward_compiler,
        bw_compiler=lambda graph_module, _inputs: make_boxed_func(graph_module.forward),
        partition_fn=min_cut_rematerialization_partition,
    )
    torch.compile(model, backend=backend, fullgraph=True)(x).sum().backward()
    assert len(kept) == 1
    return kept[0]


class _Residual(nn.Module):
    """A conv/BN/ReLU stem ``a``, a residual block ``relu(bn2(conv2(relu(bn1(conv1(a))))) + a)``, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv0, self.conv1, self.conv2 = (nn.Conv2d(8, 8, 3, padding=1, bias=False) for _ in range(3))
        self.bn0, self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.relu0, self.relu1, self.relu2 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu0(self.bn0(self.conv0(x)))
        return self.head(self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(a))))) + a))


def test_a_checkpointed_quantizer_keeps_no_quantized_copy_in_a_compiled_step() -> None:
    """Checkpointed, a quantizer's output is computed again in the backward: a compiled step keeps
    the feature maps that float keeps; not checkpointed, it keeps the quantized copy of each
    layer's input too. The plan checkpoints the quantizers whose input has another reader (the
    model's input, the residual add), not those after a ReLU that only their layer reads."""
    x = torch.rand(4, 8, 6, 6)
    compressed = compress_model(_Residual().train(), INT8, x[:1])
    compressed(x)  # calibrates
    quantizers = {name: m.act_quant for name, m in compressed.named_modules() if hasattr(m, "act_quant")}
    assert {name: q.checkpointed for name, q in quantizers.items()} == {
        "conv0": True, "conv1": True, "conv2": False, "head.1": False
    }
    float_maps = _saved_feature_maps(_Residual().train(), x)
    for checkpointed, extra in ((True, 0), (False, 3)):  # the head's input is flat: not a feature map
        for quantizer in quantizers.values():
            quantizer.checkpointed = checkpointed
        assert _saved_feature_maps(compressed, x) == float_maps + extra


class _TwoReaders(nn.Module):
    """Two Linear layers that read one input, as attention's query and key projections do: one
    quantizer for both, called once by each in a compiled forward, and checkpointed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.query, self.key = nn.Linear(8, 6), nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.query(x) * self.key(x)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_shared_checkpointed_quantizer_trains_under_a_backend_that_runs_the_graph_as_it_is(backend: str) -> None:
    """The "eager" backend runs the captured graph's checkpoint as ``torch.utils.checkpoint`` does,
    which keeps the region's inputs for its second run and refuses ones changed in between: each
    call of the shared quantizer writes its settled clips into the clip Parameters."""
    x = torch.rand(5, 8) * 2 - 0.5
    eager_model = compress_model(_TwoReaders().train(), INT8, x[:1])
    eager_model(x)  # calibrates
    assert eager_model.query.act_quant is eager_model.key.act_quant and eager_model.query.act_quant.checkpointed
    compiled_model = copy.deepcopy(eager_model)
    results = []
    for model, run in ((eager_model, eager_model), (compiled_model, torch.compile(compiled_model, backend=backend))):
        run(x).square().sum().backward()
        results.append({name: p.grad for name, p in model.named_parameters()})
    eager, compiled = results
    assert eager.keys() == compiled.keys() and all(grad is not None for grad in eager.values())
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)
