"""The graph capture: what it records, what it refuses, what it leaves as it was."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

from lightning_amct import zoo
from lightning_amct.graph import GraphError, as_input_tuple, capture_graph

if TYPE_CHECKING:
    from conftest import Levit


def _export_ops(model: nn.Module, inputs: tuple) -> list[tuple[str, str | None]]:
    """``(operator, innermost module)`` of each operator in ``torch.export``'s training IR."""
    exported = torch.export.export(model.eval(), inputs, strict=False)
    found = []
    for node in exported.graph.nodes:
        if node.op != "call_function" or "_assert_tensor_metadata" in str(node.target):
            continue  # export's own shape checks, not the model's operators
        name = "getitem" if node.target.__name__ == "getitem" else node.target.overloadpacket.__name__
        stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values() if path]
        found.append((name, stack[-1] if stack else ""))
    return found


@pytest.mark.parametrize("name", ["convnext", "gpt2"])
def test_the_operators_and_their_modules_are_those_torch_export_records(name: str) -> None:
    model, example = zoo.build(name, "tiny")
    inputs = example if isinstance(example, tuple) else (example,)
    graph = capture_graph(model, inputs)
    assert [(node.op, node.module) for node in graph.nodes if node.kind == "op"] == _export_ops(model, inputs)


class Stateful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.fc(x + torch.rand_like(x))


def test_what_the_run_writes_is_put_back() -> None:
    model, x = Stateful(), torch.zeros(2, 4)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    graph = capture_graph(model, x)
    assert model.calls.item() == 0 and torch.equal(torch.rand(3), expected)
    (add_,) = [node for node in graph.nodes if node.op == "add_"]
    assert add_.args[0].target == "calls" and add_.users == []


class RescaledInEval(nn.Module):
    """RWKV's trick: in eval mode the weight is divided in place, and a flag says so; the next
    training forward reads the flag and multiplies the weight back."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.rescaled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rescaled == self.training:
            with torch.no_grad():
                self.fc.weight.mul_(2.0) if self.training else self.fc.weight.div_(2.0)
            self.rescaled = not self.training
        self.seen = tuple(x.shape)  # an attribute a forward adds
        return self.fc(x)


def test_attributes_the_run_sets_are_put_back_with_the_tensors_it_writes() -> None:
    model, x = RescaledInEval(), torch.randn(2, 4)
    expected = model(x)
    del model.seen
    capture_graph(model, x)
    assert model.training and not model.rescaled and "seen" not in vars(model)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_a_cache_that_the_model_fills_in_eval_mode_is_emptied_again(levit: Levit) -> None:
    """Filled by the capture, LeViT's cache would hold the attention biases of capture time after training."""
    caches = levit.caches()
    capture_graph(levit.model, levit.inputs)
    after = levit.caches()
    assert caches and all(a is b for a, b in zip(after, caches)) and not any(after)
    levit.train_biases()
    with torch.no_grad():
        output = levit.model.eval()(levit.inputs).logits
        expected = levit.emptied(levit.model).eval()(levit.inputs).logits
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


class NumpyRoundTrip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.from_numpy(x.numpy() * 2))


def test_a_forward_through_numpy_is_refused_naming_the_line() -> None:
    with pytest.raises(GraphError, match=r"reads a tensor's value in Python \(numpy\).*x\.numpy\(\) \* 2"):
        capture_graph(NumpyRoundTrip(), torch.zeros(1, 4))


def test_example_inputs_as_a_dict_of_keyword_arguments_say_what_to_give_instead() -> None:
    with pytest.raises(TypeError, match=r"got dict: a dict is taken for keyword arguments, .* give \(batch,\)"):
        as_input_tuple({"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    assert as_input_tuple((batch,)) == (batch,)
