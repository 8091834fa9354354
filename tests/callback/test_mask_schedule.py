"""The 4:2 mask schedule in a Trainer counts the Trainer's batches, whatever a layer's calls."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_amct import CompressionCallback
from lightning_amct.demo import DigitsDataModule

SPARSE = "prune_config { n_out_of_m_pruner { l1_selective_prune { update_freq: 1 } } }\n"


class SharedBlock(pl.LightningModule):
    """A Linear applied twice in every forward (a block shared across depth, as ALBERT's)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10)
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x.flatten(1)))
        return self.out(torch.relu(self.shared(torch.relu(self.shared(h)))))

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_shared_layer_counts_each_batch_once(accumulate: int, trainer_factory) -> None:
    module = SharedBlock()
    trainer = trainer_factory(
        max_epochs=1, limit_train_batches=4, accumulate_grad_batches=accumulate,
        callbacks=[CompressionCallback(SPARSE, export=False)],
    )  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=32))  # two calls re-chose the mask one had saved: an error
    assert int(module.shared.mask_batches) == int(module.inp.mask_batches) == 4
