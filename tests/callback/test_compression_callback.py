"""CompressionCallback in real Lightning runs: calibration, logging, weight decay, resume, errors."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_amct import CompressionCallback, compression_state
from lightning_amct.callback import CHECKPOINT_KEY
from lightning_amct.demo import DemoClassifier, DigitsDataModule
from lightning_amct.quant import ActivationQuantizer

IFMR_INT8 = """
batch_num: 2
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
retrain_weight_quant_config { ulq_retrain { dst_type: INT8 } }
"""


def _quantizers(module: torch.nn.Module) -> dict[str, ActivationQuantizer]:
    return {name: m for name, m in module.named_modules() if isinstance(m, ActivationQuantizer)}


def test_calibrates_once_logs_clips_and_keeps_decay_off_them(trainer_factory, tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = DemoClassifier(width=16)
    logger = CSVLogger(tmp_path, name="run")
    trainer = trainer_factory(
        max_epochs=1, logger=logger, log_every_n_steps=2, limit_train_batches=6,
        callbacks=[CompressionCallback(IFMR_INT8, quantize_outputs=True)],
    )  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=32))
    quantizers = _quantizers(module)
    assert quantizers and all(int(q.calibrated_batches) == 2 for q in quantizers.values())
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = [r for r in rows if r.get("amct/net.fc/clip_max")]
    assert [int(r["step"]) for r in logged] == [2, 4, 6]
    assert all(float(r["amct/net.fc/clip_max"]) > 0 for r in logged)
    assert any(k.startswith("amct/net.fc/scale_") for k in rows[0])
    # output quantizers of their own are logged under the module they follow; a shared one is not
    assert all(float(r["amct/net.block.bn2/output_clip_max"]) > 0 for r in logged)
    assert "amct/net.stem.relu/output_clip_max" not in rows[0]
    # the clips and learned scales sit in a group of their own without weight decay
    optimizer = trainer.optimizers[0]
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    ranges = [p for n, p in module.named_parameters() if n.endswith(("clip_max", "clip_min", ".scale"))]
    assert ranges and not decayed & {id(p) for p in ranges}
    assert len(decayed) == len(list(module.parameters())) - len(ranges)
    # the artifacts were written at the end of fit, under the Trainer's root by default
    callback = next(c for c in trainer.callbacks if isinstance(c, CompressionCallback))
    assert callback.artifacts and all(path.parent == tmp_path / "compressed" for path in callback.artifacts.values())
    assert all(path.is_file() and path.name.startswith("model_") for path in callback.artifacts.values())


def _fit(
    recipe: Path, root: Path, max_epochs: int, seed: int, ckpt_path: str | None = None, outputs: bool = False
) -> DemoClassifier:
    pl.seed_everything(seed)
    module = DemoClassifier()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=max_epochs, default_root_dir=str(root), logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
        limit_train_batches=5, limit_val_batches=2,
        callbacks=[
            CompressionCallback(recipe, export=False, quantize_outputs=outputs),
            ModelCheckpoint(dirpath=root, save_top_k=-1, filename="{epoch}"),
        ],
    )  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=32, shuffle=False), ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("recipe", ["quant", "a8w4", "compressed1", "compressed2", "compressed1+outputs"])
def test_resume_is_bit_identical(recipe: str, recipes: Path, tmp_path: Path) -> None:
    name, _, outputs = recipe.partition("+")
    cfg, outputs = recipes / f"{name}.cfg", bool(outputs)
    straight = _fit(cfg, tmp_path / "straight", max_epochs=2, seed=0, outputs=outputs)
    _fit(cfg, tmp_path / "first", max_epochs=1, seed=0, outputs=outputs)
    # a fresh module, initialised differently: everything must come from the checkpoint
    first_ckpt = str(tmp_path / "first" / "epoch=0.ckpt")
    resumed = _fit(cfg, tmp_path / "second", max_epochs=2, seed=1, ckpt_path=first_ckpt, outputs=outputs)
    expected, actual = straight.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    assert any(".output_quant." in key for key in expected) == outputs
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert compression_state(resumed).kept_channels == compression_state(straight).kept_channels


def test_resume_from_a_checkpoint_saved_during_calibration_is_bit_identical(tmp_path: Path) -> None:
    """Calibration over 8 batches, 5 an epoch: the epoch-end checkpoint holds IFMR's statistics so far."""
    cfg = tmp_path / "ifmr8.cfg"
    cfg.write_text("batch_num: 8\nretrain_data_quant_config { ulq_quantize {} }\nretrain_weight_quant_config { arq_retrain {} }\n")
    straight = _fit(cfg, tmp_path / "straight", max_epochs=2, seed=0)
    _fit(cfg, tmp_path / "first", max_epochs=1, seed=0)
    first_ckpt = tmp_path / "first" / "epoch=0.ckpt"
    assert torch.load(first_ckpt, weights_only=True)[CHECKPOINT_KEY]["calibration"]["world_size"] == 1
    resumed = _fit(cfg, tmp_path / "second", max_epochs=2, seed=1, ckpt_path=str(first_ckpt))
    expected, actual = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert "calibration" not in torch.load(tmp_path / "second" / "epoch=1.ckpt", weights_only=True)[CHECKPOINT_KEY]


