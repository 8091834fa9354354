"""``CompressionCallback``: one line turns a Lightning training run into compression training."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_amct.config import config_source_text, load_config, load_config_with_locations
from lightning_amct.export import save_compressed
from lightning_amct.modules.apply import CompressionState, apply_plan, compression_state
from lightning_amct.plan import CompressionPlan, resolve_plan
from lightning_amct.prune import format_report
from lightning_amct.training.observed import compression_parameters, observe
from lightning_amct.training.weight_decay import exclude_from_weight_decay

CHECKPOINT_KEY = "lightning_amct"


class CompressionCallback(Callback):
    """Quantization-aware training, channel pruning and 4:2 sparsity from an AMCT retrain config.

    The callback compresses the LightningModule in ``setup`` (before the optimizer exists and
    before DDP wraps the model): channel pruning physically removes channels, then each planned
    layer becomes a compressed layer that fake-quantizes its input and weight. Activation clips
    without ``clip_max_min`` initialise themselves (IFMR) on the first ``batch_num`` training
    batches, once: the counter is a buffer, so a resumed run never calibrates again. At fit start
    the clip and scale parameters leave the optimizer's decaying groups (see
    :mod:`lightning_amct.training.weight_decay`). Every ``log_every_n_steps`` the clips and
    learned scales go to the Trainer's loggers as ``amct/<layer>/clip_max`` (rank zero), and a
    non-finite clip, scale or weight stops training with an error naming the layer. At the end of
    fit, rank zero writes the compressed checkpoint, the fake-quant and deploy ONNX models, the
    AMCT record and a report into ``output_dir`` (:attr:`artifacts` maps their kinds to paths).

    Checkpoints carry a plain record under ``checkpoint["lightning_amct"]`` (plan, kept channel
    indices, config text). On resume or ``trainer.validate/test(ckpt_path=...)`` with a fresh
    module the callback rebuilds the same structure in ``setup``: the pruned shapes depend only
    on the architecture and the plan, so the checkpoint's weights load strictly, and the record
    restores the kept indices.

    Args:
        config: the retrain config: a ``.cfg`` path, its text, or a mapping of the same
            structure (a protobuf message works too). Validated here: a bad config fails at
            construction with file, line and column.
        log_every_n_steps: how often to log clips and scales; default: the Trainer's.
        output_dir: where the artifacts go at the end of fit (see
            :func:`lightning_amct.export.save_compressed`); default:
            ``<trainer.default_root_dir>/compressed``.
        prefix: file name prefix of the artifacts (``<prefix>_compressed.pt``, ...).
        export: write the artifacts at the end of fit (rank zero only, each file atomically).
        quantize_outputs: also quantize (and train the clips of) the outputs of quantized layers
            that go anywhere but into quantized layers: residual adds, pooling. The AMCT dialect
            quantizes layer inputs only, which leaves such layers in float in ONNX Runtime; with
            this the deploy model runs every quantized layer with integer kernels. The outputs'
            clips are logged as ``amct/<module>/output_clip_max``.

    Raises:
        ConfigError: the config is malformed or inconsistent.

    Example::

        trainer = Trainer(callbacks=[CompressionCallback("quant.cfg")])
        trainer.fit(model, datamodule)
    """

    def __init__(
        self,
        config: Union[str, Path, Dict[str, Any]],
        log_every_n_steps: Optional[int] = None,
        output_dir: Optional[Union[str, Path]] = None,
        prefix: str = "model",
        export: bool = True,
        quantize_outputs: bool = False,
    ) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be a positive number of steps, got {log_every_n_steps}")
        if not prefix or any(sep in prefix for sep in ("/", "\\")):
            raise ValueError(f"prefix must be a non-empty file name part without path separators, got {prefix!r}")
        # The locations put an error found later against the model (a layer it lacks) at its line.
        self.config, self.config_locations = load_config_with_locations(config)
        self.config_text = config_source_text(config)
        self.log_every_n_steps = log_every_n_steps
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.prefix = prefix
        self.export = export
        self.quantize_outputs = quantize_outputs
        self.history: list[dict[str, float]] = []
        self.artifacts: dict[str, Path] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Spawned DDP workers receive the callback pickled: send the text, parse it there.
        state = self.__dict__.copy()
        del state["config"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.config = load_config(self.config_text)

    # -- structure ---------------------------------------------------------------------------
    def resolve(self, pl_module: pl.LightningModule) -> CompressionPlan:
        """The plan for ``pl_module`` (override to adjust it before it is applied)."""
        return resolve_plan(
            pl_module,
            self.config,
            pl_module.example_input_array,
            quantize_outputs=self.quantize_outputs,
            locations=self.config_locations,
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if compression_state(pl_module) is not None:
            return  # already compressed: a second stage on the same module
        record = _record_from_checkpoint(trainer.ckpt_path)
        example = pl_module.example_input_array
        if record is not None:
            state = CompressionState.from_record(record)
            apply_plan(pl_module, state.plan, example, state.kept_channels, state.config_text)
        else:
            state = apply_plan(pl_module, self.resolve(pl_module), example, config_text=self.config_text)
            self._agree_across_ranks(trainer, state)
        summary = f"lightning-amct: compressed {type(pl_module).__name__}\n{state.plan}"
        if state.prune_report:
            summary += f"\n\nchannel pruning:\n{format_report(state.prune_report)}"
        rank_zero_info(summary)

    @staticmethod
    def _agree_across_ranks(trainer: pl.Trainer, state: CompressionState) -> None:
        if trainer.world_size < 2 or not state.kept_channels:
            return
        chosen = trainer.strategy.broadcast(state.kept_channels, src=0)
        # Every rank learns of a disagreement, so all of them stop instead of one waiting forever.
        if trainer.strategy.reduce_boolean_decision(chosen != state.kept_channels, all=False):
            raise RuntimeError(
                "ranks chose different channels to prune: the model's weights differ between ranks "
                "at setup; seed the model's initialisation identically (seed_everything) on every rank"
            )

    # -- training ----------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = compression_parameters(pl_module)
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for optimizer in trainer.optimizers:
            exclude_from_weight_decay(optimizer, params, schedulers)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % every:
            return
        values = observe(pl_module)  # every rank checks: an error must not leave ranks waiting
        if not values or not trainer.is_global_zero:
            return
        self.history.append({"step": float(trainer.global_step), **values})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.export or not trainer.is_global_zero or trainer.interrupted:
            return
        output_dir = self.output_dir or Path(trainer.default_root_dir) / "compressed"
        self.artifacts = save_compressed(pl_module, output_dir, pl_module.example_input_array, self.prefix)
        rank_zero_info(f"lightning-amct: wrote {len(self.artifacts)} artifacts to {output_dir}")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        state = compression_state(pl_module)
        if stage != "fit" or state is None or not state.kept_channels:
            return
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            # ddp_spawn/ddp_fork copy rank 0's weights back into the module of the launching
            # process, which still has the original shapes: channel-pruned weights cannot go
            # there. Send none, and say where the trained model is.
            pl_module._register_state_dict_hook(_send_nothing_back)
            rank_zero_warn(
                "lightning-amct: with channel pruning under a spawning strategy, the module in the "
                "launching process keeps its original structure and weights; the trained, pruned model "
                "is in the checkpoints and the compressed artifacts"
            )

    # -- checkpoints -------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        state = compression_state(pl_module)
        if state is not None:
            checkpoint[CHECKPOINT_KEY] = state.to_record()

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        record = checkpoint.get(CHECKPOINT_KEY)
        state = compression_state(pl_module)
        if record is None or state is None:
            return
        saved = CompressionState.from_record(record)
        if saved.plan != state.plan:
            raise ValueError(
                "the checkpoint was trained with another compression config than this callback's: "
                "resume with the config it was trained with"
            )
        state.kept_channels = saved.kept_channels

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def _send_nothing_back(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if not prefix:
        state_dict.clear()


def _record_from_checkpoint(path: object) -> dict | None:
    """The compression record of the checkpoint at ``path`` (None without a path or record)."""
    if not path:
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return checkpoint.get(CHECKPOINT_KEY)
