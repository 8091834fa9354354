"""``lightning-amct run``: a recipe end to end on a small budget, artifacts and summary checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_amct.demo import DemoClassifier, DigitsDataModule
from lightning_amct.lightning_cli import run_lightning_cli
from lightning_amct.pipeline import run_command

REPO = Path(__file__).parents[2]
BUDGET = ["--epochs", "1", "--limit-batches", "6"]
ARTIFACTS = [
    "float.ckpt",
    "compressed.ckpt",
    "float_model.onnx",
    "model_compressed.pt",
    "model_fake_quant_model.onnx",
    "model_deploy_model.onnx",
    "model_record.txt",
    "model_report.md",
    "model_report.json",
    "layers.png",
    "clip_ranges.png",
    "summary.md",
    "summary.json",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(output_dir: Path) -> dict[str, dict]:
    return {row["label"]: row for row in json.loads((output_dir / "summary.json").read_text())["rows"]}


def test_recipe_end_to_end_then_another_from_its_float_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(REPO)  # the recipes name their configs relative to the repository root
    first = tmp_path / "compressed2"
    assert run_command(["recipes/compressed2.yaml", *BUDGET, "--output-dir", str(first)]) == 0

    printed = capsys.readouterr().out
    table = printed[printed.index("| compressed2") :]
    labels = ("test_acc", "non-zero weights (before rounding)", "FLOPs per sample", "ONNX Runtime, batch 64 (float / deploy)")
    for label in labels:
        assert f"| {label} " in table
    assert sorted(p.name for p in first.iterdir() if p.is_file()) == sorted(ARTIFACTS)
    assert (first / "summary.md").read_text().count(table.splitlines()[0]) == 1
    assert "A budget run: " in printed and "A budget run: " in (first / "summary.md").read_text()
    assert all((first / name).read_bytes().startswith(PNG_MAGIC) for name in ("layers.png", "clip_ranges.png"))
    rows = _rows(first)
    sparse = rows["non-zero weights (before rounding)"]
    assert sparse["compressed_value"] < 0.6 * sparse["float_value"]  # 4:2 on every layer but the input conv
    weights = rows["PyTorch file (state_dict / compressed.pt)"]
    assert weights["compressed_value"] < 0.5 * weights["float_value"]  # INT8 and 4:2 storage
    assert rows["ONNX Runtime, batch 64 (float / deploy)"]["compressed_value"] > 0
    assert 0.0 <= rows["test_acc"]["compressed_value"] <= 1.0
    # both checkpoints name the module's class, as one from Lightning's CLI does: the CLI tests the
    # compressed one without being told the model, and the float one loads as the demo classifier
    limits = ["--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false"]
    limits.append(f"--trainer.default_root_dir={tmp_path}")  # where the CLI saves its config
    cli = run_lightning_cli(["test", f"--ckpt_path={first / 'compressed.ckpt'}", *limits])
    assert type(cli.model.net.fc).__name__ == "CompressedLinear"
    assert 0.0 <= float(cli.trainer.callback_metrics["test_acc"]) <= 1.0
    assert isinstance(DemoClassifier.load_from_checkpoint(first / "float.ckpt"), DemoClassifier)

    second = tmp_path / "prune"
    args = ["recipes/prune.yaml", *BUDGET, "--float-ckpt", str(first / "float.ckpt"), "--output-dir", str(second)]
    caplog.clear()
    assert run_command(args) == 0
    assert f"float model loaded from {first / 'float.ckpt'}: test_acc " in caplog.text
    assert "float stage done" not in caplog.text
    rows_second = _rows(second)
    assert rows_second["test_acc"]["float_value"] == rows["test_acc"]["float_value"]  # the same float model
    assert rows_second["train step (median)"]["float_value"] > 0  # loaded, not trained, yet timed in turns
    params = rows_second["parameters"]
    assert params["compressed_value"] < 0.8 * params["float_value"]  # channel pruning shrank it
    assert not (second / "float.ckpt").exists()
    assert not (second / "clip_ranges.png").exists()  # nothing quantized: no clips to draw


def test_a_bad_recipe_is_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("float: {epochs: 1}\ncompress: {config: recipes/quant.cfg, epoch: 1}\n")
    assert run_command([str(recipe), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    valid = "(valid keys: config, epochs, log_every_n_steps, quantize_outputs)"
    assert err == f"error: {recipe}:2:39: compress: unknown key 'epoch', did you mean 'epochs'? {valid}"
    assert not (tmp_path / "out").exists()


def test_a_layer_the_model_lacks_fails_before_the_float_stage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "typo.cfg"
    cfg.write_text('retrain_data_quant_config { ulq_quantize {} }\nskip_layers: "net.stem.convv"\n')
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(f"float: {{epochs: 8}}\ncompress: {{config: {cfg}, epochs: 6}}\n")
    assert run_command([str(recipe), "--output-dir", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().startswith(f'error: {cfg}:2:1: skip_layers[0]: no layer "net.stem.convv" in DemoClassifier')
    assert len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written
    assert "Epoch" not in captured.out + captured.err


def test_an_output_dir_that_cannot_be_made_fails_before_the_float_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    taken = tmp_path / "taken"
    taken.write_text("a file of the user's")
    recipe = tmp_path / "run.yaml"
    recipe.write_text(f"float: {{epochs: 1}}\ncompress: {{config: recipes/quant.cfg, epochs: 1}}\noutput_dir: {taken}\n")
    assert run_command([str(recipe)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: {recipe}:3:1: output_dir: cannot write into {taken}: {taken} is a file, not a directory"
    assert taken.read_text() == "a file of the user's" and "Epoch" not in captured.out + captured.err
    # the same given as options: the errors name the option, not a line of the file
    assert run_command([str(recipe), "--output-dir", str(taken / "out")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: --output-dir: cannot write into {taken / 'out'}: ")
    assert run_command([str(recipe), "--float-ckpt", str(taken), "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --float-ckpt: {taken} is not a checkpoint file (torch.load cannot read it)"


def test_a_recipe_on_two_devices_trains_on_both_and_rank_zero_writes(tmp_path: Path) -> None:
    """DDP as a recipe gets it from ``devices: 2``: Lightning starts the command once more for
    rank 1 (so the run is a subprocess here). Both ranks train and test; rank 0 alone writes the
    checkpoints (rank 1's empty temporary files once replaced them) and prints the summary."""
    recipe = tmp_path / "two_devices.yaml"
    recipe.write_text((REPO / "recipes" / "quant.yaml").read_text().replace("  devices: 1", "  devices: 2"))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "lightning_amct.cli", "run", str(recipe), "--fast", "--output-dir", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in done.stderr
    assert done.stdout.count("| test_acc ") == 1 and done.stdout.count("results in ") == 1
    assert "4 training batches an epoch on each of 2 ranks" in done.stdout  # Lightning's limits count per rank
    for name in ("float.ckpt", "compressed.ckpt"):
        assert torch.load(out / name, map_location="cpu", weights_only=False)["state_dict"], name
    assert {row["label"] for row in json.loads((out / "summary.json").read_text())["rows"]} >= {"test_acc"}


INT8_STAGE = f"compress: {{config: {REPO / 'recipes/int8.cfg'}, epochs: 1}}\n"


class DigitsOfItsOwn(DemoClassifier):
    """The demo classifier with the digits as its own dataloaders (no LightningDataModule)."""

    loaders_asked = 0

    def _digits(self) -> DigitsDataModule:
        DigitsOfItsOwn.loaders_asked += 1
        digits = DigitsDataModule(batch_size=64)
        digits.setup("fit")
        return digits

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._digits().train_dataloader()

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._digits().val_dataloader()

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._digits().test_dataloader()


class WithoutTestStep(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(64, 10)
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))