def test_bf16_mixed_precision_trains_the_clips_and_exports(trainer_factory, recipes: Path) -> None:
    """Every layer quantized, the first one over one input channel, under CPU autocast to bfloat16."""
    pl.seed_everything(0)
    module = DemoClassifier(width=16)
    trainer = trainer_factory(
        max_steps=3, precision="bf16-mixed", callbacks=[CompressionCallback(recipes / "int8.cfg")]
    )
    trainer.fit(module, DigitsDataModule(batch_size=32))
    quantizers = _quantizers(module)
    assert len(quantizers) == 6
    assert all(torch.isfinite(q.clip_max) and q.clip_max.grad is not None for q in quantizers.values())
    callback = next(c for c in trainer.callbacks if isinstance(c, CompressionCallback))
    assert callback.artifacts["deploy_onnx"].is_file()


def test_with_gradient_accumulation_each_step_is_logged_once(trainer_factory) -> None:
    callback = CompressionCallback(IFMR_INT8, export=False, log_every_n_steps=1)
    trainer = trainer_factory(max_epochs=1, limit_train_batches=8, accumulate_grad_batches=2, callbacks=[callback])
    trainer.fit(DemoClassifier(width=16), DigitsDataModule(batch_size=32))
    assert [row["step"] for row in callback.history] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_trainer_that_logs_nothing_trains_without_logging_clips(trainer_factory) -> None:
    callback = CompressionCallback(IFMR_INT8, export=False)
    trainer = trainer_factory(max_epochs=1, limit_train_batches=3, log_every_n_steps=0, callbacks=[callback])
    trainer.fit(DemoClassifier(width=16), DigitsDataModule(batch_size=32))  # 0 divided the step count
    assert callback.history == [] and trainer.global_step == 3


def test_a_second_stage_with_another_config_is_refused(trainer_factory) -> None:
    module, data = DemoClassifier(width=16), DigitsDataModule(batch_size=32)
    trainer_factory(max_epochs=1, limit_train_batches=2, callbacks=[CompressionCallback(IFMR_INT8, export=False)]).fit(
        module, data
    )
    same = CompressionCallback(IFMR_INT8, export=False)
    trainer_factory(max_epochs=1, limit_train_batches=2, callbacks=[same]).fit(module, data)  # goes on
    other = CompressionCallback("prune_config { n_out_of_m_pruner { l1_selective_prune {} } }", export=False)
    with pytest.raises(ValueError, match="compressed already, with another config than this CompressionCallback's"):
        trainer_factory(max_epochs=1, limit_train_batches=2, callbacks=[other]).fit(module, data)


def test_a_module_without_example_inputs_is_refused_before_training_that_would_export(trainer_factory) -> None:
    module = DemoClassifier(width=16)
    module.example_input_array = None
    trainer = trainer_factory(max_epochs=1, limit_train_batches=2, callbacks=[CompressionCallback(IFMR_INT8)])
    with pytest.raises(ValueError, match="DemoClassifier has no example_input_array, which the ONNX export"):
        trainer.fit(module, DigitsDataModule(batch_size=32))
    assert trainer.global_step == 0
    without_artifacts = CompressionCallback(IFMR_INT8, export=False)  # trains: the graph is optional
    trainer_factory(max_epochs=1, limit_train_batches=2, callbacks=[without_artifacts]).fit(module, DigitsDataModule())


