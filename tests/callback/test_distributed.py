"""Two processes (ddp_spawn, gloo on CPU): every rank ends with the same clips and structure, and
returns from fit only once rank zero has written the artifacts; the launching process's module
stays as it was."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_amct import CompressionCallback, compression_state
from lightning_amct.callback import CHECKPOINT_KEY
from lightning_amct.demo import DemoClassifier, DigitsDataModule

QUANT = """
batch_num: 2
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
retrain_weight_quant_config { arq_retrain { dst_type: INT8 } }
"""
SELECTIVE = "prune_config { n_out_of_m_pruner { l1_selective_prune { update_freq: 2 } } }"
FILTER = "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.4 ascend_optimized: false } } }"


class RecordPerRank(pl.Callback):
    """Saves each rank's clips after calibration and its compression state at the end; after the
    compression callback's ``on_fit_end``, what each rank finds of the artifacts on disk."""

    def __init__(self, out: str, calibration_steps: int) -> None:
        self.out = out
        self.calibration_steps = calibration_steps

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        state = {k: v for k, v in pl_module.state_dict().items() if k.endswith(("clip_max", "clip_min", "weight_mask"))}
        state["kept"] = compression_state(pl_module).kept_channels
        torch.save(state, Path(self.out) / f"{tag}-rank{trainer.global_rank}.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.calibration_steps:
            self._save(trainer, pl_module, "calibrated")

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "end")

    def on_fit_end(self, trainer, pl_module) -> None:
        (compression,) = (c for c in trainer.callbacks if isinstance(c, CompressionCallback))
        found = {kind: path.is_file() for kind, path in compression.artifacts.items()}
        loads = bool(torch.load(compression.artifacts["checkpoint"], weights_only=True)["layers"])
        torch.save({"found": found, "loads": loads}, Path(self.out) / f"artifacts-rank{trainer.global_rank}.pt")


# (channel pruning with quantize_outputs: the output quantizers' clips must agree too)
@pytest.mark.parametrize("pruning", [SELECTIVE, FILTER], ids=["4:2", "filter+outputs"])
def test_ranks_agree_on_clips_masks_and_channels(pruning: str, tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = DemoClassifier(width=16)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, limit_train_batches=6,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
        callbacks=[
            CompressionCallback(QUANT + pruning, quantize_outputs=pruning == FILTER),
            RecordPerRank(str(tmp_path), calibration_steps=2),
        ],
    )  # fmt: skip
    before = {name: value.clone() for name, value in module.state_dict().items()}
    trainer.fit(module, DigitsDataModule(batch_size=32))
    # the launching process's module was never compressed: nothing trained comes back into it
    after = module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    for tag in ("calibrated", "end"):
        rank0 = torch.load(tmp_path / f"{tag}-rank0.pt", weights_only=True)
        rank1 = torch.load(tmp_path / f"{tag}-rank1.pt", weights_only=True)
        assert rank0.keys() == rank1.keys() and any(k.endswith("clip_max") for k in rank0)
        for key in rank0:
            if key != "kept":
                assert torch.equal(rank0[key], rank1[key]), (tag, key)
        assert rank0["kept"] == rank1["kept"]
        assert bool(rank0["kept"]) == (pruning == FILTER)
        assert any(k.endswith("weight_mask") for k in rank0) == (pruning == SELECTIVE)
        assert any(".output_quant." in k for k in rank0) == (pruning == FILTER)
    for rank in (0, 1):  # rank 1 too finds every artifact complete as soon as fit returns there
        seen = torch.load(tmp_path / f"artifacts-rank{rank}.pt", weights_only=True)
        assert len(seen["found"]) == 6 and all(seen["found"].values()) and seen["loads"]


class _SaveEndState(pl.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), self.path)


def _fit_two_ranks(root: Path, max_epochs: int, ckpt_path: Path | None = None) -> dict[str, torch.Tensor]:
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=max_epochs, limit_train_batches=3,
        limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[
            CompressionCallback("batch_num: 5\nretrain_data_quant_config { ulq_quantize {} }\n", export=False),
            ModelCheckpoint(dirpath=root, save_top_k=-1, filename="{epoch}"),
            _SaveEndState(root / "end.pt"),
        ],
    )  # fmt: skip
    trainer.fit(DemoClassifier(width=16), DigitsDataModule(batch_size=32, shuffle=False), ckpt_path=ckpt_path)
    return torch.load(root / "end.pt", weights_only=True)


def test_a_resume_during_calibration_gives_each_rank_its_own_statistics_back(tmp_path: Path) -> None:
    """5 calibration batches, 3 an epoch on each rank: the epoch-end checkpoint holds both ranks' statistics."""
    straight = _fit_two_ranks(tmp_path / "straight", max_epochs=2)
    _fit_two_ranks(tmp_path / "first", max_epochs=1)
    checkpoint = tmp_path / "first" / "epoch=0.ckpt"
    saved = torch.load(checkpoint, weights_only=True)[CHECKPOINT_KEY]["calibration"]
    assert saved["world_size"] == 2 and all(saved["ranks"])
    resumed = _fit_two_ranks(tmp_path / "second", max_epochs=2, ckpt_path=checkpoint)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


class RoutedExperts(pl.LightningModule):
    """Two experts, each sample routed to one by the sign of its first feature; rank 0's data
    goes to expert 0 alone, rank 1's to expert 1 alone."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 2)
        self.experts = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(2)])
        self.example_input_array = torch.stack([torch.ones(8), -torch.ones(8)])  # both experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, route = torch.relu(self.inp(x)), (x[:, 0] < 0).long()
        out = torch.zeros_like(h)
        for index, expert in enumerate(self.experts):
            rows = (route == index).nonzero().flatten()
            if rows.numel():
                out = out.index_add(0, rows, expert(h[rows]))
        return self.head(out)

    def training_step(self, batch: list, batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
        x[:, 0] = x[:, 0].abs() * (1 if self.global_rank == 0 else -1)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, 1] > 0).long()), batch_size=16)


def test_ranks_that_calibrate_different_layers_stop_saying_why() -> None:
    """Each rank reduced its own expert's statistics against the other's: mixed clips (or a
    gloo size mismatch where one rank ran more layers)."""
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, limit_train_batches=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[CompressionCallback(QUANT, export=False)],
    )  # fmt: skip
    with pytest.raises(Exception, match="the ranks calibrated different layers at once"):
        trainer.fit(RoutedExperts())
