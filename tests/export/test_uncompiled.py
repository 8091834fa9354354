"""Artifacts of a model whose network (or part of it) is wrapped by ``torch.compile``: written and
loaded under the uncompiled layer names, the same as those of the model itself."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_amct import compress_model
from lightning_amct.demo import DemoNet
from lightning_amct.export import load_compressed, save_compressed
from lightning_amct.export.uncompiled import compiled_modules_unwrapped

CONFIG = "retrain_data_quant_config { ulq_quantize {} }\nretrain_weight_quant_config { arq_retrain {} }\n"


def _trained(x: torch.Tensor) -> DemoNet:
    torch.manual_seed(0)
    model = compress_model(DemoNet(width=16), CONFIG, x[:1])
    model.train()
    model(x)  # calibration
    return model.eval()


@torch.no_grad()
def _loaded_output(checkpoint: Path, x: torch.Tensor, compiled_block: bool = False) -> torch.Tensor:
    model = DemoNet(width=16)
    if compiled_block:
        model.block = torch.compile(model.block)
    with compiled_modules_unwrapped(load_compressed(checkpoint, model)) as loaded:
        return loaded(x)


def test_a_compiled_block_is_saved_and_loaded_under_its_own_names(tmp_path: Path) -> None:
    x = torch.rand(8, 1, 8, 8)
    model = _trained(x)
    plain = save_compressed(model, tmp_path / "plain", x[:1])
    model.block = torch.compile(model.block)  # as configure_model does; never run compiled here
    compiled = save_compressed(model, tmp_path / "compiled", x[:1])
    assert type(model.block).__name__ == "OptimizedModule"  # put back
    layers = torch.load(compiled["checkpoint"], weights_only=True)["layers"]
    assert "block.conv1" in layers and not any("_orig_mod" in name for name in layers)
    assert compiled["record"].read_text() == plain["record"].read_text()
    expected = _loaded_output(plain["checkpoint"], x)
    assert torch.equal(_loaded_output(compiled["checkpoint"], x), expected)
    assert torch.equal(_loaded_output(compiled["checkpoint"], x, compiled_block=True), expected)


def test_a_compiled_model_is_saved_as_the_model_it_compiles(tmp_path: Path) -> None:
    x = torch.rand(8, 1, 8, 8)
    model = _trained(x)
    plain = save_compressed(model, tmp_path / "plain", x[:1])
    compiled = save_compressed(torch.compile(model), tmp_path / "compiled", x[:1])
    assert compiled["record"].read_text() == plain["record"].read_text()
    assert torch.equal(_loaded_output(compiled["checkpoint"], x), _loaded_output(plain["checkpoint"], x))