def test_a_recipe_without_data_trains_on_the_model_s_own_dataloaders(tmp_path: Path) -> None:
    recipe = tmp_path / "own.yaml"
    model = f"{__name__}.{DigitsOfItsOwn.__name__}"
    recipe.write_text(f"model: {{class_path: {model}}}\nfloat: {{epochs: 1}}\n{INT8_STAGE}")
    DigitsOfItsOwn.loaders_asked = 0
    assert run_command([str(recipe), *BUDGET, "--output-dir", str(tmp_path / "out")]) == 0
    assert DigitsOfItsOwn.loaders_asked >= 4  # both stages' training and test loops, and the timed steps
    assert 0.0 <= _rows(tmp_path / "out")["test_acc"]["compressed_value"] <= 1.0


def test_a_model_without_test_step_fails_before_the_float_stage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "no_test.yaml"
    model = f"{__name__}.{WithoutTestStep.__name__}"
    recipe.write_text(f"model: {{class_path: {model}}}\nfloat: {{epochs: 1}}\n{INT8_STAGE}")
    assert run_command([str(recipe), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {recipe}:1:1: model: WithoutTestStep has no test_step: the run measures test_acc "
        "(evaluate.metric) in Lightning's test loop, after each stage"
    )
    assert not (tmp_path / "out").exists()
