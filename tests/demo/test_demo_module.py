"""The demo LightningModule trains compressed under ``torch.compile``."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from lightning_amct import CompressionCallback
from lightning_amct.demo import DemoClassifier, DigitsDataModule


@pytest.mark.filterwarnings("error::lightning_amct.graph.GraphWarning")  # the graph is captured eagerly
def test_compressed_demo_trains_under_torch_compile(recipes: Path, trainer_factory, compiled_quantizers) -> None:
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(graph_module: torch.fx.GraphModule, _inputs: list) -> object:
        graphs.append(graph_module)
        return graph_module.forward

    torch.manual_seed(0)
    module = DemoClassifier(width=16)
    callback = CompressionCallback(recipes / "quant.cfg")
    trainer = trainer_factory(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        enable_model_summary=True,  # its hooks, and the calibration's graph breaks, run eager code in the compiled call
        callbacks=[callback],
    )
    trainer.fit(torch.compile(module, backend=recording_backend), datamodule=DigitsDataModule(batch_size=32))
    assert trainer.state.finished and math.isfinite(trainer.callback_metrics["train_loss"])
    assert callback.artifacts["deploy_onnx"].is_file()  # exported from the module's own, uncompiled forward
    assert "val_acc" in trainer.callback_metrics
    assert module.net.fc.act_quant.calibrated
    quantizers = sum((compiled_quantizers(graph) for graph in graphs), Counter())
    assert quantizers, "the compiled graphs hold no quantizer: the compressed layers were not compiled"


def test_the_demo_at_its_own_width_trains_under_aot_autograd(recipes: Path, trainer_factory) -> None:
    """At width 64 the activations take the fused kernels' multi-threaded passes; under AOT
    autograd (inductor's front end) the compiler compiled a fused node called from eager code as a
    frame of its own, with the addresses of its traced tensors folded in: a segfault."""
    torch.manual_seed(0)
    module = DemoClassifier()
    callback = CompressionCallback(recipes / "quant.cfg")
    trainer = trainer_factory(
        max_epochs=1, limit_train_batches=3, limit_val_batches=1, enable_model_summary=True, callbacks=[callback]
    )
    trainer.fit(torch.compile(module, backend="aot_eager"), datamodule=DigitsDataModule(batch_size=32))
    assert trainer.state.finished and math.isfinite(trainer.callback_metrics["train_loss"])
