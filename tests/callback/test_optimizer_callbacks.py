"""CompressionCallback beside callbacks that work on the optimizer's groups: BackboneFinetuning, which
adds the backbone's in training, and StochasticWeightAveraging, given a learning rate per group."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, StochasticWeightAveraging
from torch import nn

from lightning_amct import CompressionCallback
from lightning_amct.demo import DigitsDataModule

INT8 = "retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }\n"


class Backboned(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten()
        )
        self.head = nn.Linear(8 * 8 * 8, 10)
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)


class TwoGroups(Backboned):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": self.backbone.parameters(), "lr": 1e-3}, {"params": self.head.parameters(), "lr": 1e-2}]
        return torch.optim.SGD(groups, weight_decay=1e-4)


def test_clips_added_to_the_optimizer_in_training_stay_out_of_decay_and_pinned(trainer_factory) -> None:
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0, should_align=False)
    trainer = trainer_factory(
        max_epochs=3, limit_train_batches=2, callbacks=[CompressionCallback(INT8, export=False), finetuning]
    )
    module = Backboned()
    trainer.fit(module, DigitsDataModule(batch_size=32))
    clips = {id(p) for name, p in module.named_parameters() if "act_quant" in name}
    groups = trainer.optimizers[0].param_groups
    decayed = [id(p) for group in groups if group["weight_decay"] for p in group["params"]]
    assert clips and not clips.intersection(decayed)
    backbone = {id(p) for p in module.backbone.parameters() if id(p) not in clips}
    assert {id(p) for p in groups[-1]["params"]} == backbone and groups[-1]["lr"] == 2e-2  # raised at epoch 2
    pinned = module.backbone[2].act_quant.clip_min  # reads a ReLU output: fixed_min
    assert not pinned.requires_grad and float(pinned) == 0.0


def test_a_learning_rate_per_group_of_weight_averaging_covers_the_clips_groups(trainer_factory) -> None:
    average = StochasticWeightAveraging(swa_lrs=[1e-4, 5e-4], swa_epoch_start=1)
    trainer = trainer_factory(max_epochs=2, limit_train_batches=2, callbacks=[CompressionCallback(INT8), average])
    trainer.fit(TwoGroups(), DigitsDataModule(batch_size=32))  # the lists had 2 entries for 4 groups
    rates = [group["lr"] for group in trainer.optimizers[0].param_groups]
    assert average._swa_lrs == [1e-4, 5e-4, 1e-4, 5e-4] and rates[2:] == rates[:2]  # each clip group as its source
