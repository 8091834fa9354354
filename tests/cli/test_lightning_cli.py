"""``lightning-amct fit|test``: Lightning's CLI with CompressionCallback added from outside (or, for a
compressed checkpoint tested without it, from the checkpoint's record).

The demo classifier knows nothing of compression; the callback comes from the command line or a
YAML config, and the checkpoint that comes out carries the compressed structure.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_amct import compression_state
from lightning_amct.callback import CHECKPOINT_KEY
from lightning_amct.cli import main
from lightning_amct.lightning_cli import run_lightning_cli, with_default_classes

RECIPES = Path(__file__).parents[2] / "recipes"
CALLBACK = "lightning_amct.CompressionCallback"


def _budget(root: Path) -> list[str]:
    """A small CPU run rooted in ``root``: one epoch of three batches, no progress bar."""
    return [
        "--model.width=16",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=2",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
    ]


def _checkpoint(root: Path) -> Path:
    (path,) = root.glob("lightning_logs/version_0/checkpoints/*.ckpt")
    return path


def test_fit_with_the_callback_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status = main(
        ["fit", f"--trainer.callbacks+={CALLBACK}", f"--trainer.callbacks.config={RECIPES / 'compressed1.cfg'}"]
        + _budget(tmp_path)
        + ["--model.width=64"]  # room for channel pruning: kept counts are rounded up to 16
    )
    assert status == 0
    record = torch.load(_checkpoint(tmp_path), weights_only=True)[CHECKPOINT_KEY]
    plan = {layer["name"]: layer for layer in record["plan"]["layers"]}
    assert plan["net.fc"]["quant"]["weight_bits"] == 8
    assert record["kept_channels"]  # channel pruning ran on a module that knows nothing of it
    saved = yaml.safe_load((tmp_path / "lightning_logs/version_0/config.yaml").read_text())
    assert saved["trainer"]["callbacks"][0]["init_args"]["config"] == str(RECIPES / "compressed1.cfg")
    # tested without the callback: the checkpoint's record supplies it
    checkpoint = _checkpoint(tmp_path)
    cli = run_lightning_cli(["test", f"--ckpt_path={checkpoint}"] + _budget(tmp_path / "test") + ["--model.width=64"])
    assert compression_state(cli.model).kept_channels == record["kept_channels"]
    assert 0.0 <= float(cli.trainer.callback_metrics["test_acc"]) <= 1.0
    # tested with a callback of another config: refused in its setup, one line
    with pytest.raises(SystemExit) as exit_info:
        other_config = [f"--trainer.callbacks+={CALLBACK}", f"--trainer.callbacks.config={RECIPES / 'a8w4.cfg'}"]
        main(["test", f"--ckpt_path={checkpoint}", *other_config, *_budget(tmp_path / "other"), "--model.width=64"])
    assert exit_info.value.code == 2
    assert "was trained with another compression config than this callback's" in capsys.readouterr().err
    # fit resumed from it without the callback: the record supplies it, training goes on compressed
    resumed = tmp_path / "resumed"
    budget = [*_budget(resumed), "--model.width=64", "--trainer.max_epochs=2"]
    cli = run_lightning_cli(["fit", f"--ckpt_path={checkpoint}", *budget])
    assert compression_state(cli.model).kept_channels == record["kept_channels"]
    assert cli.trainer.global_step == 6  # three batches of the first epoch, three of the second
    assert (resumed / "compressed" / "model_compressed.pt").is_file()


def test_yaml_config_fits_then_tests_the_compressed_checkpoint(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    callbacks = [{"class_path": CALLBACK, "init_args": {"config": str(RECIPES / "a8w4.cfg")}}]
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    run_lightning_cli(["fit", f"--config={config}"] + _budget(tmp_path))
    checkpoint = _checkpoint(tmp_path)
    # a fresh module: the callback rebuilds the compressed structure before the weights load
    cli = run_lightning_cli(["test", f"--config={config}", f"--ckpt_path={checkpoint}"] + _budget(tmp_path / "test"))
    assert type(cli.model.net.fc).__name__ == "CompressedLinear"
    assert 0.0 <= float(cli.trainer.callback_metrics["test_acc"]) <= 1.0


def test_a_checkpoint_that_is_not_there_is_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nothere.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", f"--ckpt_path={missing}"] + _budget(tmp_path))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: --ckpt_path: no such file: {missing}"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"pytorch-lightning_version": "2.6", "state_dict": {"w": torch.zeros(64)}}, "cannot be read as a checkpoint"),
        ({"model_class": "DemoClassifier", "layers": {}}, "is save_compressed's checkpoint, not a Lightning one"),
        ({"weights": torch.zeros(2)}, "is not a Lightning checkpoint"),
    ],
    ids=["truncated", "save_compressed", "other"],
)
def test_a_file_that_is_no_lightning_checkpoint_is_one_line_and_status_2(
    content: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "given.ckpt"
    torch.save(content, path)
    if "cannot be read" in message:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SystemExit) as exit_info:
        main(["test", f"--ckpt_path={path}"] + _budget(tmp_path))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: --ckpt_path: {path} {message}")


def test_bad_config_is_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "missing.cfg"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--trainer.callbacks+={CALLBACK}", f"--trainer.callbacks.config={missing}"] + _budget(tmp_path))
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line == f"error: {missing}: cannot read the config file: No such file or directory"


def test_console_script_fits_a_plain_module(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("lightning-amct")
    args = ["fit", f"--trainer.callbacks+={CALLBACK}", f"--trainer.callbacks.config={RECIPES / 'quant.cfg'}"]
    done = subprocess.run([str(script), *args, *_budget(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LightningCLI's args parameter" not in done.stderr
    record = torch.load(_checkpoint(tmp_path), weights_only=True)[CHECKPOINT_KEY]
    assert "net.stem.conv" not in {layer["name"] for layer in record["plan"]["layers"] if layer["quant"]}


def test_a_model_class_of_ones_own_keeps_its_own_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The demo's defaults are the parser's no longer: it kept a default class's init arguments
    (the demo's width and lr) for the class that replaced it."""
    (tmp_path / "own_module.py").write_text(
        "from lightning_amct.demo import DemoClassifier\n\n"
        "class Own(DemoClassifier):\n"
        "    def __init__(self, width: int = 8, lr: float = 0.05):\n"
        "        super().__init__(width=width, lr=lr)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit):
        run_lightning_cli(["fit", "--model=own_module.Own", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"] == {"class_path": "own_module.Own", "init_args": {"width": 8, "lr": 0.05}}
    assert printed["data"]["class_path"] == "lightning_amct.demo.DigitsDataModule"


def test_a_config_file_that_names_the_classes_gets_no_demo_class(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  class_path: own_module.Own\ndata: lightning_amct.demo.DigitsDataModule\n")
    assert with_default_classes(["fit", "-c", str(config)]) == ["fit", "-c", str(config)]
    assert with_default_classes(["fit", f"--config={config}", "--model.lr=0.1"])[1:2] == [f"--config={config}"]
    assert with_default_classes(["test", "--model.width=16"])[:3] == [
        "test", "--model=lightning_amct.demo.DemoClassifier", "--data=lightning_amct.demo.DigitsDataModule"
    ]
