"""A model trained by ``CompressionCallback`` in a real Trainer exports and loads back."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_amct import CompressionCallback
from lightning_amct.demo import DemoClassifier, DigitsDataModule, digits_tensors
from lightning_amct.export import load_compressed, save_compressed


def test_fit_with_the_callback_then_save_and_load(recipes: Path, trainer_factory, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = DemoClassifier(width=32)
    trainer = trainer_factory(max_steps=4, callbacks=[CompressionCallback(recipes / "compressed2.cfg")])
    trainer.fit(module, DigitsDataModule(batch_size=64))

    paths = save_compressed(module, tmp_path / "export")
    loaded = load_compressed(paths["checkpoint"], DemoClassifier(width=32))
    images = digits_tensors()["test"].tensors[0]
    module.eval()
    with torch.no_grad():
        expected, got = module(images), loaded(images)
    # One quantization step of the output, as in test_recipes.py: the head's input step times the
    # largest row L1 norm of its weight (the paths differ by a step where float rounding decides).
    head = loaded.net.fc
    step = float(head.act_quant.scale) * float(head.weight.abs().sum(dim=1).max())
    torch.testing.assert_close(got, expected, rtol=0, atol=step + 1e-4)
