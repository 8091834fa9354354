"""The dry run from the shell: ``lightning-amct plan``."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_amct.cli import main

RECIPES_DIR = Path(__file__).parents[2] / "recipes"
RECIPES = ["quant", "a8w4", "prune", "selective_prune", "compressed1", "compressed2"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_plan_prints_the_table_for_every_recipe(recipe: str, capsys: pytest.CaptureFixture) -> None:
    status = main(["plan", "--cfg", str(RECIPES_DIR / f"{recipe}.cfg"), "--model", "lightning_amct.demo:DemoClassifier"])
    out = capsys.readouterr().out
    assert status == 0
    assert out.splitlines()[0].split()[:2] == ["layer", "type"]
    assert "net.fc" in out and "layers quantized" in out


def test_output_quantizers_are_listed_when_asked_for(capsys: pytest.CaptureFixture) -> None:
    args = ["plan", "--cfg", str(RECIPES_DIR / "quant.cfg"), "--model", "lightning_amct.demo:DemoClassifier"]
    assert main(args) == 0 and "output quantizer" not in capsys.readouterr().out
    assert main([*args, "--quantize-outputs"]) == 0
    out = capsys.readouterr().out
    assert "3 output quantizer(s) (quantize_outputs):" in out and "net.block.bn2 (output of net.block.conv2)" in out


def test_bad_config_is_one_line_and_status_2(tmp_path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "bad.cfg"
    cfg.write_text("retrain_weight_quant_config {\n  arq_retrain { dst_type: INT9 }\n}\n")
    status = main(["plan", "--cfg", str(cfg), "--model", "lightning_amct.demo:DemoClassifier"])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: {cfg}:2:")
    assert "INT9" in err


def test_unknown_layer_suggests_close_names(tmp_path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "typo.cfg"
    cfg.write_text('retrain_data_quant_config { ulq_quantize {} }\nskip_layers: "net.stem.cnv"\n')
    status = main(["plan", "--cfg", str(cfg), "--model", "lightning_amct.demo:DemoClassifier"])
    assert status == 2
    assert "did you mean 'net.stem.conv'" in capsys.readouterr().err
