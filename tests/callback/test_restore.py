"""Structure before weights: every ``ckpt_path`` entry point rebuilds the checkpoint's structure in setup.

The checkpoint comes from a channel-pruned, quantized run; each test restores it into a fresh
module initialised with another seed, on whose weights BCP would choose other channels. The
kept channels, quantizers and masks must come from the checkpoint's record, before its weights
load; a checkpoint of another config is refused naming what differs, before any state_dict
error; a checkpoint without a record is a float model.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_amct import CompressionCallback, compress_model, compression_state
from lightning_amct.demo import DemoClassifier, DigitsDataModule

RECIPES = Path(__file__).parents[2] / "recipes"
PRUNED = RECIPES / "compressed1.cfg"  # filter pruning + INT8


def _train(root: Path, callbacks: list[pl.Callback]) -> tuple[DemoClassifier, Path]:
    pl.seed_everything(0)
    module = DemoClassifier()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=1, default_root_dir=str(root),
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[*callbacks, ModelCheckpoint(dirpath=root, filename="trained")],
    )  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=32, shuffle=False))
    return module, root / "trained.ckpt"


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoClassifier, Path]:
    """A module trained with channel pruning and INT8, and its checkpoint."""
    return _train(tmp_path_factory.mktemp("pruned"), [CompressionCallback(PRUNED, export=False)])


def _fresh_module() -> DemoClassifier:
    pl.seed_everything(7)
    return DemoClassifier()


def _kept_channels_when_weights_load(module: DemoClassifier) -> list[dict[str, list[int]]]:
    """Fills with the module's kept channels each time a ``load_state_dict`` into it begins."""
    seen: list[dict[str, list[int]]] = []
    module.register_load_state_dict_pre_hook(lambda *_: seen.append(dict(compression_state(module).kept_channels)))
    return seen


def _bcp_choice(module: DemoClassifier) -> dict[str, list[int]]:
    """The channels BCP keeps on ``module``'s own weights (on a copy)."""
    copy = DemoClassifier()
    copy.load_state_dict(module.state_dict())
    compress_model(copy, PRUNED, copy.example_input_array)
    return compression_state(copy).kept_channels


@pytest.mark.parametrize("entry", ["validate", "test", "predict"])
def test_evaluation_from_a_checkpoint_rebuilds_its_structure(entry: str, pruned_run, trainer_factory) -> None:
    trained, ckpt = pruned_run
    data = DigitsDataModule(batch_size=64)
    budget = {f"limit_{stage}_batches": 2 for stage in ("val", "test", "predict")}
    expected = getattr(trainer_factory(**budget), entry)(trained, data)
    fresh = _fresh_module()
    recorded = torch.load(ckpt, weights_only=True)["lightning_amct"]["kept_channels"]
    assert _bcp_choice(fresh) != recorded  # so only the record can give the right channels
    at_load = _kept_channels_when_weights_load(fresh)

    trainer = trainer_factory(callbacks=[CompressionCallback(PRUNED)], **budget)
    actual = getattr(trainer, entry)(fresh, data, ckpt_path=ckpt)
    assert at_load == [recorded] and compression_state(fresh).kept_channels == recorded
    if entry == "predict":
        assert all(torch.equal(a, e) for a, e in zip(actual, expected))
    else:
        assert actual == expected


@pytest.mark.parametrize("how", ["argument", "trainer.ckpt_path"])
def test_fit_resumes_into_the_checkpoints_structure(how: str, pruned_run, trainer_factory) -> None:
    _, ckpt = pruned_run
    fresh = _fresh_module()
    at_load = _kept_channels_when_weights_load(fresh)
    trainer = trainer_factory(max_epochs=2, limit_train_batches=3, limit_val_batches=1,
                           callbacks=[CompressionCallback(PRUNED, export=False)])  # fmt: skip
    if how == "argument":
        trainer.fit(fresh, DigitsDataModule(batch_size=32, shuffle=False), ckpt_path=ckpt)
    else:
        trainer.ckpt_path = ckpt
        trainer.fit(fresh, DigitsDataModule(batch_size=32, shuffle=False))
    assert trainer.global_step == 6  # 3 steps restored, 3 trained
    recorded = torch.load(ckpt, weights_only=True)["lightning_amct"]["kept_channels"]
    assert at_load == [recorded] and compression_state(fresh).kept_channels == recorded


