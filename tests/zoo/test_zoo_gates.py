"""Gates of real architectures: EfficientNet's SiLUs and squeeze-excite sigmoids, MobileNetV3's
hard-sigmoid gates, with ``quantize_outputs``: every one is a gate site, ONNX Runtime runs the
deploy model's sigmoids as lookup tables and the multiplies of the gates in integers, and a run
resumed from a Lightning checkpoint has the same gates. (That the PyTorch model, the fake-quant
ONNX and the deploy ONNX agree is ``test_zoo_export.py``'s, for every zoo model.)"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import onnx
import onnxruntime as ort
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_zoo_compression import ZooClassifier, quant_config, quietly
from torch import nn

from lightning_amct import CompressionCallback, compress_model, compression_state
from lightning_amct.export import save_compressed
from lightning_amct.modules.gate_quant import GATE_QUANT

pytest.importorskip("transformers")
from lightning_amct import zoo  # noqa: E402  (needs transformers)

GATES = (nn.Sigmoid, nn.SiLU, nn.Hardsigmoid)


def _gated(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, GATES) and hasattr(module, GATE_QUANT)}


@pytest.mark.parametrize("name", ["efficientnet", "mobilenet_v3"])
def test_every_gate_runs_in_integers_in_the_deploy_model(name: str, tmp_path: Path) -> None:
    model, example = zoo.build(name, batch=1)
    gates = {name for name, module in model.named_modules() if isinstance(module, GATES)}
    quietly(compress_model, model, quant_config(), example, quantize_outputs=True)
    plan = compression_state(model).plan
    assert set(plan.gates) == gates == _gated(model)
    model.train()
    with torch.no_grad():
        model(*zoo.example_inputs(name, batch=4, seed=10))  # calibrates the learned quantizers
    paths = save_compressed(model.eval(), tmp_path, example)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(paths["deploy_onnx"]), options, providers=["CPUExecutionProvider"])
    ops = Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    # no sigmoid in float: a lookup table each; each gate's multiply in integers (one a gate here);
    # only the hard swishes' multiplies in float (ONNX Runtime's HardSwish is a HardSigmoid and a Mul)
    assert ops["Sigmoid"] == 0 and ops["QLinearSigmoid"] == sum(f in ("sigmoid", "silu") for f in plan.gates.values())
    assert ops["QLinearMul"] == len(plan.gates) and ops["Mul"] == sum(isinstance(m, nn.Hardswish) for m in model.modules())
    report = json.loads(paths["report_json"].read_text())
    assert {row["module"]: row["function"] for row in report["gates"]} == plan.gates


def test_a_run_resumed_from_a_checkpoint_has_the_checkpoints_gates(tmp_path: Path, trainer_factory) -> None:
    def callback() -> CompressionCallback:
        return CompressionCallback(quant_config(), export=False, quantize_outputs=True)

    pl.seed_everything(0)
    trained = ZooClassifier("efficientnet")
    trainer = trainer_factory(max_epochs=1, enable_checkpointing=True,
                              callbacks=[callback(), ModelCheckpoint(dirpath=tmp_path, filename="trained")])  # fmt: skip
    quietly(trainer.fit, trained)
    gates = compression_state(trained).plan.gates
    record = torch.load(tmp_path / "trained.ckpt", weights_only=True)["lightning_amct"]
    assert record["plan"]["gates"] == gates and set(gates) == _gated(trained)
    # the record's plan, gates included, is the one a resumed run compares its own with and rebuilds
    fresh = ZooClassifier("efficientnet")
    trainer = trainer_factory(max_epochs=2, limit_train_batches=1, callbacks=[callback()])
    quietly(trainer.fit, fresh, ckpt_path=tmp_path / "trained.ckpt")
    assert trainer.global_step == 4 and compression_state(fresh).plan.gates == gates and _gated(fresh) == set(gates)