def test_an_output_dir_that_is_a_file_is_refused_before_training(trainer_factory, tmp_path: Path) -> None:
    taken = tmp_path / "a_file"
    taken.write_text("the user's")
    callback = CompressionCallback(IFMR_INT8, output_dir=taken / "compressed")
    trainer = trainer_factory(max_epochs=1, limit_train_batches=2, callbacks=[callback])
    with pytest.raises(ValueError, match=r"the artifacts cannot go to .*a_file/compressed: .*a_file is a file, not a"):
        trainer.fit(DemoClassifier(width=16), DigitsDataModule(batch_size=32))
    assert trainer.global_step == 0 and taken.read_text() == "the user's"


class FrozenBatchNorm(DemoClassifier):
    """Fine-tuning with one BatchNorm kept in eval mode (its statistics frozen)."""

    def on_train_epoch_start(self) -> None:
        self.net.block.bn2.eval()


class FrozenBlock(DemoClassifier):
    """Fine-tuning with the residual block's second conv and its BatchNorm kept in eval mode."""

    def on_train_epoch_start(self) -> None:
        self.net.block.conv2.eval()
        self.net.block.bn2.eval()


def test_an_output_quantizer_of_a_frozen_batchnorm_trains_with_its_layer(trainer_factory) -> None:
    """A BatchNorm kept in eval mode keeps its child, the output quantizer, in eval mode: it trains
    with the conv before it instead (else it never calibrates, and that conv deploys in float)."""
    module, callback = FrozenBatchNorm(width=16), CompressionCallback(IFMR_INT8, quantize_outputs=True, export=False)
    trainer = trainer_factory(max_epochs=1, limit_train_batches=2, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*saw no training batch")
        trainer.fit(module, DigitsDataModule(batch_size=32))
    quantizer = module.net.block.bn2.output_quant
    assert quantizer.calibrated and not module.net.block.bn2.training
    module.eval()
    assert not quantizer.training  # evaluation puts it in eval mode as before


def test_an_output_quantizer_of_a_frozen_block_is_named_with_the_cause(trainer_factory) -> None:
    callback = CompressionCallback(IFMR_INT8, quantize_outputs=True, export=False)
    trainer = trainer_factory(max_epochs=1, limit_train_batches=2, callbacks=[callback])
    with pytest.warns(UserWarning, match=r"2 activation quantizer\(s\) saw no training batch .* an output quantizer "
                      r"\(net.block.bn2.output_quant\) trains with the layer whose output it quantizes: a layer kept in "
                      r"eval mode while the model trains \(a frozen block\) leaves it uncalibrated"):  # fmt: skip
        trainer.fit(FrozenBlock(width=16), DigitsDataModule(batch_size=32))


def test_training_that_ends_before_calibration_does_says_so(trainer_factory) -> None:
    config = "batch_num: 5\nretrain_data_quant_config { ulq_quantize {} }\n"
    trainer = trainer_factory(max_epochs=1, limit_train_batches=2, callbacks=[CompressionCallback(config, export=False)])
    with pytest.warns(UserWarning, match=r"training ended before calibration did: 6 activation quantizer\(s\) saw "
                      r"fewer than batch_num batches \(net.stem.conv.act_quant: 2 of 5\)"):  # fmt: skip
        trainer.fit(DemoClassifier(width=16), DigitsDataModule(batch_size=32))


def test_a_layer_that_no_training_batch_ran_is_named(trainer_factory) -> None:
    class EvalRefined(DemoClassifier):
        def __init__(self) -> None:
            super().__init__(width=16)
            self.refine = torch.nn.Linear(10, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = super().forward(x)
            return logits if self.training else logits + self.refine(logits)

    trainer = trainer_factory(max_epochs=1, limit_train_batches=2, callbacks=[CompressionCallback(IFMR_INT8)])
    with pytest.warns(UserWarning, match=r"1 activation quantizer\(s\) saw no training batch \(refine.act_quant\)"):
        trainer.fit(EvalRefined(), DigitsDataModule(batch_size=32))


def test_non_finite_activations_during_calibration_name_the_layer(trainer_factory) -> None:
    class NaNData(DigitsDataModule):
        def train_dataloader(self):
            x = torch.full((8, 1, 8, 8), float("nan"))
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(8, dtype=torch.long)))

    trainer = trainer_factory(max_epochs=1, callbacks=[CompressionCallback(IFMR_INT8)])
    with pytest.raises(ValueError, match="net.stem.conv"):
        trainer.fit(DemoClassifier(width=16), NaNData())


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="log_every_n_steps"):
        CompressionCallback(IFMR_INT8, log_every_n_steps=0)
    with pytest.raises(ValueError, match="prefix"):
        CompressionCallback(IFMR_INT8, prefix="a/b")
