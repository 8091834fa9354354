"""The demo LightningModule: :class:`DemoNet` trained with cross-entropy, reporting accuracy.

It knows nothing of compression: ``CompressionCallback`` does all of that from the outside.
It trains under ``torch.compile`` too (``trainer.fit(torch.compile(module))``): Lightning then
compiles the step methods, and the logging and metric updates run outside the compiled graph,
since ``self.log`` inspects the step's signature, which the compiler cannot trace.

Example:
    >>> module = DemoClassifier()
    >>> tuple(module.example_input_array.shape)
    (1, 1, 8, 8)
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_amct.demo.model import DemoNet


class DemoClassifier(pl.LightningModule):
    """Classifies the 8x8 digits.

    Args:
        width: channels of the stem (see :class:`DemoNet`).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (the compression callback keeps it off clips and scales).
    """

    def __init__(self, width: int = 64, lr: float = 3e-3, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = DemoNet(num_classes=10, width=width)
        self.loss = nn.CrossEntropyLoss()
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self._log_training(loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self._log_validation(logits, y, self.loss(logits, y))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self._log_test(self(x), y)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(dim=1)

    @torch.compiler.disable
    def _log_training(self, loss: torch.Tensor) -> None:
        self.log("train_loss", loss, prog_bar=True)

    @torch.compiler.disable
    def _log_validation(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        self.val_acc(logits, y)
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    @torch.compiler.disable
    def _log_test(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.test_acc(logits, y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
