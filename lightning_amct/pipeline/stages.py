"""The two training stages of a recipe: the float model, then compression training.

Each stage is an ordinary Lightning run (progress bar, logger, checkpoint) rooted in
``<output_dir>/<stage>``; the compression stage adds :class:`~lightning_amct.CompressionCallback`.
Both end with the test set, so the summary compares the same metric on the same data, and both
save a Lightning checkpoint: ``float.ckpt`` can start a later recipe (``float: {ckpt_path: ...}``)
and ``compressed.ckpt`` works with ``lightning-amct test --ckpt_path`` when the callback is given.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_amct.callback import CHECKPOINT_KEY, CompressionCallback
from lightning_amct.pipeline.recipe import Recipe, RecipeError

#: File name prefix of the compressed artifacts (model_compressed.pt, ...).
ARTIFACT_PREFIX = "model"

FLOAT_CHECKPOINT = "float.ckpt"
COMPRESSED_CHECKPOINT = "compressed.ckpt"


@dataclass(frozen=True)
class StageResult:
    """What a stage measured.

    Attributes:
        metric: the recipe's test metric after the stage.
        step_seconds: median training step time (forward, backward, optimizer), None when the
            float model was loaded rather than trained.
        checkpoint: the Lightning checkpoint the stage wrote or read.
    """

    metric: float
    step_seconds: float | None
    checkpoint: Path


class StepTimer(Callback):
    """Times every training step, from batch start to batch end (the optimizer step included).

    Args:
        warmup: steps left out of :attr:`median` when there are more (first-batch costs,
            activation-clip calibration).
    """

    def __init__(self, warmup: int = 3) -> None:
        self.warmup = warmup
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        _synchronize(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        _synchronize(pl_module)
        self.seconds.append(time.perf_counter() - self._start)

    @property
    def median(self) -> float:
        """Median step time in seconds, without the warm-up steps when enough steps ran."""
        steps = self.seconds[self.warmup :] if len(self.seconds) > self.warmup else self.seconds
        return statistics.median(steps)


def _synchronize(pl_module: pl.LightningModule) -> None:
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


def make_trainer(recipe: Recipe, stage: str, epochs: int, callbacks: list[Callback]) -> pl.Trainer:
    """A Trainer with the recipe's settings for ``stage``, logging under ``<output_dir>/<stage>``.

    Without a ``logger`` setting in the recipe, metrics go to a CSV file there
    (``<stage>/version_<n>/metrics.csv``), whether or not TensorBoard is installed.
    """
    settings = {"logger": CSVLogger(recipe.output_dir, name=stage), **recipe.trainer}
    return pl.Trainer(
        **settings,
        max_epochs=epochs,
        callbacks=callbacks,
        default_root_dir=str(recipe.output_dir / stage),
    )


def run_test_set(
    trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule, metric: str
) -> float:
    """Run the test set and return ``metric``.

    Raises:
        RecipeError: the module logged no such metric (the message lists those it logged).
    """
    results = trainer.test(module, datamodule=datamodule, verbose=False)
    logged = results[0] if results else {}
    if metric not in logged:
        raise RecipeError(
            f"evaluate.metric: the test stage logged no {metric!r} (logged: {', '.join(logged) or 'nothing'})"
        )
    return float(logged[metric])


def float_stage(recipe: Recipe, module: pl.LightningModule, datamodule: pl.LightningDataModule) -> StageResult:
    """Train the float model (or load it from ``float.ckpt_path``), then test it."""
    timer = StepTimer()
    trainer = make_trainer(recipe, "float", recipe.float_stage.epochs or 0, [timer])
    if recipe.float_stage.ckpt_path is not None:
        checkpoint = Path(recipe.float_stage.ckpt_path)
        load_float_checkpoint(module, checkpoint)
    else:
        trainer.fit(module, datamodule=datamodule)
        checkpoint = recipe.output_dir / FLOAT_CHECKPOINT
        trainer.save_checkpoint(checkpoint, weights_only=False)
    metric = run_test_set(trainer, module, datamodule, recipe.evaluate.metric)
    return StageResult(metric, timer.median if timer.seconds else None, checkpoint)


def compress_stage(
    recipe: Recipe, module: pl.LightningModule, datamodule: pl.LightningDataModule
) -> tuple[StageResult, CompressionCallback]:
    """Compression training of the float ``module`` (in place), then the test set."""
    stage = recipe.compress_stage
    callback = CompressionCallback(
        stage.config,
        stage.log_every_n_steps,
        output_dir=recipe.output_dir,
        prefix=ARTIFACT_PREFIX,
        quantize_outputs=stage.quantize_outputs,
    )
    timer = StepTimer()
    trainer = make_trainer(recipe, "compress", stage.epochs, [callback, timer])
    trainer.fit(module, datamodule=datamodule)
    checkpoint = recipe.output_dir / COMPRESSED_CHECKPOINT
    trainer.save_checkpoint(checkpoint, weights_only=False)
    metric = run_test_set(trainer, module, datamodule, recipe.evaluate.metric)
    return StageResult(metric, timer.median, checkpoint), callback


def load_float_checkpoint(module: pl.LightningModule, path: Path) -> None:
    """Load the weights of a float Lightning checkpoint into ``module`` (strictly).

    Raises:
        RecipeError: no such file, not a Lightning checkpoint, or already compressed.
    """
    if not path.is_file():
        raise RecipeError(f"float.ckpt_path: no such file: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in checkpoint:
        raise RecipeError(f"float.ckpt_path: {path} is not a Lightning checkpoint (no 'state_dict')")
    if CHECKPOINT_KEY in checkpoint:
        raise RecipeError(f"float.ckpt_path: {path} holds a compressed model; the float stage needs a float one")
    module.load_state_dict(checkpoint["state_dict"])
