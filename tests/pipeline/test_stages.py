"""The recipe's stages: reading a float checkpoint, and the class path its checkpoints carry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_amct.callback import CHECKPOINT_KEY
from lightning_amct.demo import DemoClassifier
from lightning_amct.pipeline import run_command
from lightning_amct.pipeline.stages import ClassPathInCheckpoint, load_float_checkpoint

QUANT_CFG = Path(__file__).parents[2] / "recipes" / "quant.cfg"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"retrain_data_quant_config: {}\n", "is not a checkpoint file (torch.load cannot read it)"),
        ({"weights": torch.zeros(1)}, "is not a Lightning checkpoint (no 'state_dict')"),
        (torch.zeros(1), "is not a Lightning checkpoint (no 'state_dict')"),
        ({"state_dict": {}, CHECKPOINT_KEY: {}}, "holds a compressed model; the float stage needs a float one"),
        (
            {"state_dict": DemoClassifier(width=16).state_dict()},
            "does not fit this DemoClassifier (another class or other init_args?): size mismatch for net.stem.conv."
            "weight: copying a param with shape torch.Size([16, 1, 3, 3]) from checkpoint, the shape in current "
            "model is torch.Size([64, 1, 3, 3]) (and ",
        ),
    ],
)
def test_a_file_that_is_no_float_checkpoint_of_the_module_is_refused(
    tmp_path: Path, content: object, message: str
) -> None:
    path = tmp_path / "float.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=re.escape(f"{path} {message}")):
        load_float_checkpoint(DemoClassifier(), path)


@pytest.mark.parametrize("width", [None, 16], ids=["a text file", "a float checkpoint of another width"])
def test_the_recipe_places_a_float_checkpoint_it_cannot_load_at_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, width: int | None
) -> None:
    checkpoint = tmp_path / "float.ckpt"
    if width is None:
        checkpoint.write_text("a text file")
    else:
        torch.save({"state_dict": DemoClassifier(width=width).state_dict()}, checkpoint)
    recipe = tmp_path / "run.yaml"
    recipe.write_text(f"float: {{ckpt_path: {checkpoint}}}\ncompress: {{config: {QUANT_CFG}, epochs: 1}}\n")
    assert run_command([str(recipe), "--output-dir", str(tmp_path / "out")]) == 2
    reason = "is not a checkpoint file" if width is None else "does not fit this DemoClassifier"
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {recipe}:1:9: float.ckpt_path: {checkpoint} {reason}")


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
