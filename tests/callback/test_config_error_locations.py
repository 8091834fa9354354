"""A config error found against the model names file, line and column on every path to it.

``resolve_plan`` and ``lightning-amct plan`` read the file themselves; the callback (and so a
Trainer, ``lightning-amct fit`` and ``run``) loads it at construction and meets the model only in
``setup``: the error must still point at the line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_amct import CompressionCallback, ConfigError, ConfigWarning, resolve_plan
from lightning_amct.cli import main
from lightning_amct.demo import DemoClassifier, DigitsDataModule

TYPO = 'retrain_data_quant_config { ulq_quantize {} }\n\n# the input layer\nskip_layers: "net.stem.convv"\n'
WHERE = ':4:1: skip_layers[0]: no layer "net.stem.convv" in DemoClassifier; did you mean \'net.stem.conv\''


@pytest.fixture
def typo_cfg(tmp_path: Path) -> Path:
    path = tmp_path / "typo.cfg"
    path.write_text(TYPO)
    return path


def test_resolve_plan_and_the_callback_in_a_trainer_say_the_same(typo_cfg: Path, trainer_factory) -> None:
    with pytest.raises(ConfigError) as direct:
        resolve_plan(DemoClassifier(width=16), typo_cfg)
    with pytest.raises(ConfigError) as through_fit:
        trainer = trainer_factory(max_epochs=1, limit_train_batches=1, callbacks=[CompressionCallback(typo_cfg)])
        trainer.fit(DemoClassifier(width=16), DigitsDataModule(batch_size=16))
    assert str(direct.value).startswith(f"{typo_cfg}{WHERE}")
    assert str(through_fit.value) == str(direct.value)


def test_lightning_fit_subcommand_prints_the_location(typo_cfg: Path, tmp_path: Path, capsys) -> None:
    args = [
        "fit",
        "--trainer.callbacks+=lightning_amct.CompressionCallback",
        f"--trainer.callbacks.config={typo_cfg}",
        "--model.width=16",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f"error: {typo_cfg}{WHERE}")


def test_a_warning_of_the_config_is_shown_at_its_line_only_in_fit_and_test(
    tmp_path: Path, trainer_factory, recwarn: pytest.WarningsRecorder
) -> None:
    cfg = tmp_path / "twice.cfg"
    cfg.write_text('retrain_data_quant_config { ulq_quantize {} }\nskip_layers: "net.fc"\nskip_layers: "net.fc"\n')
    callback = CompressionCallback(cfg)
    trainer = trainer_factory(max_epochs=1, limit_train_batches=2, limit_test_batches=1, callbacks=[callback])
    module, data = DemoClassifier(width=16), DigitsDataModule(batch_size=16)
    trainer.fit(module, data)
    trainer.test(module, data)  # the module is compressed already: the callback reads its stored config again
    shown = [str(w.message) for w in recwarn if isinstance(w.message, ConfigWarning)]
    assert shown and all(message.startswith(f"{cfg}:3:1: skip_layers[1]: ") for message in shown)  # never "<text>:"
