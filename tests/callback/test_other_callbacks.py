"""CompressionCallback beside Lightning's callbacks that work on the module or the optimizer: weight
averages (which copy the module), BackboneFinetuning (which adds the backbone's group in training),
StochasticWeightAveraging given a learning rate per group, and ModelPruning (refused)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, EMAWeightAveraging, ModelPruning, StochasticWeightAveraging
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


def test_a_weight_average_listed_first_is_refused_and_listed_after_averages_the_compressed_model(
    trainer_factory,
) -> None:
    callbacks = [EMAWeightAveraging(), CompressionCallback(INT8)]
    first = trainer_factory(max_epochs=1, limit_train_batches=2, callbacks=callbacks)
    with pytest.raises(ValueError, match="list CompressionCallback before EMAWeightAveraging"):
        first.fit(Backboned(), DigitsDataModule(batch_size=32))
    average = EMAWeightAveraging()
    module = Backboned()
    trainer = trainer_factory(max_epochs=1, limit_train_batches=2, callbacks=[CompressionCallback(INT8), average])
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert set(module.state_dict()) == set(average._average_model.module.state_dict())  # quantizers too


def test_model_pruning_is_refused_pointing_at_the_config(trainer_factory) -> None:
    pruning = ModelPruning("l1_unstructured", amount=0.5)
    trainer = trainer_factory(max_epochs=1, callbacks=[CompressionCallback(INT8), pruning])
    with pytest.raises(ValueError, match="ModelPruning cannot prune the layers CompressionCallback compresses"):
        trainer.fit(Backboned(), DigitsDataModule(batch_size=32))
