"""The dry run from the shell: ``lightning-amct plan``."""

from __future__ import annotations

import sys
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
    # the residual add's inputs and output, the average pool's input and output
    assert "5 output quantizer(s) (quantize_outputs):" in out and "net.block.bn2 (output of net.block.conv2)" in out
    assert "net.gap: the input quantizer of net.fc" in out


def test_a_model_without_example_inputs_is_told_of_the_option(capsys: pytest.CaptureFixture) -> None:
    args = ["plan", "--cfg", str(RECIPES_DIR / "int8.cfg"), "--model", "lightning_amct.demo.DemoNet"]
    assert main(args) == 0
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert "no example inputs to capture the graph of DemoNet with: pass --input-shape (or give" in warning
    assert main([*args, "--input-shape", "1,1,8,8"]) == 0
    assert "warning" not in capsys.readouterr().err


def _model_in_working_directory(
    folder: Path, monkeypatch: pytest.MonkeyPatch, module: str, name: str, layers: str
) -> None:
    """``folder/module.py`` defining ``name``, an ``nn.Sequential`` of ``layers``, in the working directory."""
    (folder / f"{module}.py").write_text(
        f"from torch import nn\n\nclass {name}(nn.Sequential):\n    def __init__(self):\n"
        f"        super().__init__({layers})\n"
    )
    monkeypatch.chdir(folder)


def test_a_model_class_in_the_working_directory_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """As ``python -m`` finds it: a console script's import path starts at its own folder."""
    _model_in_working_directory(tmp_path, monkeypatch, "my_model_for_plan", "MyNet", "nn.Linear(8, 4)")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    args = ["plan", "--cfg", str(RECIPES_DIR / "int8.cfg"), "--model", "my_model_for_plan.MyNet", "--input-shape", "1,8"]
    assert main(args) == 0
    assert "1 of 1 layers quantized" in capsys.readouterr().out


def test_a_model_of_token_ids_is_planned_with_an_integer_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    layers = "nn.Embedding(50, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2)"
    _model_in_working_directory(tmp_path, monkeypatch, "my_text_model", "Text", layers)
    args = ["plan", "--cfg", str(RECIPES_DIR / "int8.cfg"), "--model", "my_text_model.Text", "--input-shape", "1,6"]
    assert main(args) == 0
    assert "(a model of token ids: pass --input-dtype int64)" in capsys.readouterr().err
    assert main([*args, "--input-dtype", "int64"]) == 0
    captured = capsys.readouterr()
    assert "INT8 IFMR fixed_min" in captured.out and captured.err == ""  # the graph: the ReLU is seen


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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "lightning_amct.demo:Nope"], "error: --model: module 'lightning_amct.demo' has no attribute 'Nope'"),
        (["--model", "lightning_amct.demo:DemoNett"], "error: --model: module 'lightning_amct.demo' has no attribute 'DemoNett'; did you mean 'DemoNet'?"),
        (["--model", "lightning_amct.dmo:DemoNet"], "error: --model: no module named 'lightning_amct.dmo'"),
        (["--model", "lightning_amct.demo.model.DemoNett"], "error: --model: module 'lightning_amct.demo.model' has no attribute 'DemoNett'; did you mean 'DemoNet'?"),
        (["--model", "lightning_amct.demo:DemoNet", "--init-args", '{"width": -1}'], "error: --init-args: DemoNet(width=-1) failed: RuntimeError: Trying to create tensor with negative dimension -1: [-1, 1, 3, 3]"),
        (["--model", "lightning_amct.demo"], "error: --model: lightning_amct.demo is not an nn.Module class"),
        (["--model", "DemoNet"], "error: --model: expected package.module.Name or package.module:Name, got 'DemoNet'"),
        (["--model", "lightning_amct.demo:DemoNet", "--init-args", '{"widht": 8}'], "error: --init-args: DemoNet takes no argument 'widht'; did you mean 'width'? (valid: num_classes, width)"),
        (["--model", "lightning_amct.demo:DemoNet", "--init-args", "[8]"], "error: --init-args: expected a JSON object, got [8]"),
        (["--model", "lightning_amct.demo:DemoNet", "--input-shape", "1,x"], "error: --input-shape: expected comma-separated sizes such as 1,3,32,32, got '1,x'"),
    ],
)  # fmt: skip
def test_a_model_that_cannot_be_built_is_one_line_and_status_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["plan", "--cfg", str(RECIPES_DIR / "quant.cfg"), *args]) == 2
    assert capsys.readouterr().err.strip() == message


def test_prune_recipe_marks_and_counts_only_the_layers_that_lose_channels(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "--cfg", str(RECIPES_DIR / "prune.cfg"), "--model", "lightning_amct.demo:DemoClassifier"]) == 0
    out = capsys.readouterr().out
    assert "0 of 6 layers quantized, 3 filter-pruned, 0 4:2-pruned" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("net.")}
    assert "filter" not in rows["net.fc"].split("not filter-pruned")[0]
    assert rows["net.fc"].endswith("not filter-pruned: group 'net.fc' cannot be pruned: feeds the model output")
    assert "filter 0.5" in rows["net.pointwise.conv"]
    assert [name for name, line in rows.items() if "filter 0.3" in line] == ["net.stem.conv", "net.block.conv2"]


def test_its_help_starts_with_a_sentence(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["plan", "--help"])
    assert info.value.code == 0
    assert "\nWhat a retrain config does to each layer, without training.\n" in capsys.readouterr().out
