"""The recipe's stages: reading a float checkpoint, and the class path its checkpoints carry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_amct.callback import CHECKPOINT_KEY
from lightning_amct.demo import DemoClassifier
from lightning_amct.pipeline import RecipeError
from lightning_amct.pipeline.stages import ClassPathInCheckpoint, load_float_checkpoint


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"retrain_data_quant_config: {}\n", "is not a checkpoint file (torch.load cannot read it)"),
        ({"weights": torch.zeros(1)}, "is not a Lightning checkpoint (no 'state_dict')"),
        (torch.zeros(1), "is not a Lightning checkpoint (no 'state_dict')"),
        ({"state_dict": {}, CHECKPOINT_KEY: {}}, "holds a compressed model; the float stage needs a float one"),
    ],
)
def test_a_file_that_is_no_float_checkpoint_is_a_recipe_error(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "float.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(RecipeError, match=re.escape(f"float.ckpt_path: {path} {message}")):
        load_float_checkpoint(DemoClassifier(), path)


def test_the_class_path_joins_the_hyperparameters_of_a_checkpoint_without_one() -> None:
    callback = ClassPathInCheckpoint("lightning_amct.demo.DemoClassifier")
    checkpoint = {"hyper_parameters": {"width": 16}}
    callback.on_save_checkpoint(None, None, checkpoint)  # type: ignore[arg-type]
    assert checkpoint["hyper_parameters"] == {
        "width": 16,
        "_class_path": "lightning_amct.demo.DemoClassifier",
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
    }
    built_by_the_cli = {"hyper_parameters": {"_class_path": "mine.Net", "width": 16}}
    callback.on_save_checkpoint(None, None, built_by_the_cli)  # type: ignore[arg-type]
    assert built_by_the_cli["hyper_parameters"] == {"_class_path": "mine.Net", "width": 16}
    without = {"state_dict": {}}
    callback.on_save_checkpoint(None, None, without)  # type: ignore[arg-type]
    assert without == {"state_dict": {}}
