"""The bundled demo: a small CNN, its LightningModule and the digits data (no download)."""

from lightning_amct.demo.data import DigitsDataModule, digits_tensors
from lightning_amct.demo.model import DemoNet
from lightning_amct.demo.module import DemoClassifier

__all__ = ["DemoClassifier", "DemoNet", "DigitsDataModule", "digits_tensors"]
