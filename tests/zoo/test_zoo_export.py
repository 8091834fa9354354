"""Every zoo model, INT8, through a few training steps and out to ONNX: the PyTorch fake-quant model
of the artifacts (the frozen model ``load_compressed`` gives back), the fake-quant ONNX and the
deploy ONNX in ONNX Runtime agree (top-1, and logits within :data:`OUTPUT_STEPS` steps of the
output); the deploy model has every BatchNorm folded and ONNX Runtime runs every quantized layer
of it with integer kernels.

The reference is the frozen model, not the training-time one: deployment adds its bias in int32,
on a grid of step ``s_x * s_w``, and the frozen model does too, while training keeps the float
bias. That half-step change moves a value across a rounding boundary of the next grid now and
then, and in a network 50 layers deep such one-step moves add up to more than one step of the
output (``tests/export/test_recipes.py`` compares the training-time model on the shallow demo).

Float convolutions still add in different orders (oneDNN's and ONNX Runtime's, both chosen by the
CPU's instruction set), so a value that lands within float rounding of a boundary of a hidden
layer's grid rounds to neighbouring steps on the two sides, and that move travels on to the head.
The head's own step bound (every input of the head one step off) held for every model on an AMD
EPYC; on an Intel Xeon MobileNetV2 came out 1.02 steps off (every other model at most 0.29), with
the same top-1. Two steps still tell such moves from an export defect (a wrong scale, a
dropped bias, a BatchNorm folded twice), which moves the logits by many.

The configs are ``recipes/quant.cfg`` and ``recipes/compressed1.cfg`` (channel pruning 0.3 with
INT8) without their demo layer names; ``quantize_outputs`` puts the output quantizers in that
make ONNX Runtime run the deploy model in integers. The output step is
``s_x * max_j sum_i |W_ji|`` of the layer that produces the logits (see ``test_recipes.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from test_zoo_compression import GPT2_CONV1D, quant_config, quietly, train_steps

from lightning_amct import compress_model, load_config
from lightning_amct.export import freeze_model, save_compressed

pytest.importorskip("transformers")
from lightning_amct import zoo  # noqa: E402  (needs transformers)

RECIPES = Path(__file__).parents[2] / "recipes"
FLOAT_TOLERANCE = 1e-4
#: Output steps (of the head's grid: every input of the head one step off) the logits may differ by.
OUTPUT_STEPS = 2
#: Steps that move every weight off its initial value without blowing up the random-init model:
#: at 0.05 two steps drive BatchNorm scales of MobileNetV2 to -18, and a network of such gains
#: turns the one-step rounding differences of float convolutions (torch and ONNX Runtime add in
#: different orders) into differences of many steps.
TRAINING_LR = 1e-3


def _prune_and_quant_config():
    """``compressed1.cfg`` (channel pruning 0.3, INT8) without the names of the demo's layers."""
    config = load_config(RECIPES / "compressed1.cfg")
    del config.skip_layers[:]
    del config.quant_skip_layers[:]
    del config.override_layer_configs[:]
    return config


def _run(path: Path, inputs: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": inputs.numpy()})[0])


@pytest.mark.parametrize("make_config", [quant_config, _prune_and_quant_config], ids=["int8", "pruned_int8"])
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_model_agrees_in_onnx_runtime(name: str, make_config, tmp_path: Path) -> None:
    model, example = zoo.build(name, batch=1)
    quietly(compress_model, model, make_config(), example, quantize_outputs=True)
    train_steps(model, zoo.example_inputs(name, batch=4, seed=10), lr=TRAINING_LR)
    _check_export(name, model, example, tmp_path)


def _check_export(name: str, model: torch.nn.Module, example: tuple, tmp_path: Path) -> None:
    paths = save_compressed(model, tmp_path, example)

    (inputs,) = zoo.example_inputs(name, batch=4, seed=1)
    frozen = freeze_model(model, example)
    with torch.no_grad():
        expected = frozen.module(inputs)
    head = frozen.layers[zoo.ZOO[name].output_layer]
    step = head.activation.scale * float(head.weight().abs().sum(dim=1).max())
    for key in ("fake_quant_onnx", "deploy_onnx"):
        got = _run(paths[key], inputs)
        assert float((got - expected).abs().max()) <= OUTPUT_STEPS * step + FLOAT_TOLERANCE, key
        assert torch.equal(got.argmax(1), expected.argmax(1)), key
    # every BatchNorm folded into its convolution, every quantized layer run with integer kernels
    deploy = onnx.load(paths["deploy_onnx"])
    assert "BatchNormalization" not in {node.op_type for node in deploy.graph.node}
    report = json.loads(paths["report_json"].read_text())
    assert not report["float_in_deployment"]
    if name == "gpt2":  # its Conv1D layers as ONNX Runtime's QGemm
        assert [row["ort_kernel"] for row in report["layers"] if row["type"] == "Conv1D"] == ["QGemm"] * GPT2_CONV1D