@pytest.mark.parametrize("entry", ["fit", "validate"])
def test_a_checkpoint_of_another_config_is_refused_naming_what_differs(entry: str, pruned_run, trainer_factory) -> None:
    _, ckpt = pruned_run
    callback = CompressionCallback(RECIPES / "a8w4.cfg", export=False)
    with pytest.raises(ValueError, match="another compression config") as error:
        getattr(trainer_factory(max_epochs=2, callbacks=[callback]), entry)(
            _fresh_module(), DigitsDataModule(), ckpt_path=ckpt
        )
    message = str(error.value)
    assert str(ckpt) in message and "use the config it was trained with" in message
    assert "net.block.conv1: weight_bits 8 in the checkpoint, 4 here" in message
    assert "pruning on in the checkpoint, off here" in message


def test_output_quantizers_are_part_of_the_structure(pruned_run, trainer_factory) -> None:
    _, ckpt = pruned_run
    callback = CompressionCallback(PRUNED, quantize_outputs=True)
    with pytest.raises(ValueError, match=r"output quantizer of net\.block\.bn2: none in the checkpoint") as error:
        trainer_factory(callbacks=[callback]).validate(_fresh_module(), DigitsDataModule(), ckpt_path=ckpt)
    first = "another compression config than this callback's (quantize_outputs=False in the checkpoint, True here; "
    assert first in str(error.value)


def test_a_checkpoint_without_a_record_is_a_float_model(trainer_factory, tmp_path: Path) -> None:
    trained, ckpt = _train(tmp_path / "float", [])
    data = DigitsDataModule(batch_size=64)
    expected = trainer_factory(limit_val_batches=2).validate(trained, data)
    fresh = _fresh_module()
    with pytest.warns(UserWarning, match="holds no lightning-amct record: it is a float model, and validate runs it"):
        trainer = trainer_factory(limit_val_batches=2, callbacks=[CompressionCallback(PRUNED)])
        actual = trainer.validate(fresh, data, ckpt_path=ckpt)
    assert actual == expected and compression_state(fresh) is None
    with pytest.raises(ValueError, match="fit cannot resume compression training from it"):
        trainer_factory(max_epochs=2, callbacks=[CompressionCallback(PRUNED)]).fit(
            _fresh_module(), data, ckpt_path=ckpt
        )


@pytest.mark.parametrize("config", [PRUNED, RECIPES / "prune.cfg"])
def test_a_weights_only_checkpoint_of_a_compressed_model_is_refused_saying_why(config, tmp_path: Path) -> None:
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        callbacks=[
            CompressionCallback(config, export=False),
            ModelCheckpoint(dirpath=tmp_path, filename="weights", save_weights_only=True),
        ],
    )  # fmt: skip
    trainer.fit(DemoClassifier(), DigitsDataModule(batch_size=32))
    evaluation = pl.Trainer(accelerator="cpu", logger=False, callbacks=[CompressionCallback(config)])
    with pytest.raises(ValueError, match=r"holds no lightning-amct record, yet its .*save_weights_only=True"):
        evaluation.test(_fresh_module(), DigitsDataModule(), ckpt_path=tmp_path / "weights.ckpt")


def test_evaluating_a_module_compressed_only_now_says_it_was_not_trained_so(trainer_factory) -> None:
    trainer = trainer_factory(limit_test_batches=1, callbacks=[CompressionCallback(PRUNED)])
    with pytest.warns(UserWarning, match="test compresses DemoClassifier here, without a checkpoint of compression"):
        trainer.test(_fresh_module(), DigitsDataModule())
