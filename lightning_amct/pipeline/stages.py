"""The two training stages of a recipe: the float model, then compression training.

Each stage is an ordinary Lightning run (progress bar, logger, checkpoint) rooted in
``<output_dir>/<stage>``; the compression stage adds :class:`~lightning_amct.CompressionCallback`.
Both end with the test set, so the summary compares the same metric on the same data, and both
save a Lightning checkpoint: ``float.ckpt`` can start a later recipe (``float: {ckpt_path: ...}``)
and ``compressed.ckpt`` works with ``lightning-amct validate|test|predict --ckpt_path``: both carry the
module's class path as a module built by Lightning's CLI does (:class:`ClassPathInCheckpoint`).

On the console, a line marks where each stage begins and ends. What Lightning says once per
process (the GPU/TPU lines, its tips) and the layer summary come from the float stage only: the
compression stage shows the plan table instead.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_amct.callback import CHECKPOINT_KEY, CompressionCallback
from lightning_amct.config import ConfigWarning
from lightning_amct.export.atomic import written_atomically
from lightning_amct.pipeline.quiet import lightning_info_silenced
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
        timed_steps: how many steps the median is taken over (0 when nothing trained).
        trained_steps: how many training steps the stage ran.
    """

    metric: float
    step_seconds: float | None
    checkpoint: Path
    timed_steps: int = 0
    trained_steps: int = 0


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
        synchronize(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        synchronize(pl_module)
        self.seconds.append(time.perf_counter() - self._start)

    @property
    def timed(self) -> list[float]:
        """The step times the median is taken over: all but the warm-up steps when enough steps ran."""
        return self.seconds[self.warmup :] if len(self.seconds) > self.warmup else self.seconds

    @property
    def median(self) -> float | None:
        """Median step time in seconds, None when no step ran."""
        return statistics.median(self.timed) if self.seconds else None


class ClassPathInCheckpoint(Callback):
    """Writes the module's class path into the hyperparameters of each checkpoint the stage saves.

    A module that Lightning's CLI builds carries it (``_class_path``, with Lightning's
    instantiator); the recipe builds its module itself. Without it, ``lightning-amct
    validate|test|predict --ckpt_path`` cannot read the checkpoint's hyperparameters as the
    model's arguments. With the instantiator named too, ``load_from_checkpoint`` still builds the
    module from them.

    Args:
        class_path: the recipe's ``model.class_path``.
    """

    def __init__(self, class_path: str) -> None:
        self.class_path = class_path

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        hparams = checkpoint.get(pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY)
        if hparams and "_class_path" not in hparams:
            checkpoint[pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY] = {
                **hparams,
                "_class_path": self.class_path,
                "_instantiator": "lightning.pytorch.cli.instantiate_module",
            }


def announce(message: str) -> None:
    """A line that stands out between Lightning's output: where a stage begins or ends."""
    rank_zero_info(f"\nlightning-amct ── {message} ──")


def synchronize(pl_module: pl.LightningModule) -> None:
    """Wait for the module's CUDA device (nothing on the CPU): a wall-clock time then covers its work."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


def make_trainer(
    recipe: Recipe, stage: str, epochs: int, callbacks: list[Callback], first: bool = True
) -> pl.Trainer:
    """A Trainer with the recipe's settings for ``stage``, logging under ``<output_dir>/<stage>``.

    Without a ``logger`` setting in the recipe, metrics go to a CSV file there
    (``<stage>/version_<n>/metrics.csv``), whether or not TensorBoard is installed. A Trainer
    that is not the run's ``first`` says nothing while it is built and, unless the recipe sets
    ``enable_model_summary``, prints no layer summary.
    """
    settings = {"logger": CSVLogger(recipe.output_dir, name=stage), **recipe.trainer}
    if not first:
        settings.setdefault("enable_model_summary", False)
    with nullcontext() if first else lightning_info_silenced():
        return pl.Trainer(
            **settings,
            max_epochs=epochs,
            callbacks=[*callbacks, ClassPathInCheckpoint(recipe.model.class_path)],
            default_root_dir=str(recipe.output_dir / stage),
        )


def run_test_set(
    trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule | None, recipe: Recipe
) -> float:
    """Run the test set and return the recipe's ``evaluate.metric``.

    Raises:
        RecipeError: the module logged no such metric (the message lists those it logged).
    """
    metric = recipe.evaluate.metric
    results = trainer.test(module, datamodule=datamodule, verbose=False)
    logged = results[0] if results else {}
    if metric not in logged:
        message = f"the test stage logged no {metric!r} (logged: {', '.join(logged) or 'nothing'})"
        raise recipe.error(message, "evaluate", "metric")
    return float(logged[metric])


def save_checkpoint(trainer: pl.Trainer, path: Path) -> None:
    """``trainer.save_checkpoint(path)`` written atomically, on every rank of a multi-process run.

    Every rank takes part in a save (the callbacks' hooks, a barrier), and rank 0 alone writes:
    a temporary file of each rank renamed onto ``path`` would put the other ranks' empty ones there.
    """
    if not trainer.is_global_zero:
        trainer.save_checkpoint(path, weights_only=False)  # writes nothing off rank 0
        return
    with written_atomically(path) as temporary:
        trainer.save_checkpoint(temporary, weights_only=False)


def float_stage(recipe: Recipe, module: pl.LightningModule, datamodule: pl.LightningDataModule | None) -> StageResult:
    """Train the float model (or load it from ``float.ckpt_path``), then test it."""
    timer = StepTimer()
    trainer = make_trainer(recipe, "float", recipe.float_stage.epochs or 0, [timer])
    metric_name = recipe.evaluate.metric
    if recipe.float_stage.ckpt_path is not None:
        checkpoint = Path(recipe.float_stage.ckpt_path)
        try:
            load_float_checkpoint(module, checkpoint)
        except ValueError as error:
            raise recipe.error(str(error), "float", "ckpt_path") from error
        metric = run_test_set(trainer, module, datamodule, recipe)
        announce(f"float model loaded from {checkpoint}: {metric_name} {metric:.4f}")
    else:
        announce(f"float stage: {recipe.float_stage.epochs} epoch(s)")
        trainer.fit(module, datamodule=datamodule)
        checkpoint = recipe.output_dir / FLOAT_CHECKPOINT
        save_checkpoint(trainer, checkpoint)
        metric = run_test_set(trainer, module, datamodule, recipe)
        announce(f"float stage done: {metric_name} {metric:.4f}, saved {checkpoint}")
    return StageResult(metric, timer.median, checkpoint, len(timer.timed), len(timer.seconds))


def compression_callback(recipe: Recipe) -> CompressionCallback:
    """The callback of the compression stage, writing its artifacts into the recipe's ``output_dir``.

    Make it before the float stage and call its ``resolve`` on the float module: a layer name the
    model lacks then fails before anything trains (the plan depends on the structure, not the weights).
    """
    stage = recipe.compress_stage
    inline = stage.inline
    with warnings.catch_warnings():
        if inline:  # reading the recipe warned of them, at their lines in its file
            warnings.simplefilter("ignore", ConfigWarning)
        callback = CompressionCallback(
            stage.config,
            stage.log_every_n_steps,
            output_dir=recipe.output_dir,
            prefix=ARTIFACT_PREFIX,
            quantize_outputs=stage.quantize_outputs,
        )
    if inline:  # so that a layer the model lacks is named at its line too
        callback.config_locations = stage.config_locations
    return callback


def compress_stage(
    recipe: Recipe, module: pl.LightningModule, datamodule: pl.LightningDataModule | None, callback: CompressionCallback
) -> StageResult:
    """Compression training of the float ``module`` (in place) with ``callback``, then the test set."""
    stage = recipe.compress_stage
    from_file = isinstance(stage.config, str) and os.path.isfile(stage.config)  # else a mapping, or config text
    config = stage.config if from_file else "the recipe's retrain config"
    announce(f"compression stage: {config}, {stage.epochs} epoch(s)")
    timer = StepTimer()
    trainer = make_trainer(recipe, "compress", stage.epochs, [callback, timer], first=False)
    trainer.fit(module, datamodule=datamodule)
    checkpoint = recipe.output_dir / COMPRESSED_CHECKPOINT
    save_checkpoint(trainer, checkpoint)
    metric = run_test_set(trainer, module, datamodule, recipe)
    announce(f"compression stage done: {recipe.evaluate.metric} {metric:.4f}, saved {checkpoint}")
    return StageResult(metric, timer.median, checkpoint, len(timer.timed), len(timer.seconds))


def load_float_checkpoint(module: pl.LightningModule, path: Path) -> None:
    """Load the weights of a float Lightning checkpoint into ``module`` (strictly).

    Raises:
        ValueError: no such file, not a checkpoint, not a Lightning one, already compressed, or
            weights that do not fit ``module`` (another class or other constructor arguments);
            the message names ``path`` (the recipe places it at its ``float.ckpt_path``).
    """
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any file torch.save did not write: the unpickler fails in many ways
        raise ValueError(f"{path} is not a checkpoint file (torch.load cannot read it)") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    if CHECKPOINT_KEY in checkpoint:
        raise ValueError(f"{path} holds a compressed model; the float stage needs a float one")
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:  # torch lists every missing, unexpected and misshapen tensor
        lines = str(error).splitlines()
        first = next((line.strip() for line in lines[1:] if line.strip()), lines[0] if lines else "")
        raise ValueError(
            f"{path} does not fit this {type(module).__name__} (another class or other init_args?): "
            f"{first.rstrip('.')}{f' (and {len(lines) - 2} more)' if len(lines) > 2 else ''}"
        ) from error