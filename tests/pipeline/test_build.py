"""Model and data from class paths: a wrong path or argument says what would be valid."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from lightning_amct.pipeline import RecipeError
from lightning_amct.pipeline.build import instantiate
from lightning_amct.pipeline.recipe import ClassSpec


def test_builds_the_class_with_its_arguments() -> None:
    spec = ClassSpec("lightning_amct.demo.DigitsDataModule", {"batch_size": 8})
    data = instantiate(spec, pl.LightningDataModule, "data")
    assert data.batch_size == 8


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ClassSpec("lightning_amct.demo.DemoClassifier", {"widht": 8}), "model.init_args: DemoClassifier takes no argument 'widht'; did you mean 'width'? (valid: width, lr, weight_decay)"),
        (ClassSpec("lightning_amct.demo.DemoNet"), "model.class_path: lightning_amct.demo.DemoNet is not a LightningModule"),
        (ClassSpec("lightning_amct.demo.Missing"), "model.class_path: module 'lightning_amct.demo' has no attribute 'Missing'"),
        (ClassSpec("DemoClassifier"), "model.class_path: expected package.module.Name or package.module:Name, got 'DemoClassifier'"),
        (ClassSpec("lightning_amct.demo.module.DemoClassifer"), "model.class_path: module 'lightning_amct.demo.module' has no attribute 'DemoClassifer'; did you mean 'DemoClassifier'?"),
        (ClassSpec("lightning_amct.demo.DemoClassifier", {"width": -1}), "model.init_args: DemoClassifier(width=-1) failed: RuntimeError: Trying to create tensor with negative dimension"),
    ],
)  # fmt: skip
def test_errors_list_the_valid_choices(spec: ClassSpec, message: str) -> None:
    with pytest.raises(RecipeError) as error:
        instantiate(spec, pl.LightningModule, "model")
    assert str(error.value).startswith(message)
