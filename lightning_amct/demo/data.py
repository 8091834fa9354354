"""scikit-learn's bundled 8x8 handwritten digits as a LightningDataModule (no download).

1,797 images of 1x8x8 pixels in 0..16, scaled to [0, 1]. The split is stratified and fixed by
``seed``, so every run (and every DDP rank) sees the same train/val/test sets.

Example:
    >>> dm = DigitsDataModule(batch_size=32)
    >>> dm.setup("fit")
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> tuple(x.shape), y.dtype
    ((32, 1, 8, 8), torch.int64)
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors(seed: int = 0) -> dict[str, TensorDataset]:
    """Train (60%), val (20%) and test (20%) splits of the digits as tensor datasets."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    index = torch.arange(len(labels)).numpy()
    train_idx, rest_idx = train_test_split(index, test_size=0.4, random_state=seed, stratify=labels.numpy())
    val_idx, test_idx = train_test_split(
        rest_idx, test_size=0.5, random_state=seed, stratify=labels.numpy()[rest_idx]
    )
    return {
        name: TensorDataset(images[idx], labels[idx])
        for name, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx))
    }


class DigitsDataModule(pl.LightningDataModule):
    """The digits, split 60/20/20.

    Args:
        batch_size: samples per batch for every loader.
        seed: fixes the split (not the shuffling, which follows Lightning's seed).
        shuffle: shuffle the training set every epoch.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = digits_tensors(self.seed)

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
