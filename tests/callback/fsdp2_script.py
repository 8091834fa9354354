"""FSDP2 runs for ``test_fsdp2.py``: ``python fsdp2_script.py OUT`` (Lightning starts the second process).

``ModelParallelStrategy(data_parallel_size=2)`` on the CPU (gloo), the demo classifier sharded
block by block in ``configure_model``. For each of two configs (INT8 with learned weight scales
and 4:2 sparsity; INT8 with channel pruning and output quantizers): a straight run of two epochs
that saves a checkpoint after each (distributed for the first config, full for the second) and
writes the artifacts, then a fresh module, initialised with another seed, resumed from the
first epoch's checkpoint. Rank zero saves the full state dict at the start of each run and
after each epoch, and each rank what it sees of the compression state at the end, under ``OUT``
for the test to compare.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lightning_amct import CompressionCallback, compression_state
from lightning_amct.demo import DemoClassifier, DigitsDataModule

QUANT = """
batch_num: 2
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
"""
CONFIGS = {
    "selective": QUANT
    + "retrain_weight_quant_config { ulq_retrain { dst_type: INT8 } }\n"
    + "prune_config { n_out_of_m_pruner { l1_selective_prune { update_freq: 2 } } }",
    "filter": QUANT
    + "retrain_weight_quant_config { arq_retrain { dst_type: INT8 } }\n"
    + "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 ascend_optimized: false } } }",
}
OUTPUTS = {"selective": False, "filter": True}
DISTRIBUTED_CHECKPOINT = {"selective": True, "filter": False}
WATCHED = ("clip_max", "clip_min", "scale", "weight_mask", "mask_batches", "calibrated_batches")


class ShardedClassifier(DemoClassifier):
    """Shards each block of the network and then the rest, or (``blocks=False``) the whole module as one.

    With output quantizers, a block's output quantizer may be its reader's in the next block: a
    parameter shared by two blocks must sit in one sharded unit, their common parent.
    """

    def __init__(self, blocks: bool) -> None:
        super().__init__(width=16)
        self.blocks = blocks

    def configure_model(self) -> None:
        assert compression_state(self) is not None, "the callback compresses the model before it is sharded"
        mesh = self.device_mesh["data_parallel"]
        for block in self.net.children() if self.blocks else ():
            if any(True for _ in block.parameters()):
                fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)


class SaveWhatRanksSee(pl.Callback):
    """Rank zero saves the full state dict when training starts and after each epoch; at the end,
    each rank saves its view of the compression state (sharded values gathered whole)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def _save_full_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        full = get_model_state_dict(pl_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainer.is_global_zero:
            torch.save(full, self.out.with_name(f"{self.out.name}-{when}.pt"))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_full_state(trainer, pl_module, "start")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_full_state(trainer, pl_module, f"epoch{trainer.current_epoch}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seen = {}
        for name, value in [*pl_module.named_parameters(), *pl_module.named_buffers()]:
            if name.endswith(WATCHED):
                seen[name] = value.detach().full_tensor() if isinstance(value, DTensor) else value.detach().clone()
        seen["sharded"] = all(isinstance(p, DTensor) for p in pl_module.parameters())
        seen["kept"] = compression_state(pl_module).kept_channels
        torch.save(seen, self.out.with_name(f"{self.out.name}-rank{trainer.global_rank}.pt"))


def fit(out: Path, name: str, run: str, max_epochs: int, seed: int, ckpt_path: Path | None = None) -> None:
    pl.seed_everything(seed)
    module = ShardedClassifier(blocks=not OUTPUTS[name])
    strategy = ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=DISTRIBUTED_CHECKPOINT[name]
    )
    callback = CompressionCallback(
        CONFIGS[name], quantize_outputs=OUTPUTS[name], export=run == "straight", output_dir=out / f"{name}-artifacts"
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=max_epochs, limit_train_batches=4,
        limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(out), log_every_n_steps=2,
        callbacks=[
            callback, SaveWhatRanksSee(out / f"{name}-{run}"),
            ModelCheckpoint(dirpath=out / f"{name}-checkpoints", filename="{epoch}", save_top_k=-1),
        ],
    )  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=32, shuffle=False), ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        torch.save({k: str(v) for k, v in callback.artifacts.items()}, out / f"{name}-{run}-artifacts.pt")


def main(out: Path) -> None:
    for name in CONFIGS:
        fit(out, name, "straight", max_epochs=2, seed=0)
        fit(out, name, "resumed", max_epochs=2, seed=7, ckpt_path=out / f"{name}-checkpoints" / "epoch=0.ckpt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
