"""``CompressionCallback``: one line turns a Lightning training run into compression training."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning, StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_amct.config import ConfigWarning, config_source_text, load_config, load_config_with_locations
from lightning_amct.export import save_compressed
from lightning_amct.export.atomic import directory_obstacle
from lightning_amct.export.save import check_prefix
from lightning_amct.modules.apply import CompressionState, apply_plan, compression_state
from lightning_amct.modules.compressed_layers import CompressedLayer
from lightning_amct.modules.output_quant import OUTPUT_QUANT, output_quantizers, restore_output_hooks
from lightning_amct.plan import CompressionPlan, resolve_plan
from lightning_amct.plan.compare import plan_differences
from lightning_amct.proto.retrain_config_pytorch_pb2 import AMCTRetrainConfig
from lightning_amct.prune import format_report
from lightning_amct.quant import ActivationQuantizer
from lightning_amct.training.calibration_state import calibration_record, restore_calibration
from lightning_amct.training.checkpoint_record import (
    CHECKPOINT_KEY,
    checkpoint_to_restore,
    compressed_without_record,
    read_record,
)
from lightning_amct.training.collectives import end_group_at_exit, several_ranks
from lightning_amct.training.divergence import DivergenceGuard, check_finite, written_state
from lightning_amct.training.observed import compression_parameters, observe, pinned_parameters
from lightning_amct.training.sharded import ForwardWrites, gathered_model, is_sharded, meta_copy
from lightning_amct.training.weight_decay import exclude_from_weight_decay

_DIFFERENCES_SHOWN = 3


#: Callbacks that copy the module in their ``setup`` (the weight averages).
_COPYING_CALLBACKS = (StochasticWeightAveraging, WeightAveraging)


class SetupError(ValueError):
    """A fit, validation, test or prediction that the callback refuses in ``setup``, before anything
    runs: the message says why and what to do (``lightning-amct``'s subcommands print it as one
    line and exit with status 2)."""


class CompressionCallback(Callback):
    """Quantization-aware training, channel pruning and 4:2 sparsity from an AMCT retrain config.

    The callback compresses the LightningModule in ``setup`` (before the optimizer exists and
    before DDP wraps the model): channel pruning physically removes channels, then each planned
    layer becomes a compressed layer that fake-quantizes its input and weight. Activation clips
    without ``clip_max_min`` initialise themselves (IFMR) on the first ``batch_num`` training
    batches, once: the counter is a buffer, so a resumed run never calibrates again. At fit start
    the clip and scale parameters leave the optimizer's decaying groups (see
    :mod:`lightning_amct.training.weight_decay`). Every ``log_every_n_steps`` the clips and
    learned scales go to the Trainer's loggers as ``amct/<layer>/clip_max`` (rank zero). After
    every training step a non-finite trainable parameter stops training with an error naming the
    layer and the step (:mod:`lightning_amct.training.divergence`), and checkpoints and artifacts
    of non-finite weights are refused. At the end of fit, rank zero writes the compressed
    checkpoint, the fake-quant and deploy ONNX models, the AMCT record and a report into
    ``output_dir`` (:attr:`artifacts` maps their kinds to paths, on every rank); no rank returns
    from fit before they are complete.

    Under DDP every rank compresses alike (rank zero's pruned channels, calibration statistics
    from all ranks). Under ``ModelParallelStrategy`` the model is compressed before
    ``configure_model`` shards it; :mod:`lightning_amct.training.sharded` carries what quantizers
    write in a forward into the shards and gathers the whole model for the artifacts.

    Checkpoints carry a plain record under ``checkpoint["lightning_amct"]`` (plan, kept channel
    indices, config text). ``trainer.fit/validate/test/predict(ckpt_path=...)`` on a fresh module
    rebuilds the structure from the checkpoint's record in ``setup``, before its weights load
    (and before ``configure_model`` shards the model), whatever the fresh module's weights are;
    a checkpoint trained with another config is refused there, naming what differs. A
    checkpoint without a record holds a float model: validate/test/predict run it as such, and
    fit refuses to resume compression from it.

    Args:
        config: the retrain config: a ``.cfg`` path, its text, or a mapping of the same
            structure (a protobuf message works too). Validated here: a bad config fails at
            construction with file, line and column.
        log_every_n_steps: how often to log clips and scales; default: the Trainer's (whose 0, as
            ``barebones=True`` sets it, turns the logging off).
        output_dir: where the artifacts go at the end of fit (see
            :func:`lightning_amct.export.save_compressed`); default:
            ``<trainer.default_root_dir>/compressed``.
        prefix: file name prefix of the artifacts (``<prefix>_compressed.pt``, ...).
        export: write the artifacts at the end of fit (rank zero only, each file atomically).
        quantize_outputs: also quantize (and train the clips of) the outputs of quantized layers
            that go anywhere but into quantized layers: residual adds, pooling. The AMCT dialect
            quantizes layer inputs only, which leaves such layers in float in ONNX Runtime; with
            this the deploy model runs every quantized layer with integer kernels. The outputs'
            clips are logged as ``amct/<module>/output_clip_max``. The gate values of sigmoid,
            SiLU and hard sigmoid modules go on a fixed grid of ``[0, 1]`` then
            (:mod:`~lightning_amct.plan.gates`), so that the gates run in integers too.

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
        check_prefix(prefix)
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
        self._guard = DivergenceGuard()
        self._skeleton: torch.nn.Module | None = None  # the structure to export from, under FSDP2
        self._forward_writes: ForwardWrites | None = None
        self._observed_step: int | None = None  # the global step whose clips were last observed
        self._group_counts: dict[int, int] = {}  # optimizer -> its groups after the clips were taken out of decay
        self._masked_layers: list[CompressedLayer] = []  # the layers with a 4:2 mask
        # output quantizers of their own and the layers whose outputs they quantize
        self._output_quantizers: list[tuple[torch.nn.Module, torch.nn.Module]] = []

    def __getstate__(self) -> dict[str, Any]:
        # Spawned DDP workers receive the callback pickled: send the text, parse it there, and
        # none of the state a run holds on its model.
        state = self.__dict__.copy()
        del state["config"]
        state.update(
            _guard=DivergenceGuard(), _skeleton=None, _forward_writes=None, _masked_layers=[], _output_quantizers=[]
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.config = _read_again(self.config_text)

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
        if several_ranks():  # a rank whose script ends right after fit exits cleanly
            end_group_at_exit()
        self._check_callbacks(trainer)
        if stage == "fit" and self.export:
            self._check_export(trainer, pl_module)
        path = checkpoint_to_restore(trainer)
        record = read_record(path) if path else None
        state = compression_state(pl_module)
        if state is not None:  # already compressed: a second stage on the same module
            self._check_same_config(pl_module, state)
            if path:
                self._check_checkpoint(path, record, state.plan)
            return
        if path and record is None:
            evidence = compressed_without_record(path, pl_module)
            if evidence is not None:
                raise SetupError(
                    f"the checkpoint {path} holds no lightning-amct record, yet {evidence}: it was saved "
                    "without the callbacks' state, whose record rebuilds the compressed model "
                    "(ModelCheckpoint(save_weights_only=True) saves so); save full checkpoints to resume or "
                    "evaluate compression training"
                )
            if stage == "fit":
                raise SetupError(
                    f"the checkpoint {path} holds no lightning-amct record (it was not trained with "
                    "CompressionCallback), so fit cannot resume compression training from it; to compress "
                    "the model it holds, load its weights into the module and fit without ckpt_path"
                )
            rank_zero_warn(
                f"lightning-amct: the checkpoint {path} holds no lightning-amct record: it is a float model, "
                f"and {getattr(stage, 'value', stage)} runs it as such, without compression"  # TrainerFn: its word
            )
            return
        example = pl_module.example_input_array
        plan = self.resolve(pl_module)
        if record is not None:
            # The structure comes from the record, whatever the fresh module's weights are: the
            # checkpoint's weights then load into exactly the shapes they were saved from.
            saved = CompressionState.from_record(record)
            self._check_checkpoint(path, record, plan)
            state = apply_plan(pl_module, saved.plan, example, saved.kept_channels, saved.config_text)
        else:
            state = apply_plan(pl_module, plan, example, config_text=self.config_text)
            self._agree_across_ranks(trainer, state)
            if stage != "fit":
                rank_zero_warn(
                    f"lightning-amct: {getattr(stage, 'value', stage)} compresses {type(pl_module).__name__} here, "
                    "without a checkpoint of compression training: its weights are not a compressed run's (after a "
                    "ddp_spawn fit the launching process's module keeps its untrained ones) and its activation "
                    "quantizers are not calibrated; pass the fit's ckpt_path ('best', 'last') or load_compressed "
                    "its artifacts"
                )
        if stage == "fit" and self.export and isinstance(trainer.strategy, ModelParallelStrategy):
            self._skeleton = meta_copy(pl_module)  # before configure_model shards it
        summary = f"lightning-amct: compressed {type(pl_module).__name__}\n{state.plan}"
        if state.prune_report:
            summary += f"\n\nchannel pruning:\n{format_report(state.prune_report)}"
        rank_zero_info(summary)

    def _output_dir(self, trainer: pl.Trainer) -> Path:
        """Where the artifacts go: ``output_dir``, else ``compressed/`` under the Trainer's root."""
        return self.output_dir or Path(trainer.default_root_dir) / "compressed"

    def _check_export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse, before anything trains, what would make the export at the end of fit fail."""
        if pl_module.example_input_array is None:
            raise SetupError(
                f"{type(pl_module).__name__} has no example_input_array, which the ONNX export "
                "of the artifacts at the end of fit needs: set it in __init__ (a batch of inputs), or pass "
                "export=False to train without artifacts"
            )
        output_dir = self._output_dir(trainer)
        obstacle = directory_obstacle(output_dir)
        if obstacle is not None:
            raise SetupError(f"the artifacts cannot go to {output_dir}: {obstacle}")

    @staticmethod
    def _check_checkpoint(path: str, record: dict | None, plan: CompressionPlan) -> None:
        """Refuse a checkpoint whose structure is not ``plan``'s, before its weights load."""
        if record is None:
            raise SetupError(
                f"the checkpoint {path} holds no lightning-amct record: it is a float model, and this "
                "module is compressed already"
            )
        differences = plan_differences(CompressionState.from_record(record).plan, plan)
        if differences:
            shown = "; ".join(differences[:_DIFFERENCES_SHOWN])
            more = len(differences) - _DIFFERENCES_SHOWN
            raise SetupError(
                f"the checkpoint {path} was trained with another compression config than this callback's "
                f"({shown}{f'; and {more} more' if more > 0 else ''}): use the config it was trained with"
            )

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
        self._observed_step = None
        self._group_counts = {}
        self._masked_layers = [
            m for m in pl_module.modules() if isinstance(m, CompressedLayer) and m.weight_mask is not None
        ]
        restore_output_hooks(pl_module)  # the strategy's SyncBatchNorm conversion copied the modules without
        self._output_quantizers = _output_quantizers_and_producers(pl_module)
        for optimizer in trainer.optimizers:
            self._keep_ranges_undecayed(trainer, pl_module, optimizer)
        if is_sharded(pl_module):  # configure_model sharded it (FSDP2)
            self._forward_writes = ForwardWrites(pl_module)

    def _keep_ranges_undecayed(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Clips and learned scales into groups without weight decay; pinned clips without a gradient.

        At fit start, and again where the optimizer has gained a group since (``BackboneFinetuning``
        adds the backbone's parameters, clips included, with the decay of its group, and makes every
        one of them trainable, the clips that ``fixed_min`` pins too)."""
        for clip in pinned_parameters(pl_module):
            clip.requires_grad_(False)
            clip.grad = None
        # what holds one entry per group: the schedulers, and a weight average's list of learning rates
        per_group = [config.scheduler for config in trainer.lr_scheduler_configs]
        per_group += [callback for callback in trainer.callbacks if isinstance(callback, StochasticWeightAveraging)]
        later = id(optimizer) in self._group_counts  # the new groups go before the one added
        exclude_from_weight_decay(optimizer, compression_parameters(pl_module), per_group, before_source=later)
        self._group_counts[id(optimizer)] = len(optimizer.param_groups)

    def _check_callbacks(self, trainer: pl.Trainer) -> None:
        """Refuse ``ModelPruning``, and a weight-averaging callback listed before this one.

        ``ModelPruning`` re-parametrises each layer's weight as ``weight_orig * weight_mask``
        (``torch.nn.utils.prune``): on a compressed layer, whose 4:2 mask has that name, it fails;
        listed first, it holds the float layers that compression swaps out and prunes nothing. A
        weight average's ``setup``, run first, copies the module before compression, and the
        averaged copy's layers then differ from the trained ones (a shape error at its first update).
        """
        for callback in trainer.callbacks:
            if isinstance(callback, ModelPruning):
                raise SetupError(
                    "ModelPruning cannot prune the layers CompressionCallback compresses (torch.nn.utils.prune "
                    "re-parametrises their weights): prune with the config's prune_config instead (channel "
                    "pruning or 4:2 sparsity)"
                )
        for callback in trainer.callbacks[: trainer.callbacks.index(self)]:
            if isinstance(callback, _COPYING_CALLBACKS):
                name = type(callback).__name__
                raise SetupError(
                    f"list CompressionCallback before {name} in the Trainer's callbacks: {name} copies the "
                    "module in its setup, which runs in the list's order, and must copy the compressed one"
                )

    def _check_same_config(self, pl_module: pl.LightningModule, state: CompressionState) -> None:
        """A module compressed already goes on with the config it was compressed with: another
        config cannot change a model whose layers were swapped and pruned."""
        if state.config_text and _read_again(state.config_text) != self.config:
            raise SetupError(
                f"{type(pl_module).__name__} is compressed already, with another config than this "
                "CompressionCallback's: a second stage cannot change what the first compressed (to prune and "
                "then quantize, give one config both; to start over, start from a float module)"
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for layer in self._masked_layers:  # the 4:2 schedule counts the Trainer's batches
            layer.start_mask_batch()
        # An output quantizer is its module's child, so a module kept in eval mode while the model
        # trains (a frozen BatchNorm) would keep it in eval mode too, never calibrated: the deploy
        # model would run the layer before it in float. It trains with the layer it follows.
        for quantizer, producer in self._output_quantizers:
            if producer.training and not quantizer.training:
                quantizer.train()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._forward_writes is not None:
            self._forward_writes.apply()
        if len(optimizer.param_groups) != self._group_counts.get(id(optimizer)):  # a group added in training
            self._keep_ranges_undecayed(trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._guard.after_step(pl_module, trainer.global_step)  # every rank, every step
        every = self.log_every_n_steps or trainer.log_every_n_steps  # the Trainer's 0 (barebones): no logging
        # with gradient accumulation, the batches before an optimizer step share its step: once each
        if not every or trainer.global_step % every or trainer.global_step == self._observed_step:
            return
        self._observed_step = trainer.global_step
        values = observe(pl_module)  # every rank: a sharded parameter is gathered from all of them
        if not values or not trainer.is_global_zero:
            return
        self.history.append({"step": float(trainer.global_step), **values})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_forward_writes()
        _warn_of_unfinished_calibration(pl_module)
        if not self.export or trainer.interrupted:
            return
        self._guard.flush(pl_module)
        model = gathered_model(pl_module, self._skeleton) if self._skeleton is not None else pl_module
        self._skeleton = None
        output_dir = self._output_dir(trainer)
        artifacts, failure = {}, None
        if trainer.is_global_zero:
            try:
                check_finite(written_state(model), "the artifacts", trainer.global_step)
                artifacts = save_compressed(model, output_dir, pl_module.example_input_array, self.prefix)
            except Exception as exc:  # the other ranks learn of it below, and stop too
                failure = exc
        # No rank returns from fit before the artifacts are complete on disk (or failed).
        reason = None if failure is None else f"{type(failure).__name__}: {failure}"
        self.artifacts, reason = trainer.strategy.broadcast((artifacts, reason), src=0)
        if failure is not None:
            raise failure
        if reason is not None:
            raise RuntimeError(f"lightning-amct: rank 0 could not write the artifacts: {reason}")
        rank_zero_info(f"lightning-amct: wrote {len(self.artifacts)} artifacts to {output_dir}")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_forward_writes()
        if stage != "fit" or compression_state(pl_module) is None:
            return
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            # ddp_spawn/ddp_fork copy rank 0's weights back into the module of the launching
            # process, which was never compressed: pruned weights do not fit its shapes, and
            # quantization-trained ones would make it a float model that never ran as trained
            # (no quantizers, no clips). Send none, and say where the trained model is.
            pl_module._register_state_dict_hook(_send_nothing_back)
            where = self._output_dir(trainer)
            rank_zero_warn(
                "lightning-amct: under a spawning strategy the module in the launching process keeps its "
                f"original structure and weights, and its callback names no artifacts; the trained, "
                f"compressed model is in the checkpoints and in {where} (load_compressed)"
            )

    def _stop_forward_writes(self) -> None:
        if self._forward_writes is not None:
            self._forward_writes.apply()
            self._forward_writes.remove()
            self._forward_writes = None

    # -- checkpoints -------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Every rank takes part in a save: all of them refuse a diverged state together.
        self._guard.flush(pl_module)
        written = written_state(pl_module, checkpoint["state_dict"])
        check_finite(written, "the checkpoint", trainer.global_step, distributed=True)
        state = compression_state(pl_module)
        if state is not None:
            checkpoint[CHECKPOINT_KEY] = state.to_record()
            calibration = calibration_record(pl_module)  # every rank: a collective
            if calibration is not None:
                checkpoint[CHECKPOINT_KEY]["calibration"] = calibration

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # after the weights loaded (which drops any calibration in progress): a checkpoint saved
        # while calibration ran gives its statistics back
        calibration = (checkpoint.get(CHECKPOINT_KEY) or {}).get("calibration")
        if calibration is not None:
            restore_calibration(pl_module, calibration, trainer.global_rank, trainer.world_size)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def _read_again(config_text: str) -> AMCTRetrainConfig:
    """A config read before (by this callback, or the one that compressed the module), from its
    stored text: what it warns of was shown, at its file's lines, when it was first read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return load_config(config_text)


def _warn_of_unfinished_calibration(pl_module: pl.LightningModule) -> None:
    """Say so where training ended before ``batch_num`` batches calibrated a quantizer: its clips are
    then those batches' range, which IFMR never refined; or before any did: its input stays float."""
    counts = {
        name: (int(module.calibrated_batches), module.batch_num)
        for name, module in pl_module.named_modules()
        if isinstance(module, ActivationQuantizer) and not module.calibrated
    }
    unfinished = {name: count for name, count in counts.items() if count[0] > 0}
    if unfinished:
        name, (seen, wanted) = next(iter(unfinished.items()))
        rank_zero_warn(
            f"lightning-amct: training ended before calibration did: {len(unfinished)} activation quantizer(s) "
            f"saw fewer than batch_num batches ({name}: {seen} of {wanted}), so their clips are the range "
            "of those batches, not IFMR's; train on more batches or lower batch_num"
        )
    unseen = [name for name, (seen, _) in counts.items() if seen == 0]
    if unseen:
        outputs = [name for name in unseen if name.endswith(f".{OUTPUT_QUANT}")]
        frozen = (
            f"; an output quantizer ({outputs[0]}) trains with the layer whose output it quantizes: a layer kept "
            "in eval mode while the model trains (a frozen block) leaves it uncalibrated"
            if outputs
            else ""
        )
        rank_zero_warn(
            f"lightning-amct: {len(unseen)} activation quantizer(s) saw no training batch ({unseen[0]}): their "
            "layers ran in no training forward (a branch taken in eval only, a layer dropped at random), so "
            f"their inputs stay float, in the artifacts too{frozen}"
        )


def _output_quantizers_and_producers(pl_module: pl.LightningModule) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """Each output quantizer of its own (not a reading layer's input quantizer) with the layer
    whose output it quantizes (the plan's ``after``)."""
    state = compression_state(pl_module)
    if state is None:
        return []
    quantizers = output_quantizers(pl_module)
    return [
        (quantizers[site], pl_module.get_submodule(spec.after))
        for site, spec in state.plan.outputs.items()
        if spec.shared_with is None and site in quantizers
    ]


def _send_nothing_back(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if not prefix:
        state_dict.clear()
