"""A diverged run stops within a step, naming the layer and the step, and nothing is written from it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_amct import CompressionCallback
from lightning_amct.demo import DemoClassifier, DigitsDataModule

RECIPES = Path(__file__).parents[2] / "recipes"


class NaNInputAtStep(pl.Callback):
    """Puts one NaN pixel into the training batch of one step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            batch[0][0, 0, 0, 0] = float("nan")


class SpoilAtTrainEnd(pl.Callback):
    """Makes one weight of the head NaN after the last step, before the artifacts are written."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            pl_module.net.fc.weight[0, 0] = float("nan")


@pytest.mark.parametrize("recipe", ["quant", "compressed2"])
def test_one_nan_input_stops_the_run_at_the_next_step_whatever_the_log_interval(
    recipe: str, trainer_factory, tmp_path: Path
) -> None:
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = trainer_factory(
        max_epochs=1, log_every_n_steps=50, enable_checkpointing=True,
        callbacks=[NaNInputAtStep(7), CompressionCallback(RECIPES / f"{recipe}.cfg"), every_step],
    )  # fmt: skip
    # the NaN batch's update makes the weights NaN (not the clips: they get no gradient from it)
    with pytest.raises(FloatingPointError, match=r"training diverged at step 8: the \w+ of layer '[\w.]+' is not finite"):
        trainer.fit(DemoClassifier(width=16), DigitsDataModule(batch_size=32))
    written = sorted(path.name for path in (tmp_path / "ckpt").iterdir())
    assert written == [f"step={step}.ckpt" for step in range(1, 8)]
    for path in written:
        state = torch.load(tmp_path / "ckpt" / path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())
    assert not (tmp_path / "compressed").exists()


def test_a_checkpoint_of_a_diverged_model_is_refused(trainer_factory, tmp_path: Path) -> None:
    trainer = trainer_factory(max_steps=2, callbacks=[CompressionCallback(RECIPES / "quant.cfg", export=False)])
    module = DemoClassifier(width=16)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    with torch.no_grad():
        module.net.block.conv1.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"not writing the checkpoint: the weight of layer 'net\.block\.conv1'"):
        trainer.save_checkpoint(tmp_path / "diverged.ckpt")
    assert not (tmp_path / "diverged.ckpt").exists()


def test_artifacts_of_a_diverged_model_are_refused(trainer_factory, tmp_path: Path) -> None:
    trainer = trainer_factory(max_steps=2, callbacks=[SpoilAtTrainEnd(), CompressionCallback(RECIPES / "quant.cfg")])
    with pytest.raises(FloatingPointError, match=r"not writing the artifacts: the weight of layer 'net\.fc' .* at step 2"):
        trainer.fit(DemoClassifier(width=16), DigitsDataModule(batch_size=32))
    assert not (tmp_path / "compressed").exists()
