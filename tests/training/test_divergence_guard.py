"""The per-step finiteness check and the check of what is about to be written."""

from __future__ import annotations

import pytest
import torch

from lightning_amct import compress_model
from lightning_amct.demo import DemoNet
from lightning_amct.export import save_compressed
from lightning_amct.training.divergence import DivergenceGuard, check_finite, describe, written_state

QUANT = """
retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 4 clip_min: -4 } } }
retrain_weight_quant_config { ulq_retrain { } }
"""


def _model() -> DemoNet:
    model = DemoNet(width=16)
    compress_model(model, QUANT, torch.zeros(1, 1, 8, 8))
    model(torch.rand(2, 1, 8, 8))  # the learned weight scales initialise
    return model


@pytest.mark.parametrize(
    ("parameter", "named"),
    [
        ("block.conv2.weight", "the weight of layer 'block.conv2'"),
        ("fc.act_quant.clip_max", "the clip_max of layer 'fc'"),
        ("pointwise.conv.weight_quant.scale", "the weight scale of layer 'pointwise.conv'"),
        ("stem.bn.bias", "the bias of layer 'stem.bn'"),
    ],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_names_the_first_non_finite_parameter_and_the_step(parameter: str, named: str, value: float) -> None:
    model, guard = _model(), DivergenceGuard()
    guard.after_step(model, step=4)
    with torch.no_grad():
        model.get_parameter(parameter).view(-1)[-1] = value
    with pytest.raises(FloatingPointError, match=f"training diverged at step 5: {named} is not finite"):
        guard.after_step(model, step=5)


def test_frozen_parameters_are_not_checked_every_step() -> None:
    model = _model()
    model.fc.weight.requires_grad_(False)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    DivergenceGuard().after_step(model, step=1)  # nothing trains it: the checks before writing find it
    with pytest.raises(FloatingPointError, match="not writing the checkpoint: the weight of layer 'fc'"):
        check_finite(dict(model.named_parameters()), "the checkpoint", step=1)


def test_check_before_writing_ignores_what_is_not_a_float_tensor() -> None:
    state = {"mask": torch.tensor([True, False]), "count": torch.tensor(3), "note": "x", "w": torch.ones(2)}
    check_finite(state, "the artifacts", step=0)
    state["layer.weight_quant.scale"] = torch.tensor([1.0, float("-inf")])
    with pytest.raises(FloatingPointError, match=r"not writing the artifacts: the weight scale of layer 'layer' .* at step 3"):
        check_finite(state, "the artifacts", step=3)


def test_describe_strips_the_quantizer_from_the_layer_name() -> None:
    assert describe("net.block.bn2.output_quant.clip_min") == "the output clip_min of layer 'net.block.bn2'"
    assert describe("net.fc.act_quant.clip_max") == "the clip_max of layer 'net.fc'"


def test_what_is_written_includes_norm_statistics_and_save_compressed_checks_it(tmp_path) -> None:
    """A NaN batch puts NaN into BatchNorm's running statistics in its forward, before any weight changes."""
    model = compress_model(DemoNet(width=16), "retrain_data_quant_config { ulq_quantize {} }", torch.zeros(1, 1, 8, 8))
    model.train()(torch.rand(4, 1, 8, 8))
    written = written_state(model)
    assert "stem.bn.running_var" in written and "stem.bn.num_batches_tracked" not in written
    with torch.no_grad():
        model.stem.bn.running_var[3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"not writing the artifacts: the running_var of layer 'stem.bn'"):
        save_compressed(model.eval(), tmp_path, torch.zeros(1, 1, 8, 8))
    assert not any(tmp_path.iterdir())
